"""Batched sampling with one random stream per completion: rows do not depend on the batch they are in,
the Gumbel-max sampler draws from softmax(warp(logits)), seeds reproduce, bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch

from llm.generation import GumbelSampler, TransformersGenerator, strip_completion, warp_logits
from llm.recipe import GenerationConfig
from llm.tiny import build_tiny
from llm.models import load_model_and_tokenizer
from llm_helpers import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model (float32) and tokenizer, loaded by the trainer's loading code."""
    model_dir = build_tiny(tmp_path_factory.mktemp("tiny-gen"), hidden_size=32, num_layers=1, seed=5)
    return load_model_and_tokenizer(tiny_recipe(model_dir, tmp_path_factory.mktemp("out")))


PROMPTS = ["write a word:", "abc", "a longer prompt than the others, to pad"]  # different lengths: left padding


def _prompt_ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("spec,temperature", [(GenerationConfig(), 1.0), (GenerationConfig(top_k=12, top_p=0.9), 0.7)])
def test_rows_do_not_depend_on_the_batch(tiny, spec, temperature):
    model, tok = tiny
    gen = TransformersGenerator(spec, temperature, 12, tok)
    a, b, c = _prompt_ids(tok)
    model.train()
    together = gen(model, [a, b, c], 4, [11, 22, 33])
    assert model.training  # generation samples in eval mode and restores the mode it found
    model.eval()
    alone = gen(model, [b], 4, [22])
    swapped = gen(model, [c, b], 4, [33, 22])
    assert [g.prompt_ids for g in together] == [a, b, c]
    assert together[1].completion_ids == alone[0].completion_ids == swapped[1].completion_ids
    assert together[2].completion_ids == swapped[0].completion_ids
    assert all(len(g.completion_ids) == 4 and all(1 <= len(r) <= 12 for r in g.completion_ids) for g in together)
    assert len({tuple(r) for r in together[1].completion_ids}) > 1  # each row of a group has its own stream


def test_same_seeds_reproduce_and_other_seeds_differ(tiny):
    model, tok = tiny
    gen = TransformersGenerator(GenerationConfig(), 1.0, 10, tok)
    prompts = _prompt_ids(tok)
    first, again = gen(model, prompts, 3, [1, 2, 3]), gen(model, prompts, 3, [1, 2, 3])
    other = gen(model, prompts, 3, [4, 5, 6])
    assert [g.completion_ids for g in first] == [g.completion_ids for g in again]
    assert all(f.completion_ids != o.completion_ids for f, o in zip(first, other))


def test_bad_input_is_refused(tiny):
    model, tok = tiny
    gen = TransformersGenerator(GenerationConfig(), 1.0, 4, tok)
    prompts = _prompt_ids(tok)
    with pytest.raises(ValueError, match="seeds has 2 entries for 3 prompts"):
        gen(model, prompts, 2, [1, 2])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="group_size"):
            gen(model, prompts, bad, [1, 2, 3])
    assert gen(model, [], 2, []) == []


def _expected_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """softmax(logits / T) restricted to the top-k, then to the smallest top set reaching mass top_p, in float64."""
    order = sorted(range(len(logits)), key=lambda v: -logits[v])
    kept = order[:top_k] if top_k else order
    w = [math.exp(logits[v] / temperature) for v in kept]
    p = [x / sum(w) for x in w]
    n, mass = 0, 0.0
    while mass < top_p and n < len(kept):
        mass, n = mass + p[n], n + 1
    z = sum(p[:n])
    out = [0.0] * len(logits)
    for v, q in zip(kept[:n], p[:n]):
        out[v] = q / z
    return out


LOGITS = [1.3, 2.1, -0.4, 0.0, 0.9, -2.5, 1.6]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.8), (0.7, 5, 0.9)])
def test_gumbel_sampler_draws_from_the_warped_softmax(temperature, top_k, top_p):
    rows, steps = 1000, 20  # 20,000 draws: 1000 streams x 20 steps each
    sampler = GumbelSampler([1000 + r for r in range(rows)], temperature, top_k, top_p)
    scores = torch.tensor(LOGITS).expand(rows, -1)
    draws = torch.cat([sampler(None, scores).argmax(-1) for _ in range(steps)])
    counts = torch.bincount(draws, minlength=len(LOGITS)).tolist()
    n = rows * steps
    for v, p in enumerate(_expected_probs(LOGITS, temperature, top_k, top_p)):
        if p == 0.0:
            assert counts[v] == 0, f"token {v} is filtered out but was drawn {counts[v]} times"
        else:  # binomial tolerance, 5 sigma
            assert abs(counts[v] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (v, counts[v], n * p)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.6), (1.5, 4, 0.85)])
def test_warp_keeps_what_transformers_sampling_keeps(temperature, top_k, top_p):
    """Same filters as the do_sample=True warpers the generator used before (and vLLM's top-k/top-p)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 2
    hf = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                             + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ours = warp_logits(logits, temperature, top_k, top_p)
    theirs = hf(None, logits.clone())
    torch.testing.assert_close(ours.isinf(), theirs.isinf())
    kept = ~ours.isinf()
    torch.testing.assert_close(ours[kept], logits[kept] / temperature)


def test_strip_completion_keeps_eos_and_drops_padding():
    assert strip_completion([5, 6, 2, 0, 0], eos_id=2, pad_id=0) == [5, 6, 2]
    assert strip_completion([5, 0, 6], eos_id=2, pad_id=0) == [5, 6]
    assert strip_completion([5, 6, 2, 2], eos_id=2, pad_id=2) == [5, 6, 2]
