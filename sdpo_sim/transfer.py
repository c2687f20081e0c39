"""Predicted vs observed: does the toy world, at the calibrated ρ, rank a grid of configurations as the LLM does?

The LLM side is an ``sdpo-llm grid`` directory (``llm/grid.py``): one record ``runs/<id>.json`` per point (its overrides
and resolved recipe) and the run's ``runs/<id>/metrics.jsonl`` (one row per training step: the rollout batch's mean
reward and per-token entropy). ``sdpo_sim`` reads these files; it never imports ``llm``. The toy side simulates every
point with the same method block (the recipe's ``method:`` is exactly a MethodConfig, promote's translation read
backwards), the same feedback channel and judge noise, and the channel's calibrated ρ.

Per seed, over the ``K`` logged rollouts (LLM steps 1…K; toy: the exact reward of the policies that sampled them,
steps 0…K−1): ``auc`` = the mean reward over the rollouts, ``final_reward`` and ``entropy`` = the last rollout's.
Agreement: Kendall's τ_b of the point means of the two worlds (:func:`kendall_tau`, ``scipy.stats.kendalltau``) with a
percentile CI from resampling seeds within every point in both worlds (:func:`bootstrap_tau`), and the sign agreement
of the paired method differences per channel × noise (:func:`pairwise_differences`, :func:`sign_agreement`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from .train import RunConfig, run

POINT = ("method", "feedback", "noise")
METRICS = ("auc", "final_reward", "entropy")
PAIRS = (("sdpo", "grpo"), ("hybrid", "grpo"), ("sdpo", "hybrid"))  # the claims report's method contrasts


def read_llm_grid(grid_dir: Union[str, Path]) -> tuple[pd.DataFrame, dict]:
    """Every finished run of an ``sdpo-llm grid`` directory → (long table ``method, feedback, noise, seed, step, reward,
    entropy``, ``{method: its recipe's method block}``)."""
    runs = Path(grid_dir) / "runs"
    if not runs.is_dir():
        raise ValueError(f"--llm-grid {str(grid_dir)!r} is not an sdpo-llm grid directory (no runs/ folder)")
    rows, blocks = [], {}
    for record_path in sorted(runs.glob("*.json")):
        try:
            rec = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a record is written last and atomically: an unreadable one is not a finished run
        if rec.get("status") != "ok":
            continue
        recipe = rec.get("recipe") or {}
        method = recipe.get("method", {}).get("name")
        task, training = recipe.get("task", {}), recipe.get("training", {})
        blocks.setdefault(method, recipe.get("method"))
        metrics = record_path.with_suffix("") / "metrics.jsonl"
        if not metrics.is_file():
            continue
        for line in metrics.read_text().splitlines():
            m = json.loads(line)
            if "reward" in m and "step" in m:
                rows.append({"method": method, "feedback": task.get("feedback"), "noise": float(task.get("noise", 0.0)),
                             "seed": int(training.get("seed", 0)), "step": int(m["step"]), "reward": m["reward"], "entropy": m.get("entropy")})
    if not rows:
        raise ValueError(f"--llm-grid {str(grid_dir)!r} has no finished runs with metrics.jsonl")
    return pd.DataFrame(rows), blocks


def toy_config(method_block: Mapping, feedback: str, noise: float, rho: float, **changes) -> RunConfig:
    """The toy run of an LLM point: its method block, channel and noise, the bayes teacher at ``rho``."""
    return RunConfig.from_dict({"method": dict(method_block), "feedback": feedback, "noise": float(noise), "rho": float(rho),
                                "teacher": "bayes", **changes})


def simulate(points: pd.DataFrame, blocks: Mapping[str, Mapping], rho_of: Mapping[str, float], *, steps: int, seeds: int = 8,
             task_seeds: int = 2, progress: bool = True, **world) -> pd.DataFrame:
    """Toy learning curves of each ``(method, feedback, noise)`` of ``points``: long table like :func:`read_llm_grid`'s with
    ``task_seed`` (exact reward and per-token entropy at steps 0…steps). ``world``: RunConfig fields (vocab_size, seq_len,
    batch_size, ...); without ``batch_size`` a batch holds 8 groups of the method block's ``num_generations``."""
    rows = []
    keys = points[list(POINT)].drop_duplicates().itertuples(index=False)
    for method, feedback, noise in tqdm(list(keys), desc="toy grid", unit="point", disable=not progress):
        for task_seed in range(task_seeds):
            size = {"batch_size": 8 * int(blocks[method].get("num_generations", 4)), **world}
            cfg = toy_config(blocks[method], feedback, noise, rho_of[feedback], steps=steps, eval_every=1, seeds=seeds, task_seed=task_seed, **size)
            h = run(cfg).history
            rows.append(pd.DataFrame({"method": method, "feedback": feedback, "noise": float(noise), "task_seed": task_seed,
                                      "seed": h["seed"].to_numpy(), "step": h["step"].to_numpy(), "reward": h["reward"].to_numpy(),
                                      "entropy": h["entropy"].to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def per_seed(long: pd.DataFrame, rollout_steps: Sequence[int]) -> pd.DataFrame:
    """``auc`` (mean reward over ``rollout_steps``), ``final_reward`` and ``entropy`` (at the last of them) per seed."""
    unit = [c for c in (*POINT, "task_seed", "seed") if c in long]
    d = long[long.step.isin(list(rollout_steps))].sort_values("step")
    g = d.groupby(unit, sort=True)
    out = g.agg(auc=("reward", "mean"), final_reward=("reward", "last"), entropy=("entropy", "last")).reset_index()
    return out


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b of two paired sequences (``scipy.stats.kendalltau``; ties counted as τ_b does)."""
    return float(scipy_stats.kendalltau(np.asarray(x, float), np.asarray(y, float)).statistic)


def _point_means(seeds: pd.DataFrame, metric: str) -> pd.Series:
    return seeds.groupby(list(POINT))[metric].mean()


def bootstrap_tau(llm: pd.DataFrame, toy: pd.DataFrame, metric: str, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """τ of the point means and its percentile CI: each resample draws, for every point and in each world, that point's
    seeds with replacement (the toy's units are task × seed), and recomputes both worlds' means and τ."""
    a, b = _point_means(llm, metric), _point_means(toy, metric)
    keys = a.index.intersection(b.index)
    tau = kendall_tau(a[keys], b[keys])
    gen = np.random.default_rng(seed)
    groups = [(llm.set_index(list(POINT)).loc[[k], metric].to_numpy(), toy.set_index(list(POINT)).loc[[k], metric].to_numpy()) for k in keys]
    boots = []
    for _ in range(n_boot):
        x = [g[0][gen.integers(0, len(g[0]), len(g[0]))].mean() for g in groups]
        y = [g[1][gen.integers(0, len(g[1]), len(g[1]))].mean() for g in groups]
        boots.append(kendall_tau(x, y))
    boots = np.array(boots)
    boots = boots[np.isfinite(boots)]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) if boots.size else (math.nan, math.nan)
    return {"metric": metric, "tau": tau, "ci_lo": float(lo), "ci_hi": float(hi), "points": len(keys)}


def pairwise_differences(llm: pd.DataFrame, toy: pd.DataFrame, metric: str, pairs: Sequence[tuple[str, str]] = PAIRS) -> pd.DataFrame:
    """Per feedback × noise × pair ``(a, b)``: mean ``a − b`` in each world, the LLM difference's standard error over
    seeds (``sqrt(s_a²/n_a + s_b²/n_b)``) and whether the signs agree."""
    rows = []
    for (feedback, noise), _ in llm.groupby(["feedback", "noise"]):
        for a, b in pairs:
            pick = lambda d, m: d[(d.feedback == feedback) & (d.noise == noise) & (d.method == m)][metric]  # noqa: E731
            la, lb, ta, tb = pick(llm, a), pick(llm, b), pick(toy, a), pick(toy, b)
            if min(len(la), len(lb), len(ta), len(tb)) == 0:
                continue
            se = math.sqrt(la.var(ddof=1) / len(la) + lb.var(ddof=1) / len(lb)) if min(len(la), len(lb)) > 1 else math.nan
            d_llm, d_toy = float(la.mean() - lb.mean()), float(ta.mean() - tb.mean())
            rows.append({"metric": metric, "feedback": feedback, "noise": noise, "pair": f"{a} − {b}", "llm": d_llm, "llm_se": se,
                         "toy": d_toy, "agree": bool(np.sign(d_llm) == np.sign(d_toy))})
    return pd.DataFrame(rows)


def sign_agreement(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of pairs whose signs agree (``sign(0) = 0`` agrees only with 0); NaN for no pairs."""
    x, y = np.sign(np.asarray(a, float)), np.sign(np.asarray(b, float))
    return float(np.mean(x == y)) if x.size else math.nan


def agreement(llm_seeds: pd.DataFrame, toy_seeds: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """τ with CI per metric and the sign agreement of the pairwise differences (all, and those the LLM resolves: |Δ| > 2 SE)."""
    out = {"kendall": [bootstrap_tau(llm_seeds, toy_seeds, m, n_boot=n_boot, seed=seed) for m in METRICS], "signs": []}
    tables = []
    for m in METRICS:
        d = pairwise_differences(llm_seeds, toy_seeds, m)
        tables.append(d)
        resolved = d[d.llm.abs() > 2 * d.llm_se]
        out["signs"].append({"metric": m, "agree": int(d.agree.sum()), "pairs": len(d), "fraction": sign_agreement(d.llm, d.toy),
                             "resolved_agree": int(resolved.agree.sum()), "resolved_pairs": len(resolved)})
    out["pairwise"] = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return out


def agreement_summary(result: Optional[dict]) -> dict:
    """The JSON-able headline of :func:`agreement` (no tables), what promote writes beside a recipe."""
    if not result:
        return {}
    return {"kendall": result["kendall"], "signs": result["signs"]}
