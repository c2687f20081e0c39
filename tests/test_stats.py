"""Statistics on synthetic tables with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sdpo_sim.stats import (auc, bootstrap_ci, entropy_at_matched_reward, first_crossing, interquartile_mean, paired_difference,
                            per_seed_metrics, performance_profile, probability_of_improvement, summarize, value_at_budget)


def test_bootstrap_ci_brackets_the_mean_shrinks_with_n_and_is_reproducible():
    rng = np.random.default_rng(0)
    small, big = rng.normal(1.0, 1.0, 10), rng.normal(1.0, 1.0, 1000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi and bootstrap_ci(small) == (m, lo, hi)
    mb, lob, hib = bootstrap_ci(big)
    assert hib - lob < (hi - lo) / 5 and lob < 1.0 < hib
    assert np.isnan(bootstrap_ci([3.0])[1]) and bootstrap_ci([3.0])[0] == 3.0
    assert np.isnan(bootstrap_ci([np.nan, np.nan])[0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(small, level=95)


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = sum(lo <= 0.0 <= hi for lo, hi in (bootstrap_ci(rng.normal(0, 1, 30), n_boot=500, seed=i)[1:] for i in range(300)))
    assert 0.88 <= hits / 300 <= 0.99


def test_one_task_is_the_ordinary_bootstrap_draw_for_draw():
    x = np.random.default_rng(3).normal(0, 1, 12)
    assert bootstrap_ci(x, tasks=[7] * 12) == bootstrap_ci(x)


def test_hierarchical_ci_includes_the_variance_between_tasks():
    # 8 tasks whose means differ by N(0, 1), 10 seeds each with tiny seed noise: a CI over seeds alone would be
    # far too narrow for "tasks in general"; the two-stage CI must be about as wide as the task spread says
    rng = np.random.default_rng(4)
    task_means = rng.normal(0, 1, 8)
    values = np.concatenate([m + rng.normal(0, 0.01, 10) for m in task_means])
    tasks = np.repeat(np.arange(8), 10)
    m, lo, hi = bootstrap_ci(values, tasks=tasks)
    _, flat_lo, flat_hi = bootstrap_ci(values)
    se_tasks = task_means.std(ddof=1) / np.sqrt(8)  # the standard error of a mean over 8 tasks
    assert m == pytest.approx(task_means.mean(), abs=0.01)
    assert 2.5 * se_tasks < hi - lo < 5 * se_tasks  # a 95% interval spans ≈ 3.9 standard errors
    assert flat_hi - flat_lo < hi - lo  # the one-level bootstrap over 80 units is narrower
    with pytest.raises(ValueError, match="one task label per value"):
        bootstrap_ci(values, tasks=tasks[:5])


def test_summarize_counts_tasks_and_resamples_them():
    frame = pd.DataFrame({"task_seed": np.repeat([0, 1, 2], 4), "x": [1.0] * 4 + [2.0] * 4 + [6.0] * 4})
    row = summarize(frame, "x").iloc[0]
    assert row["n"] == 12 and row["n_tasks"] == 3 and row["mean"] == pytest.approx(3.0)
    assert row["ci_lo"] < 2.0 and row["ci_hi"] > 4.0  # seeds are identical within a task: all width is between tasks


def test_interquartile_mean_drops_the_outer_quarters():
    assert interquartile_mean([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(3.5)  # mean of 2, 3, 4, 5
    assert np.isnan(interquartile_mean([np.nan]))


def test_probability_of_improvement_is_per_task_then_averaged():
    frame = pd.DataFrame({"task_seed": [0] * 4 + [1] * 4, "arm": ["a", "a", "b", "b"] * 2,
                          "x": [2.0, 3.0, 0.0, 1.0,   0.0, 1.0, 0.0, 1.0]})
    # task 0: every a beats every b (1.0); task 1: identical values (two ties of 4 pairs, and a wins 1: (1 + 2·½)/4 = 0.5)
    assert probability_of_improvement(frame, "x", "arm", "a", "b") == pytest.approx(0.75)
    assert probability_of_improvement(frame, "x", "arm", "b", "a") == pytest.approx(0.25)


def test_performance_profile_is_the_fraction_above_each_threshold():
    assert list(performance_profile([0.1, 0.5, 0.9, np.nan], [0.0, 0.5, 1.0])) == pytest.approx([1.0, 1 / 3, 0.0])


def test_paired_difference_matches_seeds_and_removes_shared_noise():
    rng = np.random.default_rng(2)
    rows = []
    for task in (0, 1):
        for seed in range(12):
            shared = rng.normal(0, 1.0)  # seed-level luck both methods share
            rows += [{"method": "a", "task_seed": task, "seed": seed, "r": shared + 0.1},
                     {"method": "b", "task_seed": task, "seed": seed, "r": shared + rng.normal(0, 0.01)}]
    rows.append({"method": "a", "task_seed": 5, "seed": 0, "r": 100.0})  # unpaired: dropped
    out = paired_difference(pd.DataFrame(rows), "r", "method", "a", "b")
    assert out["n"].item() == 24 and out["comparison"].item() == "method: a − b"
    assert out["ci_lo"].item() > 0.09 and out["ci_hi"].item() < 0.11
    unpaired = summarize(pd.DataFrame(rows[:-1]), "r", ["method"])
    assert (unpaired["ci_hi"] - unpaired["ci_lo"]).min() > 0.3  # without pairing the 0.1 gap is buried


def test_auc_budgets_and_crossings():
    steps, vals = [0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0]
    assert auc(steps, vals) == pytest.approx(1.5)
    assert auc([0, 10], [1.0, 1.0]) == 1.0
    assert value_at_budget(steps, vals, 25) == 2.0 and value_at_budget(steps, vals, "last") == 3.0
    assert np.isnan(value_at_budget(steps, vals, 100))
    with pytest.raises(ValueError, match="budget"):
        value_at_budget(steps, vals, "first")
    assert first_crossing(steps, vals, 1.5, [2.0, 1.8, 1.6, 1.4]) == pytest.approx(1.7)
    assert np.isnan(first_crossing(steps, vals, 5.0, vals))


def _history():
    rows = []
    for run_id, method, slope in (("r1", "fast", 0.02), ("r2", "never", 0.0)):
        for seed in (0, 1):
            for step in range(0, 101, 10):
                reward = 0.2 + slope * step
                rows.append({"run_id": run_id, "method": method, "seed": seed, "step": step, "reward": reward,
                             "entropy": 2.0 - reward, "credit_pearson": 0.3, "kl_init": step / 100})
    return pd.DataFrame(rows)


def test_per_seed_metrics_columns_and_values():
    ps = per_seed_metrics(_history())
    assert len(ps) == 4 and set(ps.method) == {"fast", "never"}
    fast = ps[ps.method == "fast"].iloc[0]
    assert fast.final_reward == pytest.approx(2.2) and fast.reward_at_30 == pytest.approx(0.8)
    assert fast.auc == pytest.approx(1.2) and fast.entropy_drop == pytest.approx(1 - (2 - 2.2) / 1.8)
    assert fast.credit_corr == pytest.approx(0.3) and np.isnan(fast.grad_cos)


def test_entropy_at_matched_reward_excludes_runs_that_never_get_there():
    out = entropy_at_matched_reward(_history(), [0.2, 1.0])
    fast = out[(out.method == "fast") & (out.level == 1.0)].iloc[0]
    assert fast["mean"] == pytest.approx(1.0) and fast["n_missing"] == 0
    never = out[(out.method == "never") & (out.level == 1.0)].iloc[0]
    assert np.isnan(never["mean"]) and never["n_missing"] == 2 and never["n"] == 0
    with pytest.raises(ValueError, match="'reward'"):
        entropy_at_matched_reward(_history().drop(columns="reward"), [0.5])
