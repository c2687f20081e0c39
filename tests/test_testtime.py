"""Test-time discovery (issue 16): best-of-k against an independent enumeration, the discovery estimator on a case
with a known answer (lr 0: best-of-k by construction), the toy loop against train.run, the attempts-ratio helpers on
hand-computed curves, both command lines' small runs and their bad-input refusals."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import llm.cli
import sdpo_sim.cli
from sdpo_sim import exact
from sdpo_sim.core import discovery
from sdpo_sim.policies import TabularPolicy
from sdpo_sim.testtime import TestTimeConfig, attempt_hits, success_threshold
from sdpo_sim.train import run
from sdpo_sim.world import family_task

EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16


# ----------------------------------------------------------------------------- best-of-k and the threshold rule
def test_best_of_k_equals_enumeration_of_k_tuples():
    """V=3, T=3 (27 sequences, uniform initial policy): P(some attempt of k exceeds τ) counted over all 27**k tuples of
    attempts, k ≤ 3, against 1 − (1 − p)^k. Both are sums of ≤ 27**3 float64 terms: they agree to ~27**3·eps."""
    task, policy = family_task(0, 3, 3), TabularPolicy("markov", 3, 3)
    tau, p = success_threshold(task, policy, 0.2)
    success = (task.rewards > tau).tolist()
    assert p == pytest.approx(sum(success) / 27, abs=27 * EPS64)
    curve = discovery.best_of_k(p, 3)
    for k in (1, 2, 3):
        hit = sum(any(success[i] for i in tup) for tup in itertools.product(range(27), repeat=k)) / 27**k
        assert curve[k - 1] == pytest.approx(hit, abs=27**3 * EPS64)


def test_tail_rule_picks_the_smallest_reward_with_tail_mass_below_the_bound():
    task, policy = family_task(0, 8, 6), TabularPolicy("markov", 8, 6)
    tau, p = success_threshold(task, policy, 0.002)
    values = torch.unique(task.rewards)
    below = values[values < tau].max()  # the next reward value down must break the bound
    assert p <= 0.002 and float((task.rewards > below).double().mean()) > 0.002
    assert p == pytest.approx(float((task.rewards > tau).double().mean()), abs=1e-12)  # uniform θ = 0: a count


# ----------------------------------------------------------------------------- the estimator
def test_lr_zero_reproduces_best_of_k_within_binomial_error():
    """With lr 0 nothing updates, so every attempt is an independent draw from the initial policy and the estimated
    D(k) must match 1 − (1 − p)^k: within 4 binomial standard errors sqrt(D(1 − D)/n) at every k (a 4-SE miss has
    probability 6e-5 per k; the seeds are fixed, so the test is deterministic)."""
    cfg = TestTimeConfig(methods=["sdpo"], lr=0.0, seeds=1024, attempts=64, tail=0.01)
    task, policy = family_task(0, 8, 6), TabularPolicy("markov", 8, 6)
    tau, p = success_threshold(task, policy, cfg.tail)
    hits = attempt_hits(cfg.run_config("sdpo", tau, (0, 512)), tau, lr=0.0).hits
    hits = torch.cat([hits, attempt_hits(cfg.run_config("sdpo", tau, (512, 512)), tau, lr=0.0).hits]).numpy()
    d = discovery.discovery_curve(discovery.first_hits(hits), cfg.attempts)
    want = discovery.best_of_k(p, cfg.attempts)
    se = np.sqrt(want * (1 - want) / cfg.seeds)
    assert np.all(np.abs(d - want) <= 4 * se)
    assert hits.mean() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / hits.size))


def test_learning_moves_the_curve_off_best_of_k():
    """The same runs with SDPO's default lr: the estimator can tell a method from best-of-k (here it beats it by
    more than 4 SE at the budget; if SDPO were worse this test would say so by failing, not hide it)."""
    cfg = TestTimeConfig(methods=["sdpo"], seeds=256, attempts=64, tail=0.01)
    task, policy = family_task(0, 8, 6), TabularPolicy("markov", 8, 6)
    tau, p = success_threshold(task, policy, cfg.tail)
    d = discovery.discovery_curve(discovery.first_hits(attempt_hits(cfg.run_config("sdpo", tau), tau).hits.numpy()), 64)
    want = discovery.best_of_k(p, 64)[-1]
    assert d[-1] - want > 4 * math.sqrt(want * (1 - want) / 256)


@pytest.mark.parametrize("method", ["sdpo", "grpo"])
def test_toy_loop_follows_train_run(method):
    """attempt_hits runs train.run_group's loop: after the same updates, each run's exact J equals the J that
    train.run records. Both are float64 sums of V**T = 256 terms from the same float32 θ, in different orders:
    they agree to ~256·eps64·|J| ≤ 1e-13."""
    cfg = TestTimeConfig(methods=[method], seeds=4, attempts=3 * 4, num_generations=4, vocab_size=4, seq_len=4, tail=0.05)
    task, policy = family_task(0, 4, 4), TabularPolicy("markov", 4, 4)
    tau, _ = success_threshold(task, policy, cfg.tail)
    rc = cfg.run_config(method, tau)
    theta = attempt_hits(rc, tau).theta
    J = exact.expected_reward(task.rewards, policy.seq_logprobs(theta.double()))
    h = run(rc).history
    recorded = torch.tensor(h[h.step == rc.steps].sort_values("seed").reward.to_numpy())
    J0 = float(exact.expected_reward(task.rewards, policy.seq_logprobs(policy.init_params(1).double()))[0])
    assert (J - J0).abs().min() > 1e-4  # the runs did update
    torch.testing.assert_close(J, recorded, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the helpers, by hand
def test_first_hits_and_curve_by_hand():
    hits = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    first = discovery.first_hits(hits)
    assert first.tolist() == [2.0, math.inf, 1.0, 3.0]
    assert discovery.discovery_curve(first, 3).tolist() == [0.25, 0.5, 0.75]


def test_attempts_to_reach_interpolates_between_integer_k():
    curve = np.array([0.1, 0.2, 0.3, 0.4])
    assert discovery.attempts_to_reach(curve, 0.25) == pytest.approx(2.5)
    assert discovery.attempts_to_reach(curve, 0.05) == pytest.approx(0.5)  # between D(0) = 0 and D(1) = 0.1
    assert discovery.attempts_to_reach(curve, 0.4) == pytest.approx(4.0)
    assert discovery.attempts_to_reach(curve, 0.5) == math.inf


def test_best_of_k_attempts_closed_form_and_pooled_prompts():
    assert discovery.best_of_k_attempts(0.5, 0.75) == pytest.approx(2.0)  # 1 − 0.5² = 0.75
    assert discovery.best_of_k_attempts([0.5, 0.5], 0.75) == pytest.approx(2.0, abs=1e-9)  # bisection, same answer
    assert discovery.best_of_k_attempts([0.5, 0.0], 0.25) == pytest.approx(1.0, abs=1e-9)  # 0.5·(1 − 0.5^k) = 0.25
    assert discovery.best_of_k_attempts([0.5, 0.0], 0.6) == math.inf  # half the prompts can never be solved
    assert discovery.best_of_k([0.5, 0.0], 2).tolist() == pytest.approx([0.25, 0.375])


def test_ratios_by_hand():
    """Best-of-k with p = 0.5 reaches 0.75 at k = 2 and 0.875 at k = 3. A method on the best-of-k curve has ratio 1;
    one that reaches 0.75 at k = 1 needs half the attempts there (ratio 2) and reaches 0.9 by K = 3 (best-of-k needs
    log(0.1)/log(0.5) = 3.32 attempts: budget ratio 3.32/3)."""
    same = discovery.ratios(np.array([0.5, 0.75, 0.875]), 0.5, [0.75])
    assert same["level_0.75"] == pytest.approx(1.0) and same["budget"] == pytest.approx(1.0)
    fast = discovery.ratios(np.array([0.75, 0.8, 0.9]), 0.5, [0.75, 0.95])
    assert fast["level_0.75"] == pytest.approx(2.0)
    assert fast["budget"] == pytest.approx(math.log(0.1) / math.log(0.5) / 3)
    assert fast["level_0.95"] == 0.0  # not reached within K: reported as 0, never dropped


def test_bootstrap_of_a_constant_sample_has_no_spread():
    first = np.ones(50)  # every run discovers at its first attempt
    out = discovery.bootstrap_ratios(first, 4, 0.5, [0.75], n_boot=100)
    assert out["level_0.75"]["value"] == pytest.approx(2.0 / 0.75)  # best-of-k needs 2; the method 0.75 (D(0) = 0 to D(1) = 1)
    assert out["level_0.75"]["lo"] == out["level_0.75"]["hi"] == out["level_0.75"]["value"]


def test_wilson_interval_known_values():
    """x = 0 of n = 10: the upper end is z²/(n + z²) = 0.2775 (Wilson 1927); x = n mirrors it."""
    lo, hi = discovery.wilson_interval(np.array([0, 10]), 10)
    z2 = discovery.Z95**2
    assert lo[0] == 0.0 and hi[0] == pytest.approx(z2 / (10 + z2))
    assert hi[1] == 1.0 and lo[1] == pytest.approx(1 - z2 / (10 + z2))


# ----------------------------------------------------------------------------- command lines
def _run(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as err:  # argparse's refusals
        return err.code


def test_toy_cli_small_run_writes_the_files(tmp_path, capsys):
    out = tmp_path / "tt"
    assert _run(sdpo_sim.cli.main, ["testtime", "--out", str(out), "--scale", "small", "--seeds", "16", "--no-progress"]) == 0
    table = pd.read_csv(out / "testtime.csv")
    assert list(table.columns) == list(discovery.COLUMNS)
    assert set(table.method) == {"best-of-k", "sdpo", "grpo", "reinforce"} and table.k.max() == 32
    assert (table.lo <= table.discovery + 1e-12).all() and (table.discovery <= table.hi + 1e-12).all()
    for _, rows in table.groupby("method"):
        assert np.all(np.diff(rows.discovery.to_numpy()) >= 0)  # a discovery never un-happens
    doc = json.loads((out / "testtime.json").read_text())
    assert 0 < doc["p"] <= 0.002 and set(doc["ratios"]) == {"sdpo", "grpo", "reinforce"} and len(doc["rows"]) == len(table)
    assert (out / "testtime_toy.png").stat().st_size > 0 and (out / "testtime_toy.svg").stat().st_size > 0
    assert "attempts ratio" in capsys.readouterr().out


BAD_TOY = [
    (["--attempts", "0"], "attempts"),
    (["--threshold", "1.0"], "threshold"),
    (["--threshold", "-0.1"], "threshold"),
    (["--tail", "0"], "tail"),
    (["--tail", "0.7"], "tail"),
    (["--num-generations", "1"], "num_generations"),
    (["--seeds", "0"], "seeds"),
    (["--methods", "[hybrid]"], "methods"),
    (["--levels", "[1.5]"], "levels"),
    (["--vocab-size", "64"], "vocab_size"),
]


@pytest.mark.parametrize("argv,name", BAD_TOY, ids=[" ".join(a) for a, _ in BAD_TOY])
def test_toy_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, name):
    out = tmp_path / "never"
    assert _run(sdpo_sim.cli.main, ["testtime", "--out", str(out), "--scale", "small", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdpo-sim testtime: error:") and name in err
    assert not out.exists()


BAD_LLM = [
    (["--attempts", "0"], "attempts"),
    (["--threshold", "1.5"], "threshold"),
    (["--model", "/nonexistent/model"], "model"),
    (["--pilot", "100"], "pilot"),
    (["--methods", "[sdpo, sdpo]"], "methods"),
]


@pytest.mark.parametrize("argv,name", BAD_LLM, ids=[" ".join(a) for a, _ in BAD_LLM])
def test_llm_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, name):
    out = tmp_path / "never"
    assert _run(llm.cli.main, ["testtime", "--out", str(out), "--scale", "small", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdpo-llm testtime: error:") and name in err
    assert not out.exists()


def test_llm_small_run_on_the_tiny_model(tmp_path, tiny_dir, one_thread, capsys):
    """The random tiny model (hidden 32, one layer) rarely scores ≥ 0.3 on the word task: the small scale finds hard
    prompts by its pilot rule, runs SDPO and GRPO between attempts and writes the table, its JSON twin and the figure."""
    out = tmp_path / "llm"
    rc = _run(llm.cli.main, ["testtime", "--out", str(out), "--scale", "small", "--model", str(tiny_dir), "--threshold", "0.3",
                             "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "testtime_llm.csv")
    assert set(table.method) == {"best-of-k", "sdpo", "grpo"} and table.k.max() == 8
    assert (table.lo <= table.discovery + 1e-12).all() and (table.discovery <= table.hi + 1e-12).all()
    doc = json.loads((out / "testtime_llm.json").read_text())
    assert 1 <= len(doc["prompts"]) <= 2 and all(0 <= p < 1 for p in doc["p"]) and len(doc["runs"]) == 2 * len(doc["prompts"]) * 3
    assert all(r["first_hit"] is None or 1 <= r["first_hit"] <= 8 for r in doc["runs"])
    assert (out / "testtime_llm.png").stat().st_size > 0
