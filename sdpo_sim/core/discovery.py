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
from typing import Mapping, Optional, Sequence

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
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def check_probability(p: float, what: str = "p") -> float:
    """``p`` as a float in (0, 1) (a best-of-k curve of p = 0 never rises; of p = 1 it is 1 from the first attempt)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p < 1:
        raise ValueError(f"{what}={p!r} must be a probability in (0, 1)")
    return float(p)


def best_of_k(p: float, k_max: int) -> np.ndarray:
    """``1 − (1 − p)^k`` for ``k = 1..k_max`` (as ``−expm1(k·log1p(−p))``, exact to rounding for tiny p)."""
    p = check_probability(p)
    return -np.expm1(np.arange(1, k_max + 1) * math.log1p(-p))


def best_of_k_attempts(p: float, level: float) -> float:
    """Attempts best-of-k needs to reach discovery ``level``: ``log(1 − L) / log(1 − p)`` (continuous k)."""
    p = check_probability(p)
    if not 0 < level < 1:
        return math.nan
    return math.log1p(-level) / math.log1p(-p)


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


def ratios(curve: np.ndarray, p: float, levels: Sequence[float]) -> dict[str, float]:
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


def bootstrap_ratios(first: np.ndarray, k_max: int, p: float, levels: Sequence[float], *, p_trials: Optional[int] = None,
                     n_boot: int = 2000, seed: int = 0, level_ci: float = 0.95) -> dict[str, dict[str, float]]:
    """Point value and percentile-bootstrap CI of :func:`ratios`: ``{name: {"value", "lo", "hi", "unreached"}}``.

    Each draw resamples the method's runs (``first`` ``[n]``) with replacement; with ``p_trials`` (``p`` estimated from
    that many fixed-policy attempts, the LLM case) it also redraws ``p* ~ Binomial(p_trials, p)/p_trials`` (a draw of 0
    becomes ``0.5/p_trials``, the usual continuity correction). ``unreached`` is the share of draws in which the method
    did not reach the level (their ratio 0 is kept: it is a true "fewer than" lower bound, never dropped)."""
    first = np.asarray(first, dtype=float)
    rng = np.random.default_rng(seed)
    point = ratios(discovery_curve(first, k_max), p, levels)
    draws = {name: [] for name in point}
    for _ in range(n_boot):
        sample = first[rng.integers(0, first.size, first.size)]
        p_b = p if p_trials is None else max(rng.binomial(p_trials, p), 0.5) / p_trials
        for name, value in ratios(discovery_curve(sample, k_max), min(p_b, 1 - 1e-12), levels).items():
            draws[name].append(value)
    q = (1 - level_ci) / 2
    out = {}
    for name, value in point.items():
        v = np.asarray(draws[name], dtype=float)
        out[name] = {"value": value, "lo": float(np.nanquantile(v, q)), "hi": float(np.nanquantile(v, 1 - q)),
                     "unreached": float(np.mean(v == 0))}
    return out


def curve_table(method: str, first: np.ndarray, k_max: int) -> pd.DataFrame:
    """One method's tidy rows ``COLUMNS``: ``D(k)`` with its 95% Wilson interval over the ``n`` runs, ``k = 1..k_max``."""
    n = len(first)
    d = discovery_curve(first, k_max)
    lo, hi = wilson_interval(np.rint(d * n), n)
    return pd.DataFrame({"method": method, "k": np.arange(1, k_max + 1), "discovery": d, "lo": lo, "hi": hi, "runs": n})


def best_of_k_table(p: float, k_max: int, *, p_trials: Optional[int] = None) -> pd.DataFrame:
    """Best-of-k's rows ``COLUMNS``. Exact ``p`` (``p_trials=None``): ``lo = hi = D(k)``, ``runs`` 0. Estimated ``p``
    (``p_trials`` attempts): the curve at the ends of ``p``'s Wilson interval (``D`` is monotone in p)."""
    d = best_of_k(p, k_max)
    if p_trials is None:
        return pd.DataFrame({"method": BEST_OF_K, "k": np.arange(1, k_max + 1), "discovery": d, "lo": d, "hi": d, "runs": 0})
    p_lo, p_hi = wilson_interval(np.array(round(p * p_trials)), p_trials)
    lo = best_of_k(float(p_lo), k_max) if p_lo > 0 else np.zeros(k_max)
    return pd.DataFrame({"method": BEST_OF_K, "k": np.arange(1, k_max + 1), "discovery": d, "lo": lo,
                         "hi": best_of_k(min(float(p_hi), 1 - 1e-12), k_max), "runs": p_trials})


def plot_discovery(table: pd.DataFrame, *, colors: Optional[Mapping[str, str]] = None, title: str = "",
                   levels: Sequence[float] = ()) -> plt.Figure:
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
    ax.set_ylabel("P(discovered R > τ within k attempts)")
    ax.set_xlim(1, int(table["k"].max()))
    ax.set_ylim(0, min(1.0, float(table["hi"].max()) * 1.1 + 0.02))
    ax.set_title(title, fontsize=9)
    ax.legend(title="method (95% CI band)")
    fig.tight_layout()
    return fig
