"""The tiny model and character tokenizer: built locally, loaded through transformers' Auto* classes."""

from __future__ import annotations

import pytest
import torch

from llm.make_tiny import main
from llm.tiny import build_tiny

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


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


# ----------------------------------------------------------------------------- pretraining corpus
def test_pretraining_examples_use_the_trainer_context_renderer():
    import random

    from llm.recipe import ContextConfig
    from llm.tasks import get_task
    from llm.tiny_pretrain import make_example

    task, spec, rng = get_task("word-constraints"), ContextConfig(), random.Random(0)
    for _ in range(20):
        ctx, answer = make_example(task, rng, "critique", spec)
        prompt = prompt_of(ctx)
        assert ctx.startswith(prompt) and "Feedback on your earlier attempt" in ctx
        assert "score: " in ctx and task.judge(prompt, answer).score == 1.0  # critique → a corrected answer
        ctx, answer = make_example(task, rng, "plain", spec)
        assert ctx == prompt_of(ctx) and "score" not in ctx
    demo_copies = 0
    for _ in range(40):
        ctx, answer = make_example(task, rng, "demo", spec)
        demo = ctx.split("A correct solution:\n")[1].split("\n")[0]
        demo_copies += answer == demo
        assert task.judge(prompt_of(ctx), answer).score == 1.0
    assert 5 < demo_copies < 35
    with pytest.raises(ValueError, match="kind"):
        make_example(task, rng, "nope", spec)


def prompt_of(ctx: str) -> str:
    return ctx[: ctx.index("\n") + 1]


def test_encode_masks_everything_but_answer_and_eos():
    from llm.tiny import build_char_tokenizer
    from llm.tiny_pretrain import encode_examples

    tok = build_char_tokenizer()
    ids, mask, labels = encode_examples(tok, [("ab\n", "xy"), ("abcd\n", "z")])
    assert ids.shape == (2, 7) and mask.sum().item() == 6 + 7 and ids[0, 6].item() == tok.pad_token_id
    assert labels[0].tolist() == [-100, -100, -100, *tok("xy")["input_ids"], tok.eos_token_id, -100]
    assert labels[1, :5].tolist() == [-100] * 5 and labels[1, 5].item() == tok("z")["input_ids"][0]


def test_pretraining_lowers_the_answer_loss_and_cli_saves_it(tmp_path):
    from llm.tiny_pretrain import PretrainConfig, pretrain_dir

    path = build_tiny(tmp_path / "m", hidden_size=32, num_layers=1, seed=0)
    before = transformers.AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight.clone()
    losses = pretrain_dir(path, config=PretrainConfig(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=5))
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    after = transformers.AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight
    assert not torch.equal(before, after)  # the pretrained weights were saved back
    with pytest.raises(ValueError, match="batch_size"):
        PretrainConfig(batch_size=0).validate()


def test_cli_pretrains_on_a_recipes_templates(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["--out", str(out), "--hidden-size", "32", "--num-layers", "1", "--pretrain-steps", "2", "--recipe", "tiny-cpu"]) == 0
    assert (out / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "x"), "--pretrain-steps", "0", "--recipe", "no-such-recipe"]) == 2
    assert "recipe" in capsys.readouterr().err and not (tmp_path / "x").exists()
