"""A tiny Qwen3-style causal LM and a character-level tokenizer, built locally (no hub access).

``build_tiny(out_dir)`` writes a directory that ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
``AutoTokenizer.from_pretrained(out_dir)`` load offline (random weights). ``sdpo-llm make-tiny``
(:mod:`llm.make_tiny`) also pretrains it briefly (``llm.tiny_pretrain``) so that it can use feedback in
its context, and records how in :data:`METADATA_FILE`, which the trainer reads (:func:`untrained_warning`).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Optional, Union

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every printable ASCII character except the vertical tab/form feed; one token per character.
CHARACTERS = tuple(dict.fromkeys(c for c in string.printable if c not in "\x0b\x0c\r"))


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character and pad/bos/eos/unk specials.

    Decoding concatenates characters (no spaces are inserted between tokens).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # A BPE model without merges and without a pre-tokenizer splits any text into its characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def check_tiny_sizes(*, hidden_size: int, num_layers: int, num_heads: int = 4, num_kv_heads: int = 2,
                     max_positions: int = 512) -> None:
    """Raise ``ValueError`` naming the size that cannot build a model: each a positive integer,
    ``hidden_size`` divisible by ``num_heads`` (head_dim = hidden_size / num_heads) and ``num_heads`` by ``num_kv_heads``."""
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("max_positions", max_positions)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )


def build_tiny_model(
    tokenizer,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: Optional[int] = None,
    max_positions: int = 512,
    seed: int = 0,
):
    """A randomly initialised ``Qwen3ForCausalLM`` sized for ``tokenizer`` (tied embeddings)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    check_tiny_sizes(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     max_positions=max_positions)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_pretrained_dir(model, tokenizer, out_dir: Union[str, Path]) -> Path:
    """Save model (safetensors) and tokenizer into ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny(out_dir: Union[str, Path], **sizes) -> Path:
    """Build a tiny random Qwen3 causal LM + character tokenizer and save both into ``out_dir``; ``sizes`` are
    :func:`build_tiny_model`'s keywords (``hidden_size``, ``num_layers``, ..., ``seed``)."""
    tokenizer = build_char_tokenizer()
    return save_pretrained_dir(build_tiny_model(tokenizer, **sizes), tokenizer, out_dir)


def build_tiny_reward_model(
    out_dir: Union[str, Path], *, hidden_size: int = 32, num_layers: int = 1, num_labels: int = 1, seed: int = 0
) -> Path:
    """A tiny random ``Qwen3ForSequenceClassification`` (a stand-in reward model) + tokenizer in ``out_dir``."""
    from transformers import Qwen3ForSequenceClassification

    tokenizer = build_char_tokenizer()
    config = build_tiny_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed).config
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return save_pretrained_dir(Qwen3ForSequenceClassification(config), tokenizer, out_dir)


# ----------------------------------------------------------------------------- build record
METADATA_FILE = "sdpo_tiny.json"  # written by `sdpo-llm make-tiny` beside the weights


def read_metadata(model_dir: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The build record of a tiny model directory, or None when it has none (or an unreadable one)."""
    path = Path(model_dir) / METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def untrained_warning(model_dir: Union[str, Path]) -> Optional[str]:
    """A one-line warning when ``model_dir`` records zero pretraining steps (random weights), else None."""
    meta = read_metadata(model_dir)
    if meta is None or meta.get("pretrain_steps") != 0:
        return None
    return (f"model.path={str(model_dir)!r} is a tiny model built with 0 pretraining steps (random weights): it cannot "
            "use feedback in its context, so SDPO's self-teacher has nothing to teach; rebuild it with "
            "`sdpo-llm make-tiny --out DIR --overwrite` (default pretraining) unless random weights are what you want")
