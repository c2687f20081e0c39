"""Ground-truth credit (llm/ground_truth.py) against exact answers on a task small enough to enumerate.

The model: a one-layer Qwen3 built here, vocabulary of 6 tokens (pad, eos, a, b, t, x), completions of at most 3 tokens,
so every continuation of every prefix can be enumerated (6³ = 216 leaves) with the model's exact probabilities.
The judge: the built-in word task's (judge_word) on "a 3-letter word with 'a', without 'b', ending in 't'".
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from bench_helpers import load_benchmark
from transformers import Qwen3Config, Qwen3ForCausalLM

from llm.cli import main as cli_main
from llm.ground_truth import (
    Sampling,
    Scorer,
    bootstrap_correlation,
    correlation,
    counterfactual_contributions,
    exact_values,
    judge_scorer,
    mc_advantages,
    next_token_probs,
    sample_continuations,
    vocabulary_sample,
)
from llm.rewards import RewardFunctions
from llm.tasks import judge_word

pytestmark = pytest.mark.usefixtures("one_thread")

CHARS = ["<pad>", "<eos>", "a", "b", "t", "x"]
PAD, EOS = 0, 1
PROMPT = "Write a 3-letter word with 'a', without 'b', ending in 't'.\n"
PROMPT_IDS = [2, 3, 5]  # what the model reads before the completion (any ids: the judge reads PROMPT)
SAMPLING = Sampling(temperature=1.0, max_new_tokens=3, eos_id=EOS, pad_id=PAD)
COMPLETIONS = [[2, 4, 4], [5, 1], [4, 2, 4], [3, 3, 2]]  # "att", "x"+eos, "tat", "bba"


def decode(ids) -> str:
    """The rollout's decoding: specials skipped, characters joined."""
    return "".join(CHARS[i] for i in ids if i > EOS)


@pytest.fixture(scope="module")
def model():
    """Random weights, embeddings scaled ×4 so that next-token probabilities range ~0.05–0.6 (not uniform, none ~0)."""
    cfg = Qwen3Config(vocab_size=len(CHARS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True,
                      pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(4.0)
    return m


def word_score(text: str) -> float:
    return judge_word(PROMPT, text).score


def test_counterfactual_matches_brute_force():
    score = judge_scorer(judge_word, [PROMPT])
    got = counterfactual_contributions(COMPLETIONS, [0] * len(COMPLETIONS), score, decode, len(CHARS))
    for c, g in zip(COMPLETIONS, got):
        want = [word_score(decode(c)) - np.mean([word_score(decode(c[:t] + [v] + c[t + 1:])) for v in range(len(CHARS))])
                for t in range(len(c))]
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-12)  # same float64 arithmetic, summed in another order
    # hand check of "att" (score 1: every constraint met), token 't' at t=2 — the six edits give
    # "at"→ length 2/3: (2/3+1+1+1)/4 (pad/eos delete it) ×2, "ata" 0.75, "atb" 0.5, "att" 1, "atx" 0.75
    short = (2 / 3 + 3) / 4
    assert got[0][2] == pytest.approx(1 - (2 * short + 0.75 + 0.5 + 1 + 0.75) / 6, abs=1e-12)


def test_vocabulary_sample_is_uniform_without_replacement_and_seeded():
    s = vocabulary_sample(100, 10, seed=3)
    assert len(set(s.tolist())) == 10 and s.min() >= 0 and s.max() < 100
    assert torch.equal(s, vocabulary_sample(100, 10, seed=3)) and not torch.equal(s, vocabulary_sample(100, 10, seed=4))
    assert torch.equal(vocabulary_sample(6, 50, seed=0), torch.arange(6))
    # a sample of the whole vocabulary is the whole vocabulary: the same c_t
    score = judge_scorer(judge_word, [PROMPT])
    a = counterfactual_contributions(COMPLETIONS, [0] * 4, score, decode, 6)
    b = counterfactual_contributions(COMPLETIONS, [0] * 4, score, decode, 6, vocab_sample=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_exact_values_by_hand_at_the_last_token(model):
    """V of a 2-token prefix = Σ_v π(v | prefix) R(prefix + v): the enumeration's last level, by hand."""
    score = judge_scorer(judge_word, [PROMPT])
    c = COMPLETIONS[0]
    p = next_token_probs(model, [PROMPT_IDS + c[:2]], SAMPLING)[0].numpy()
    want = sum(p[v] * word_score(decode(c[:2] + [v])) for v in range(len(CHARS)))
    got = exact_values(model, PROMPT_IDS, c, 0, score, decode, SAMPLING)
    assert got[2] == pytest.approx(want, abs=1e-12)
    assert got[3] == word_score(decode(c))  # the finished completion: its own score
    # V(prompt) by a separate recursion, one unbatched forward per prefix (the library batches each level)
    def brute(seq: list, prob: float) -> float:
        if len(seq) == 3 or (seq and seq[-1] == EOS):
            return prob * word_score(decode(seq))
        q = next_token_probs(model, [PROMPT_IDS + seq], SAMPLING)[0]
        return sum(brute(seq + [v], prob * float(q[v])) for v in range(len(CHARS)))

    total = brute([], 1.0)
    assert got[0] == pytest.approx(total, abs=1e-9)


def test_mc_advantages_match_exact_within_4_se(model):
    """Every token: |Â_t − A_t| ≤ 4·SE(Â_t) (and every value), fixed seed, 400 continuations per prefix.

    The exact A_t enumerates every completion with the model's probabilities; a 4σ miss on one of the ~15 estimates has
    probability ~1e-3 for a correct estimator, while an estimator off by one prefix (Q read from y_<t+1's successor, or
    V from y_≤t) misses here by the difference of neighbouring exact advantages, ~0.15 for "att" (A = 0.30, 0.15, 0.14),
    ≫ 4·SE ≈ 0.05."""
    score = judge_scorer(judge_word, [PROMPT])
    stats = {}
    est = mc_advantages(model, [PROMPT_IDS] * 4, COMPLETIONS, [0] * 4, score, decode, SAMPLING, n_continuations=400, seed=1,
                        stats=stats)
    assert stats["continuations"] == 400 * stats["prefixes"] and stats["continuation_tokens"] > 0
    for c, e in zip(COMPLETIONS, est):
        exact = exact_values(model, PROMPT_IDS, c, 0, score, decode, SAMPLING)
        assert e.values.shape == (len(c) + 1,) and e.advantages.shape == (len(c),)
        assert e.values[-1] == exact[-1] and e.value_se[-1] == 0  # a finished completion is judged, not sampled
        assert np.all(np.abs(e.values - exact) <= 4 * e.value_se + 1e-12)
        assert np.all(e.advantage_se > 0)
        assert np.all(np.abs(e.advantages - np.diff(exact)) <= 4 * e.advantage_se)
    # the t = 0 prefix (the prompt) is one estimate shared by the group
    assert len({float(e.values[0]) for e in est}) == 1


def test_shared_prefix_samples_what_the_generator_samples(model):
    prefixes = [PROMPT_IDS, PROMPT_IDS + [2], PROMPT_IDS + [4, 2]]
    a = sample_continuations(model, prefixes, 7, [1, 2, 3], 3, SAMPLING, share_prefix=True)
    b = sample_continuations(model, prefixes, 7, [1, 2, 3], 3, SAMPLING, share_prefix=False)
    assert a == b  # same Gumbel streams; a token differs only at an exact tie within rounding (none here)
    assert all(len(x) <= 3 for cs in a for x in cs) and len(a) == 3 and all(len(cs) == 7 for cs in a)
    assert len({tuple(x) for cs in a for x in cs}) > 3  # it samples, not a greedy copy


def test_scorer_reward_functions_and_failed_items():
    def rule(prompts, completions, target, **_):
        return [None if c == "skip" else float(c == t) for c, t in zip(completions, target)]

    score = Scorer(RewardFunctions([rule]), ["p0", "p1"], {"target": ["aa", "bb"]})
    np.testing.assert_array_equal(score([0, 1, 1, 0], ["aa", "aa", "bb", "skip"]), [1.0, 0.0, 1.0, math.nan])
    with pytest.raises(ValueError, match="one per prompt"):
        Scorer(RewardFunctions([rule]), ["p0"], {"target": ["a", "b"]})


def test_correlation_on_hand_computed_data():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # cov = 1.333, var x = var y = 1.667 (ddof 1): r = 0.8
    out = correlation(x, y)
    assert out["r"] == pytest.approx(0.8, abs=1e-12) and out["r_disattenuated"] == out["r"] and out["n"] == 4
    # se² = 0.5 against var(y) = 5/3: reliability 0.7, r / sqrt(0.7)
    out = correlation(x, y, [math.sqrt(0.5)] * 4)
    assert out["reliability"] == pytest.approx(0.7, abs=1e-12)
    assert out["r_disattenuated"] == pytest.approx(0.8 / math.sqrt(0.7), abs=1e-12)
    assert math.isnan(correlation(x, y, [2.0] * 4)["r_disattenuated"])  # noise larger than the spread: undefined
    assert correlation([1.0, math.nan, 2.0], [1.0, 5.0, 3.0])["n"] == 2  # non-finite pairs left out
    assert math.isnan(correlation([1.0, 1.0], [1.0, 2.0])["r"])


def test_bootstrap_correlation_interval_covers_and_resamples_completions():
    rng = np.random.default_rng(0)
    truth = [rng.normal(size=5) for _ in range(40)]
    credit = [t + rng.normal(scale=0.5, size=5) for t in truth]
    noisy = [t + rng.normal(scale=0.7, size=5) for t in truth]
    se = [np.full(5, 0.7) for _ in truth]
    out = bootstrap_correlation(credit, noisy, se, n_boot=300, seed=1)
    assert out["completions"] == 40 and out["n"] == 200
    assert out["r_lo"] < out["r"] < out["r_hi"]
    # noise-free truth: r(credit, truth) = 1/sqrt(1.25) ≈ 0.894; the raw r is attenuated, the corrected CI covers it
    assert out["r"] < 0.8 and out["r_disattenuated_lo"] <= 1 / math.sqrt(1.25) <= out["r_disattenuated_hi"]
    same = bootstrap_correlation(credit, noisy, se, n_boot=300, seed=1)
    assert same == out


def test_bad_input(model):
    score = judge_scorer(judge_word, [PROMPT])
    for n in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"n_continuations=.* must be an integer >= 2"):
            mc_advantages(model, [PROMPT_IDS], [[2]], [0], score, decode, SAMPLING, n_continuations=n)
    for k in (0, -3):
        with pytest.raises(ValueError, match=r"vocab_sample=.* must be an integer >= 1"):
            counterfactual_contributions([[2]], [0], score, decode, 6, vocab_sample=k)
    with pytest.raises(ValueError, match="one row per completion"):
        counterfactual_contributions([[2], [3]], [0], score, decode, 6)
    with pytest.raises(ValueError, match="must match"):
        correlation([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_correlation([np.ones(2)], [np.ones(2)], n_boot=0)


# ----------------------------------------------------------------------------- sdpo-llm credit-truth

def _credit_truth_argv(tiny_dir, out, *extra) -> list[str]:
    return ["credit-truth", "--recipe", "tiny-cpu", "--set", f"model.path={tiny_dir}", "--set", "training.prompts_per_step=2",
            "--set", "method.num_generations=3", "--set", "training.max_new_tokens=4", "--set", "context.success_threshold=0.3",
            "--out", str(out), *extra]


def test_credit_truth_command_writes_tidy_tables(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    rc = cli_main(_credit_truth_argv(tiny_dir, out, "--channels", "critique,demonstration", "--n-continuations", "4",
                                     "--bootstrap", "20", "--vocab-sample", "30"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "critique" in printed and "disattenuated" in printed
    with open(out / "credit_truth.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["channel"], r["ground_truth"], r["estimator"]) for r in rows] == [
        (c, g, e) for c in ("critique", "demonstration")
        for g, e in (("counterfactual", "pearson"), ("advantage_mc", "pearson"), ("advantage_mc", "disattenuated"))]
    payload = json.loads((out / "credit_truth.json").read_text())
    assert payload["settings"]["n_continuations"] == 4 and payload["settings"]["vocab_sample"] == 30
    assert len(payload["rows"]) == 6 and payload["mc"]["continuations"] > 0
    with open(out / "tokens.csv") as f:
        tokens = list(csv.DictReader(f))
    critique = [t for t in tokens if t["channel"] == "critique"]
    assert int(rows[0]["tokens"]) == len(critique) > 0  # every distilled token of the 6 completions, once
    for r in rows:
        if r["r"] != "nan":
            assert -1 <= float(r["r"]) <= 1 or r["estimator"] == "disattenuated"
    # the ground truth is the completions', not the channel's: equal for a completion measured by both channels
    demo = {(t["completion"], t["t"]): t for t in tokens if t["channel"] == "demonstration"}
    for t in critique:
        if (t["completion"], t["t"]) in demo:
            assert demo[(t["completion"], t["t"])]["A_t"] == t["A_t"] and demo[(t["completion"], t["t"])]["c_t"] == t["c_t"]
    assert 'class="truth"' in (out / "heatmap-critique.html").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--n-continuations", "1"], "--n-continuations=1 must be an integer >= 2"),
    (["--vocab-sample", "0"], "--vocab-sample=0 must be an integer >= 1"),
    (["--channels", "binary,sparkle"], "--channels='binary,sparkle' must list distinct channels"),
    (["--steps", "3,1"], "--steps='3,1' must be increasing integers"),
    (["--bootstrap", "0"], "--bootstrap=0 must be an integer >= 1"),
])
def test_credit_truth_bad_input_exits_2_with_one_line(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert cli_main(_credit_truth_argv(tiny_dir, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sdpo-llm credit-truth: error:") and message in err
    assert not out.exists()  # refused before anything is created


def test_mc_benchmark_counts_the_prefixes_mc_advantages_samples(model, tmp_path):
    """benchmarks/bench_mc_advantage.py times the prefixes mc_advantages forms (same grouping by budget), and runs end to end."""
    bench = load_benchmark("bench_mc_advantage")
    score = judge_scorer(judge_word, [PROMPT])
    stats = {}
    mc_advantages(model, [PROMPT_IDS] * 4, COMPLETIONS, [0] * 4, score, decode, SAMPLING, n_continuations=2, stats=stats)
    groups = bench.prefix_groups([PROMPT_IDS] * 4, COMPLETIONS, SAMPLING)
    assert sum(len(g) for g in groups.values()) == stats["prefixes"] and set(groups) <= {1, 2, 3}
    assert bench.main(["--prompts", "1", "--group", "2", "--max-new-tokens", "3", "--n", "2", "--repeats", "1",
                       "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "mc_advantage.json").read_text())
    assert result["name"] == "mc_advantage" and result["raw"]["same_as_naive"]["shared"] == 1.0
    assert all(f["unit"].startswith("tokens/") and f["value"] > 0 for f in result["figures"])
