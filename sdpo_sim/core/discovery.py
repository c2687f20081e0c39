"""Discovery curves of test-time search, one definition for both worlds (docs/testtime.md).

A *discovery* is the first attempt whose reward exceeds a threshold ``τ``. For a method run ``n`` times with a budget
of ``K`` attempts each, ``hits [n, K]`` says which attempts exceeded ``τ``; the discovery probability after ``k``
attempts is ``D(k) = P(min{j : hit_j} ≤ k)``. Best-of-k sampling from a fixed policy whose one attempt succeeds with
probability ``p`` has ``D(k) = 1 − (1 − p)^k`` exactly.

The *attempts ratio* at a matched discovery level ``L`` is ``k_best(L) / k_method(L)``: how many times more attempts
best-of-k needs than the method to reach ``L`` (above 1: the method is cheaper). ``k(L)`` is read off a curve by
linear interpolation between integer ``k`` (continuous in ``L``); best-of-k's is ``log(1 − L) / log(1 − p)``.
"""

from __future__ import annotations

import math
import textwrap
from typing import Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # figures are written to files, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from scipy import stats as sps  # noqa: E402

Z95 = float(sps.norm.ppf(0.975))  # 1.95996...: the two-sided 95% normal quantile
BEST_OF_K = "best-of-k"  # the baseline's method name in the tables and figures
COLUMNS = ("method", "k", "discovery", "lo", "hi", "runs")  # the tidy discovery table


def first_hits(hits: np.ndarray) -> np.ndarray:
    """1-based index of each run's first hit, ``[n, K]`` bool → ``[n]`` float (``inf`` for a run that never hit)."""
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[1] == 0:
        raise ValueError(f"hits must be a [runs, attempts] array with at least one attempt, got shape {hits.shape}")
    any_hit = hits.any(1)
    return np.where(any_hit, hits.argmax(1) + 1.0, np.inf)


def discovery_curve(first: np.ndarray, k_max: int) -> np.ndarray:
    """``D(k) = mean_i 1[first_i ≤ k]`` for ``k = 1..k_max``, ``[n]`` → ``[k_max]``."""
    first = np.asarray(first, dtype=float)
    if first.size == 0:
        raise ValueError("a discovery curve needs at least one run")
    return (first[:, None] <= np.arange(1, k_max + 1)[None, :]).mean(0)


def wilson_interval(successes: np.ndarray, n: int, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion ``x/n`` (Wilson 1927), elementwise:
    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``."""
    if n < 1:
        raise ValueError(f"n={n} runs: a proportion needs at least one")
    p = np.asarray(successes, dtype=float) / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    lo = np.where(p == 0, 0.0, np.clip(centre - half, 0, 1))  # exactly 0 and 1 at the ends (rounding leaves ~1e-17)
    return lo, np.where(p == 1, 1.0, np.clip(centre + half, 0, 1))


def check_probability(p: Union[float, Sequence[float]], what: str = "p") -> np.ndarray:
    """``p`` as a float array ``[m]`` (one probability per prompt) in [0, 1) with a positive mean: a best-of-k curve of
    p = 0 never rises, of p = 1 it is 1 from the first attempt."""
    arr = np.atleast_1d(np.asarray(p, dtype=float))
    if arr.ndim != 1 or arr.size == 0 or not np.all((arr >= 0) & (arr < 1)) or not arr.mean() > 0:
        raise ValueError(f"{what}={p!r} must be probabilities in [0, 1), not all 0")
    return arr


def best_of_k(p: Union[float, Sequence[float]], k_max: int) -> np.ndarray:
    """``D(k) = mean_i [1 − (1 − p_i)^k]`` for ``k = 1..k_max`` (one ``p``: ``1 − (1 − p)^k``; several: the pooled curve of
    prompts with success probabilities ``p_i``, each tried k times), as ``−expm1(k·log1p(−p_i))`` (exact for tiny p)."""
    arr = check_probability(p)
    k = np.arange(1, k_max + 1)[None, :]
    return -np.expm1(k * np.log1p(-arr)[:, None]).mean(0)


def best_of_k_attempts(p: Union[float, Sequence[float]], level: float) -> float:
    """Attempts (continuous k) best-of-k needs to reach discovery ``level``: ``log(1 − L) / log(1 − p)`` for one p; for
    several, the root of ``mean_i [1 − (1 − p_i)^k] = L`` by bisection (``inf`` when the prompts with p_i = 0 make L
    unreachable; NaN for a level outside (0, 1))."""
    arr = check_probability(p)
    if not 0 < level < 1:
        return math.nan
    if arr.size == 1:
        return math.log1p(-level) / math.log1p(-float(arr[0]))
    if np.mean(arr > 0) <= level:
        return math.inf
    f = lambda k: float(-np.expm1(k * np.log1p(-arr)).mean()) - level  # noqa: E731 — increasing in k
    lo, hi = 0.0, 1.0
    while f(hi) < 0:
        hi *= 2
    for _ in range(100):  # 100 halvings: far below one attempt's width
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def attempts_to_reach(curve: np.ndarray, level: float) -> float:
    """The ``k`` at which a curve ``D(1..K)`` first reaches ``level``, interpolated linearly between integer k (with
    ``D(0) = 0``); ``inf`` when the curve stays below it within its ``K`` attempts, NaN for a level outside (0, 1]."""
    if not 0 < level <= 1:
        return math.nan
    d = np.concatenate([[0.0], np.asarray(curve, dtype=float)])
    above = np.nonzero(d >= level)[0]
    if above.size == 0:
        return math.inf
    k = int(above[0])  # ≥ 1 since D(0) = 0 < level
    lo, hi = d[k - 1], d[k]
    return (k - 1) + (level - lo) / (hi - lo)


def ratios(curve: np.ndarray, p: Union[float, Sequence[float]], levels: Sequence[float]) -> dict[str, float]:
    """The attempts ratios of one method's curve ``D(1..K)`` against best-of-k with success probability ``p``:

    - ``budget``: ``k_best(D(K)) / K``, best-of-k's attempts to reach what the method reached at its budget, per
      method attempt;
    - ``level_L`` for each ``L``: ``k_best(L) / k_method(L)`` (0 when the method does not reach L within K; NaN when
      best-of-k's level is undefined).
    """
    K = len(curve)
    out = {"budget": best_of_k_attempts(p, float(curve[-1])) / K}
    for level in levels:
        k_m = attempts_to_reach(curve, level)
        out[f"level_{level:g}"] = best_of_k_attempts(p, level) / k_m if k_m > 0 else math.nan
    return out


def bootstrap_ratios(first: np.ndarray, k_max: int, p: Union[float, Sequence[float]], levels: Sequence[float], *,
                     p_trials: Optional[Union[int, Sequence[int]]] = None, groups: Optional[np.ndarray] = None,
                     n_boot: int = 2000, seed: int = 0, level_ci: float = 0.95) -> dict[str, dict[str, float]]:
    """Point value and percentile-bootstrap CI of :func:`ratios`: ``{name: {"value", "lo", "hi", "unreached"}}``.

    Each draw resamples the method's runs (``first`` ``[n]``) with replacement, within each of ``groups`` (``[n]``, the
    prompt of each run, so each prompt keeps its weight) when given. With ``p_trials`` (each ``p_i`` estimated from that
    many fixed-policy attempts, the LLM case) it also redraws ``p*_i ~ Binomial(p_trials_i, p_i)/p_trials_i``. A draw in
    which the method does not reach a level within ``K`` gives that level's ratio 0 (kept: it is a true lower bound);
    ``unreached`` is their share. Draws whose baseline is undefined (every ``p*_i`` = 0) are skipped."""
    first = np.asarray(first, dtype=float)
    p_arr = np.atleast_1d(np.asarray(p, dtype=float))
    trials = None if p_trials is None else np.broadcast_to(np.asarray(p_trials), p_arr.shape)
    groups = np.zeros(first.size, dtype=int) if groups is None else np.asarray(groups)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    point = ratios(discovery_curve(first, k_max), p, levels)
    draws = {name: [] for name in point}
    for _ in range(n_boot):
        sample = first[np.concatenate([idx[rng.integers(0, idx.size, idx.size)] for idx in members])]
        p_b = p_arr if trials is None else rng.binomial(trials, p_arr) / trials
        if not p_b.mean() > 0:
            continue
        for name, value in ratios(discovery_curve(sample, k_max), p_b if p_b.size > 1 else float(p_b[0]), levels).items():
            draws[name].append(value)
    q = (1 - level_ci) / 2
    out = {}
    for name, value in point.items():
        v = np.asarray(draws[name], dtype=float)
        v = v[~np.isnan(v)]  # undefined draws (best-of-k's level ≥ 1: a method that discovered in every run)
        # inverted_cdf: order statistics, no interpolation (a draw may be inf: best-of-k cannot reach D = 1 with some p_i = 0)
        lo, hi = (float(np.quantile(v, q, method="inverted_cdf")), float(np.quantile(v, 1 - q, method="inverted_cdf"))) if v.size else (math.nan, math.nan)
        out[name] = {"value": value, "lo": lo, "hi": hi, "unreached": float(np.mean(v == 0)) if v.size else math.nan}
    return out


def curve_table(method: str, first: np.ndarray, k_max: int) -> pd.DataFrame:
    """One method's tidy rows ``COLUMNS``: ``D(k)`` with its 95% Wilson interval over the ``n`` runs, ``k = 1..k_max``."""
    n = len(first)
    d = discovery_curve(first, k_max)
    lo, hi = wilson_interval(np.rint(d * n), n)
    return pd.DataFrame({"method": method, "k": np.arange(1, k_max + 1), "discovery": d, "lo": lo, "hi": hi, "runs": n})


def best_of_k_table(p: Union[float, Sequence[float]], k_max: int, *, p_trials: Optional[Union[int, Sequence[int]]] = None,
                    n_boot: int = 2000, seed: int = 0, level_ci: float = 0.95) -> pd.DataFrame:
    """Best-of-k's rows ``COLUMNS``. Exact ``p`` (``p_trials=None``): ``lo = hi = D(k)``, ``runs`` 0. Estimated ``p_i``
    (from ``p_trials`` attempts each): a parametric-bootstrap band, the pointwise ``(1 ± level_ci)/2`` quantiles of
    ``mean_i [1 − (1 − p*_i)^k]`` over ``n_boot`` draws ``p*_i ~ Binomial(p_trials_i, p_i)/p_trials_i`` (the same draws
    :func:`bootstrap_ratios` makes); ``runs`` the fixed-policy attempts summed over prompts."""
    d = best_of_k(p, k_max)
    k = np.arange(1, k_max + 1)
    if p_trials is None:
        return pd.DataFrame({"method": BEST_OF_K, "k": k, "discovery": d, "lo": d, "hi": d, "runs": 0})
    p_arr = np.atleast_1d(np.asarray(p, dtype=float))
    trials = np.broadcast_to(np.asarray(p_trials), p_arr.shape)
    rng = np.random.default_rng(seed)
    draws = rng.binomial(trials, p_arr, size=(n_boot, p_arr.size)) / trials  # [n_boot, m]
    curves = -np.expm1(k[None, None, :] * np.log1p(-draws)[:, :, None]).mean(1)  # [n_boot, K]
    q = (1 - level_ci) / 2
    return pd.DataFrame({"method": BEST_OF_K, "k": k, "discovery": d, "lo": np.quantile(curves, q, axis=0),
                         "hi": np.quantile(curves, 1 - q, axis=0), "runs": int(trials.sum())})


def plot_discovery(table: pd.DataFrame, *, colors: Optional[Mapping[str, str]] = None, title: str = "",
                   levels: Sequence[float] = (), ylabel: str = "P(discovered R > τ within k attempts)") -> plt.Figure:
    """Discovery probability vs attempts, one line and 95% band per method (``table``: rows :data:`COLUMNS`), dotted
    horizontal lines at the matched ``levels``. ``colors``: ``{method: colour}`` (default seaborn's "colorblind")."""
    methods = list(dict.fromkeys(table["method"]))
    colors = dict(colors or dict(zip(methods, sns.color_palette("colorblind", len(methods)))))
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        rows = table[table["method"] == method]
        ax.fill_between(rows["k"], rows["lo"], rows["hi"], color=colors[method], alpha=0.2, linewidth=0)
        sns.lineplot(x=rows["k"], y=rows["discovery"], ax=ax, color=colors[method], label=method, errorbar=None)
    for level in levels:
        ax.axhline(level, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("attempts k (sampled completions)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(1, int(table["k"].max()))
    ax.set_ylim(0, min(1.0, float(table["hi"].max()) * 1.1 + 0.02))
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.legend(title="method (95% CI band)")
    fig.tight_layout()
    return fig
