"""Statistics over tasks and seeds: bootstrap CIs, paired differences, budgets, AUC, entropy at matched
reward, and the aggregates of Agarwal et al. (2021, "rliable"): interquartile mean, probability of
improvement, performance profiles.

Everything here works on the tidy tables a sweep writes (``sdpo_sim.sweep``): ``history`` has one
row per (run, seed, evaluation step); :func:`per_seed_metrics` reduces it to one row per
(run, seed) — the *unit*. When the units come from several tasks (``task_seed``), CIs come from a
two-stage (hierarchical) bootstrap — tasks, then seeds within each drawn task — so that they include
the variance between tasks; with one task it is the ordinary bootstrap over seeds, draw for draw.

Why not a library's resampling: ``scipy.stats.bootstrap`` resamples one level only, and rliable's
stratified bootstrap resamples runs *within* each task but never the tasks, so neither puts task
variance into a CI. The point statistics come from scipy (``trim_mean``, ``mannwhitneyu``).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from scipy import stats as sps

CI_LEVEL = 0.95
N_BOOT = 4000
BUDGETS: tuple[Union[int, str], ...] = (10, 30, 100, "last")
UNIT = ("run_id", "seed")  # one training run of one seed
PAIR_ON = ("task_seed", "seed")  # paired comparisons match these
TASK = "task_seed"  # the column that names a unit's task: the outer level of the bootstrap


def bootstrap_ci(values: Iterable[float], *, level: float = CI_LEVEL, n_boot: int = N_BOOT, seed: int = 0,
                 tasks: Optional[Iterable] = None) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI of the mean: ``(mean, lo, hi)``; NaN bounds when n < 2.

    Non-finite values are dropped. Without ``tasks`` (or with one task): ``x̄*_b = mean(x[i_b])``,
    ``i_b ~ U{0..n−1}^n``. With ``tasks`` (one label per value, K ≥ 2 tasks), two stages: for each task k a
    resampled seed mean ``m*_{b,k}`` (n_k draws from its own values), then ``x̄*_b = mean_j m*_{b, k_j}`` over
    K tasks drawn with replacement — the estimand is the mean over tasks of each task's mean. Bounds are the
    ``(1±level)/2`` quantiles of ``x̄*``. With K ≥ 2 tasks and one value each it is the bootstrap over tasks.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must lie in (0, 1)")
    x = np.asarray(list(values), dtype=float)
    labels = None if tasks is None else np.asarray(list(tasks))
    if labels is not None and labels.shape != x.shape:
        raise ValueError(f"tasks has {labels.size} labels for {x.size} values; give one task label per value")
    keep = np.isfinite(x)
    x = x[keep]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    groups = [x] if labels is None else [x[labels[keep] == k] for k in pd.unique(labels[keep])]
    mean = float(x.mean()) if len(groups) == 1 else float(np.mean([g.mean() for g in groups]))
    if x.size < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.stack([g[rng.integers(0, g.size, size=(n_boot, g.size))].mean(axis=1) for g in groups], axis=1)  # [n_boot, K]
    pick = rng.integers(0, len(groups), size=(n_boot, len(groups))) if len(groups) > 1 else np.zeros((n_boot, 1), dtype=int)
    boot = np.take_along_axis(means, pick, axis=1).mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(lo), float(hi)


def summarize(frame: pd.DataFrame, value: str, by: Sequence[str] = (), **kwargs) -> pd.DataFrame:
    """Mean, 95% bootstrap CI and count of ``value`` per group of ``by`` (one row per group); hierarchical over
    tasks and seeds (:func:`bootstrap_ci`) where the group's units come from several ``task_seed`` values.
    ``n_tasks`` counts them."""
    _require(frame, [value, *by], "summarize")
    rows = []
    groups = frame.groupby(list(by), dropna=False, sort=True) if by else [((), frame)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        finite = np.isfinite(part[value].astype(float))
        tasks = part[TASK] if TASK in part and TASK not in by else None
        mean, lo, hi = bootstrap_ci(part[value], tasks=tasks, **kwargs)
        n_tasks = int(part.loc[finite, TASK].nunique()) if tasks is not None else 1
        rows.append({**dict(zip(by, key)), "mean": mean, "ci_lo": lo, "ci_hi": hi, "n": int(finite.sum()), "n_tasks": n_tasks})
    return pd.DataFrame(rows, columns=[*by, "mean", "ci_lo", "ci_hi", "n", "n_tasks"])


def paired_difference(
    frame: pd.DataFrame,
    value: str,
    column: str,
    a: object,
    b: object,
    *,
    by: Sequence[str] = (),
    on: Sequence[str] = PAIR_ON,
    **kwargs,
) -> pd.DataFrame:
    """``value[column=a] − value[column=b]`` matched on ``on`` (shared task seeds and seeds), per ``by``.

    Rows of either side that have no partner are dropped (``n`` counts pairs). If a side has several
    rows for one key (e.g. other conditions not in ``by``), they are averaged first.
    """
    _require(frame, [value, column, *by, *on], "paired_difference")
    keys = [*by, *on]
    side_a = frame[frame[column] == a].groupby(keys, dropna=False)[value].mean()
    side_b = frame[frame[column] == b].groupby(keys, dropna=False)[value].mean()
    diff = (side_a - side_b).dropna().rename("diff").reset_index()
    out = summarize(diff, "diff", by, **kwargs) if len(diff) else pd.DataFrame(columns=[*by, "mean", "ci_lo", "ci_hi", "n", "n_tasks"])
    out.insert(len(by), "comparison", f"{column}: {a} − {b}")
    return out


# ----------------------------------------------------------------------------- aggregates across tasks (rliable's)
def interquartile_mean(values: Iterable[float]) -> float:
    """IQM: the mean of the middle 50% of the values (``scipy.stats.trim_mean(x, 0.25)``; Agarwal et al. 2021).
    Robust to a few outlying runs, less noisy than the median. Non-finite values are dropped."""
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    return float(sps.trim_mean(x, 0.25)) if x.size else float("nan")


def probability_of_improvement(frame: pd.DataFrame, value: str, column: str, a: object, b: object, *, task: str = TASK) -> float:
    """``P(X_a > X_b)`` averaged over tasks: per task, the Mann–Whitney statistic ``U/(n_a·n_b)`` of ``a``'s runs
    against ``b``'s (ties count ½); then the mean over the tasks where both were run. 0.5 = no difference."""
    _require(frame, [value, column, task], "probability_of_improvement")
    per_task = []
    for _, part in frame.groupby(task, sort=True):
        xa = part.loc[part[column] == a, value].astype(float).to_numpy()
        xb = part.loc[part[column] == b, value].astype(float).to_numpy()
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
        if xa.size and xb.size:
            per_task.append(sps.mannwhitneyu(xa, xb, alternative="two-sided").statistic / (xa.size * xb.size))
    return float(np.mean(per_task)) if per_task else float("nan")


def performance_profile(values: Iterable[float], thresholds: Sequence[float]) -> np.ndarray:
    """Fraction of runs whose value exceeds each threshold τ: ``[len(thresholds)]`` (a survival curve of scores)."""
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    if not x.size:
        return np.full(len(thresholds), np.nan)
    return (x[None, :] > np.asarray(thresholds, dtype=float)[:, None]).mean(axis=1)


def _sorted_curve(steps: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """One curve as ``[1, steps]`` rows sorted by step (what the row functions below take)."""
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(s, kind="stable")
    return s[order][None], v[order][None]


def auc_rows(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Normalised area under each curve, ``(1/(s_last − s_0)) ∫ value d step`` (trapezoid) — a mean reward over the
    budget: ``[units, steps]`` arrays, steps sorted within each row → ``[units]`` (the plain mean where the span is 0)."""
    span = steps[:, -1] - steps[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        area = np.sum((values[:, 1:] + values[:, :-1]) / 2 * np.diff(steps, axis=1), axis=1) / span
    return np.where((span == 0) | (steps.shape[1] == 1), values.mean(1), area)


def auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """:func:`auc_rows` of one curve (any step order)."""
    return float(auc_rows(*_sorted_curve(steps, values))[0])


def values_at_budget_rows(steps: np.ndarray, values: np.ndarray, budget: Union[int, str]) -> np.ndarray:
    """Value at the last evaluation step ≤ ``budget`` ("last": the final step) of each curve, NaN where the budget
    exceeds the run: ``[units, steps]`` arrays, steps sorted within each row → ``[units]``."""
    if budget == "last":
        return values[:, -1]
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget={budget!r} must be a non-negative integer step or 'last'")
    at = (steps <= budget).sum(1) - 1  # the last evaluation step <= budget
    return np.where(budget > steps[:, -1], np.nan, values[np.arange(len(values)), np.maximum(at, 0)])


def value_at_budget(steps: Sequence[float], values: Sequence[float], budget: Union[int, str]) -> float:
    """:func:`values_at_budget_rows` of one curve (any step order)."""
    return float(values_at_budget_rows(*_sorted_curve(steps, values), budget)[0])


def first_crossing(steps: Sequence[float], values: Sequence[float], level: float, other: Sequence[float]) -> float:
    """``other`` linearly interpolated at the first step where ``values`` reaches ``level``; NaN if never."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    o = np.asarray(other, dtype=float)
    order = np.argsort(s)
    s, v, o = s[order], v[order], o[order]
    hit = np.nonzero(v >= level)[0]
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0:
        return float(o[0])
    w = (level - v[i - 1]) / (v[i] - v[i - 1])  # v[i-1] < level <= v[i]
    return float(o[i - 1] + w * (o[i] - o[i - 1]))


def per_seed_metrics(history: pd.DataFrame, budgets: Sequence[Union[int, str]] = BUDGETS, keep: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per (run, seed): budgets, AUC, initial/final entropy, entropy drop, mean credit correlation.

    Args:
        history: tidy ``[runs × seeds × eval steps]`` rows with at least ``run_id, seed, step, reward, entropy``.
        keep: extra columns constant within a run to carry over (default: every column that is).
    Columns: ``reward_at_<b>`` for each budget, ``final_reward``, ``auc``, ``entropy_initial``,
    ``entropy`` (final), ``entropy_drop`` (``1 − H_final/H_0``), ``credit_corr`` (mean Pearson over evaluation steps
    of the credit the update uses: SDPO's distillation signal, the policy gradient's advantage), ``credit_corr_within``,
    ``feedback_credit_corr`` (the same for the feedback credit, distilling methods only), ``grad_cos``, ``alpha_mix``
    (means over steps), ``kl_init`` (final).
    """
    _require(history, [*UNIT, "step", "reward", "entropy"], "per_seed_metrics")
    if keep is None:
        constant = history.groupby("run_id", sort=False).nunique(dropna=False).max() <= 1
        keep = [c for c in history.columns if constant.get(c, False) and c not in (*UNIT, "step")]
    # Vectorised over the (run, seed) units, in order of first appearance: each unit's rows sorted by step, units of equal
    # length stacked into [units, steps] arrays; every number is the same numpy reduction of one unit's row as before.
    unit = history.groupby(list(UNIT), sort=False).ngroup().to_numpy()
    order = np.lexsort((history["step"].to_numpy(), unit))
    h = history.iloc[order]
    sizes = np.bincount(unit)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    first = h.iloc[starts]
    out: dict[str, Any] = {"run_id": first["run_id"].tolist(), "seed": first["seed"].tolist(), **{c: first[c].tolist() for c in keep}}
    metrics: dict[str, np.ndarray] = {}
    names = [f"reward_at_{b}" for b in budgets] + ["final_reward", "initial_reward", "auc", "entropy_initial", "entropy", "entropy_drop",
                                                  "credit_corr", "credit_corr_within", "feedback_credit_corr", "grad_cos", "alpha_mix", "kl_init"]
    for name in names:
        metrics[name] = np.full(len(sizes), np.nan)
    last_step = np.zeros(len(sizes), dtype=np.int64)
    for size in np.unique(sizes):
        units = np.nonzero(sizes == size)[0]
        rows = starts[units][:, None] + np.arange(size)  # [units, steps]
        column = lambda c: h[c].to_numpy(dtype=float)[rows]  # noqa: E731
        s, r, e = column("step"), column("reward"), column("entropy")
        for b in budgets:
            metrics[f"reward_at_{b}"][units] = values_at_budget_rows(s, r, b)
        metrics["final_reward"][units], metrics["initial_reward"][units] = r[:, -1], r[:, 0]
        metrics["auc"][units] = auc_rows(s, r)
        metrics["entropy_initial"][units], metrics["entropy"][units] = e[:, 0], e[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            metrics["entropy_drop"][units] = np.where(e[:, 0] > 0, 1 - e[:, -1] / e[:, 0], np.nan)
        for name, col in (("credit_corr", "credit_pearson"), ("credit_corr_within", "credit_pearson_within"),
                          ("feedback_credit_corr", "feedback_credit_pearson"), ("grad_cos", "grad_cos"), ("alpha_mix", "alpha_mix")):
            if col in h:
                x = column(col)
                seen = ~np.isnan(x).all(1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a unit without any value stays NaN
                    metrics[name][units] = np.where(seen, np.nanmean(x, axis=1), np.nan)
        if "kl_init" in h:
            metrics["kl_init"][units] = column("kl_init")[:, -1]
        last_step[units] = s[:, -1].astype(np.int64)
    return pd.DataFrame({**out, **metrics, "last_step": last_step})


def entropy_at_matched_reward(history: pd.DataFrame, levels: Sequence[float], by: Sequence[str] = ("method",), **kwargs) -> pd.DataFrame:
    """Per-token entropy at the first step each (run, seed) reaches reward ``level``; mean and CI per ``by`` × level.

    Runs that never reach a level are excluded from that level and counted in ``n_missing``: a method
    that never learned keeps maximal entropy, so comparing it at equal *steps* would flatter it.
    """
    _require(history, [*UNIT, "step", "reward", "entropy", *by], "entropy_at_matched_reward")
    rows = []
    for (run_id, seed), g in history.groupby(list(UNIT), sort=False):
        for level in levels:
            rows.append({**{c: g[c].iloc[0] for c in by}, "level": float(level),
                         "entropy": first_crossing(g["step"], g["reward"], level, g["entropy"])})
    frame = pd.DataFrame(rows)
    out = summarize(frame, "entropy", [*by, "level"], **kwargs)
    missing = frame.assign(miss=frame["entropy"].isna()).groupby([*by, "level"], dropna=False)["miss"].sum().reset_index(name="n_missing")
    return out.merge(missing, on=[*by, "level"], how="left")


def _require(frame: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: the table has no column(s) {', '.join(map(repr, missing))}; it has {', '.join(map(str, frame.columns))}")
