"""The tiny model and character tokenizer: built locally, loaded through transformers' Auto* classes."""

from __future__ import annotations

import pytest
import torch

from llm.tiny import build_tiny, main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=1, seed=3)


def test_loads_offline_and_roundtrips_characters(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    text = "len=4, has 'r'; end: t\nabc xyz!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text  # no spaces inserted between characters
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert tok.decode(tok("é")["input_ids"]) == tok.unk_token


def test_model_is_qwen3_and_generates(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    batch = tok(["ab"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and 2 < out.shape[1] <= 6
    logits = model(**batch).logits
    assert logits.shape == (1, 2, len(tok)) and torch.isfinite(logits).all()


def test_seed_makes_identical_weights(tmp_path):
    a = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(tmp_path / "a", hidden_size=32, num_layers=1, seed=1))
    b = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(tmp_path / "b", hidden_size=32, num_layers=1, seed=1))
    c = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(tmp_path / "c", hidden_size=32, num_layers=1, seed=2))
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny(tmp_path, hidden_size=30, num_layers=1)
    with pytest.raises(ValueError, match="num_layers"):
        build_tiny(tmp_path, hidden_size=32, num_layers=0)


def test_cli_without_pretraining(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "m"), "--hidden-size", "32", "--num-layers", "1", "--pretrain-steps", "0"]) == 0
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    assert "tiny model written" in capsys.readouterr().out
