"""Calibrated self-knowledge ρ: which toy-world self-teacher reproduces the LLM teacher's measured feedback credit?

The LLM side (``sdpo-llm credit-truth``, ``llm/credit_truth.py``) measures, per feedback channel and training step, the
Pearson correlation of the feedback credit ``log p_T(y_t | feedback) − log p_T(y_t | no feedback)`` of every distilled
token with the judge's counterfactual contribution ``c_t`` and with the Monte Carlo advantage ``Â_t`` (disattenuated for
the MC noise), with bootstrap CIs over completions. This module reads that JSON file (``sdpo_sim`` never imports
``llm``) and measures the toy world's self-teacher the same way:

- **credit** ``log softmax(ℓ_T)[y_t] − log softmax(ℓ)[y_t]`` of the teacher with feedback (``ℓ_T``,
  :class:`~sdpo_sim.teachers.BayesTeacher`, or :class:`~sdpo_sim.teachers.DemoTeacher` for ``demonstration``) against
  the same network without it (``ℓ``), on the distilled (masked) tokens, as ``train.run`` computes
  ``feedback_credit_pearson``;
- **ground truths** the exact ``c_t(y_t; y)`` (:meth:`~sdpo_sim.feedback.Judge.contributions` at the taken token) and the
  exact ``A*_t`` (:func:`~sdpo_sim.metrics.exact_state`); the toy's A* has no MC noise, so it is compared with the LLM's
  *disattenuated* correlation;
- at step 0 (the initial policy) on the same sampled batch for every ρ (common random numbers: the curve is smooth in
  ρ), pooled Pearson per run, then averaged over seeds and tasks; at a later step ``k`` through ``train.run_group``
  (SDPO trained ``k`` steps on that channel, its history's ``feedback_credit_pearson`` against ``A*``; ``c_t`` is not
  logged there).

:func:`invert` fits ρ̂ by inverse linear interpolation of the curve ``r(ρ)`` at the LLM's value; a value under the
curve's range is ``below`` (not ρ = 0), over it ``above``. The CI maps the LLM's bootstrap replicates through the same
inverse (percentiles of the mapped replicates, ``below`` → −∞, ``above`` → +∞) or, when the file has none, its CI
endpoints: for a monotone curve the two agree (a percentile commutes with a monotone map). :func:`fit_common` finds one
ρ for all channels by least squares and reports each channel's residual.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics, rng
from .core.config_fields import setting
from .core.validation import check_int
from .feedback import Judge
from .policies import TabularPolicy
from .stats import bootstrap_ci
from .teachers import BayesTeacher, DemoTeacher, SelfKnowledge
from .train import RunConfig, initial_median_reward, run_group
from .world import family_task

LLM_TO_TOY = {"binary": "binary", "ordinal": "ordinal", "continuous": "continuous", "critique": "critique", "demonstration": "demo"}
# ground truth -> (the LLM file's ground_truth, its estimator comparable with the toy's exact quantity)
TRUTHS = {"counterfactual": ("counterfactual", "pearson"), "advantage": ("advantage_mc", "disattenuated")}
PRIMARY_TRUTH = "counterfactual"  # noise-free on the LLM side, and the quantity SelfKnowledge's ρ is defined on
RHO_GRID = tuple(round(0.05 * i, 2) for i in range(21))
FLAT = 0.02  # a curve whose range over ρ is below this (a correlation) does not identify ρ
STATUS = ("ok", "below", "above", "not identifiable", "missing")
_OWNER = "CalibrationConfig"


@dataclass
class CalibrationConfig:
    """The toy world the LLM's credit correlations are matched in (defaults: the claims world, the LLM's group size)."""

    task_seeds: int = setting(4, "toy tasks (task seeds 0 … task_seeds − 1) the curve is averaged over, ≥ 1")
    seeds: int = setting(8, "training seeds per task and ρ, ≥ 1")
    batch_size: int = setting(64, "completions per run and measurement (the LLM file: 16 prompts × 4 = 64)")
    num_generations: int = setting(4, "group size (the tiny-cpu recipe's)")
    vocab_size: int = setting(8, "toy vocabulary V")
    seq_len: int = setting(6, "toy sequence length T")
    noise: float = setting(0.0, "σ of the judge noise (the LLM measurement's task.noise: 0)")
    beta: float = setting(1.0, "teacher sharpness β")

    def __post_init__(self) -> None:
        for name, lo in (("task_seeds", 1), ("seeds", 1), ("batch_size", 2), ("num_generations", 2)):
            check_int(_OWNER, name, getattr(self, name), lo)
        if self.batch_size % self.num_generations:
            raise ValueError(f"{_OWNER}.batch_size={self.batch_size} must be a multiple of num_generations={self.num_generations}")

    def run_config(self, channel: str, task_seed: int, rho: float = 0.0, **changes) -> RunConfig:
        """The toy SDPO run of ``channel`` (an LLM channel name) on ``task_seed``."""
        toy = LLM_TO_TOY[channel]
        return RunConfig.from_dict({"method": "sdpo", "num_generations": self.num_generations, "feedback": toy,
                                    "teacher": "demo" if toy == "demo" else "bayes", "rho": rho, "beta": self.beta, "noise": self.noise,
                                    "seeds": self.seeds, "task_seed": task_seed, "batch_size": self.batch_size,
                                    "vocab_size": self.vocab_size, "seq_len": self.seq_len, **changes})


# ----------------------------------------------------------------------------- reading the LLM measurement

def read_credit_truth(path: Union[str, Path]) -> pd.DataFrame:
    """The LLM's ``credit_truth.json`` → one row per channel × step × truth (``counterfactual``, ``advantage``):
    ``r, ci_lo, ci_hi, completions, tokens`` and ``replicates`` (a list, or None when the file has none)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"credit-truth file {str(path)!r} does not exist; give the credit_truth.json `sdpo-llm credit-truth` wrote") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"credit-truth file {str(path)!r} is not readable JSON ({err}); give the credit_truth.json `sdpo-llm credit-truth` wrote") from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    need = {"channel", "step", "ground_truth", "estimator", "r", "ci_lo", "ci_hi"}
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and need <= set(r) for r in rows):
        raise ValueError(f"credit-truth file {str(path)!r} has no `rows` list with {', '.join(sorted(need))}; is it sdpo-llm credit-truth's JSON?")
    out = []
    for r in rows:
        for truth, (gt, est) in TRUTHS.items():
            if r["ground_truth"] == gt and r["estimator"] == est and r["channel"] in LLM_TO_TOY:
                num = lambda v: math.nan if v is None else float(v)  # noqa: E731 — the file writes NaN as null
                out.append({"channel": r["channel"], "step": int(r["step"]), "truth": truth, "r": num(r["r"]), "ci_lo": num(r["ci_lo"]),
                            "ci_hi": num(r["ci_hi"]), "completions": r.get("completions"), "tokens": r.get("tokens"),
                            "replicates": r.get("replicates")})
    if not out:
        raise ValueError(f"credit-truth file {str(path)!r} has no rows of channels {', '.join(LLM_TO_TOY)}")
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- the toy world measured the same way

def _masked_pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Pooled Pearson per run over the tokens of masked completions: ``[runs, B, T]`` × 2, mask ``[runs, B]`` → runs floats."""
    return [float(metrics.pearson(x[r][mask[r]].unsqueeze(0), y[r][mask[r]].unsqueeze(0))[0]) if mask[r].sum() >= 2 else math.nan
            for r in range(x.shape[0])]


def step0_correlations(cfg: RunConfig, rhos: Sequence[float]) -> pd.DataFrame:
    """The teacher's feedback credit against ``c_t`` and ``A*`` at step 0 of ``cfg`` for every ρ of ``rhos``.

    All ``len(rhos) × cfg.seeds`` runs sample the same batches (seed ``s`` draws the same sequences whatever its ρ,
    the samples of ``train.run``'s step 0) and see the same feedback; only the self-knowledge differs.
    Returns rows ``rho, seed, counterfactual, advantage`` (pooled Pearson over the distilled tokens of the batch)."""
    V, T, B, m = cfg.vocab_size, cfg.seq_len, cfg.batch_size, cfg.method
    seeds = torch.arange(cfg.seed_start, cfg.seed_start + cfg.seeds).repeat(len(rhos))
    rho = torch.tensor([float(r) for r in rhos], dtype=torch.float64).repeat_interleave(cfg.seeds)
    task = family_task(cfg.task_seed, V, T, cfg.family)
    policy = TabularPolicy(cfg.policy, V, T, m.temperature)
    theta = policy.init_params(len(seeds))
    judge = Judge(task, cfg.threshold if cfg.threshold is not None else initial_median_reward(task, policy, theta))
    seqs = policy.sample(theta, rng.uniform(seeds, rng.SAMPLE, 0, (B, T)))  # [R, B, T]
    logits = policy.logits(theta, seqs)
    fb = judge(seqs, cfg.feedback, group_size=m.num_generations, noise=cfg.noise, hint_noise=cfg.hint_noise, seeds=seeds, step=0)
    teacher = DemoTeacher(cfg.beta) if cfg.teacher == "demo" else BayesTeacher(cfg.beta)
    out = teacher(logits, seqs, fb, SelfKnowledge(judge, rho, seed=cfg.task_seed))
    taken = lambda lg: torch.log_softmax(lg.double(), -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)  # noqa: E731 — log p(y_t)
    credit = taken(out.logits) - taken(logits)  # feedback credit, [R, B, T]
    c_t = judge.contributions(seqs).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    a_star = metrics.exact_state(task, policy, theta, theta, seqs)["advantages"]
    return pd.DataFrame({"rho": rho.numpy(), "seed": seeds.numpy(), "counterfactual": _masked_pearson(credit, c_t, out.mask),
                         "advantage": _masked_pearson(credit, a_star, out.mask)})


def toy_curves(config: CalibrationConfig, channels: Sequence[str], steps: Sequence[int] = (0,), rhos: Sequence[float] = RHO_GRID,
               *, progress: bool = True) -> pd.DataFrame:
    """Per-unit correlations ``channel, step, truth, rho, task_seed, seed, r`` over the ρ grid (see the module docstring)."""
    rows = []
    jobs = [(c, k) for c in channels for k in range(config.task_seeds)]
    for channel, task_seed in tqdm(jobs, desc="toy curves", unit="task", disable=not progress):
        for step in steps:
            if step == 0:
                d = step0_correlations(config.run_config(channel, task_seed), rhos)
                for truth in TRUTHS:
                    rows.append(pd.DataFrame({"channel": channel, "step": 0, "truth": truth, "rho": d["rho"], "task_seed": task_seed,
                                              "seed": d["seed"], "r": d[truth]}))
            else:
                cfgs = [config.run_config(channel, task_seed, rho=float(r), steps=int(step), eval_every=int(step)) for r in rhos]
                for r, res in zip(rhos, run_group(cfgs)):
                    h = res.history[res.history.step == step]
                    rows.append(pd.DataFrame({"channel": channel, "step": int(step), "truth": "advantage", "rho": float(r), "task_seed": task_seed,
                                              "seed": h["seed"].to_numpy(), "r": h["feedback_credit_pearson"].to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def summarise_curves(units: pd.DataFrame) -> pd.DataFrame:
    """Mean curve with a two-stage (task, seed) bootstrap CI: ``channel, step, truth, rho, r, r_lo, r_hi``."""
    rows = []
    for (channel, step, truth, rho), g in units.groupby(["channel", "step", "truth", "rho"], sort=True):
        mean, lo, hi = bootstrap_ci(g["r"], tasks=g["task_seed"], n_boot=1000)
        rows.append({"channel": channel, "step": step, "truth": truth, "rho": rho, "r": mean, "r_lo": lo, "r_hi": hi})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the fit

def is_monotone(curve: Sequence[float], tolerance: float = 0.0) -> bool:
    """``curve[i+1] ≥ curve[i] − tolerance`` for every i (non-decreasing up to ``tolerance``)."""
    c = np.asarray(curve, dtype=float)
    return bool(np.all(np.diff(c) >= -tolerance))


def invert(grid: Sequence[float], curve: Sequence[float], value: float) -> tuple[float, str]:
    """ρ̂ with ``curve(ρ̂) = value`` by linear interpolation of the points ``(grid[i], curve[i])``, and a status.

    ``ok``: the first crossing (the only one if the curve is monotone); ``below``/``above``: ``value`` lies under
    the curve's minimum / over its maximum (ρ̂ NaN: the toy world has no such teacher); ``not identifiable``: within
    the range of a curve that does not depend on ρ (range < :data:`FLAT`); ``missing``: ``value`` is NaN."""
    g, c = np.asarray(grid, dtype=float), np.asarray(curve, dtype=float)
    if not math.isfinite(value):
        return math.nan, "missing"
    if value < np.nanmin(c):
        return math.nan, "below"
    if value > np.nanmax(c):
        return math.nan, "above"
    if np.nanmax(c) - np.nanmin(c) < FLAT:
        return math.nan, "not identifiable"
    for i in range(len(g) - 1):
        a, b = c[i], c[i + 1]
        if min(a, b) <= value <= max(a, b):
            return (float(g[i]) if a == b else float(g[i] + (value - a) / (b - a) * (g[i + 1] - g[i]))), "ok"
    return math.nan, "missing"  # unreachable for finite curves: value lies within [min, max]


def map_interval(grid: Sequence[float], curve: Sequence[float], *, replicates: Optional[Sequence[float]] = None,
                 lo: float = math.nan, hi: float = math.nan, level: float = 0.95) -> tuple[float, float, str]:
    """CI of ρ̂: the ``(1±level)/2`` percentiles of the replicates mapped through :func:`invert` (``below`` → −∞,
    ``above`` → +∞, so the order is kept), or the mapped endpoints ``lo``, ``hi`` when there are no replicates.
    Returns ``(ρ_lo, ρ_hi, source)``; an infinite bound means that end lies outside the toy's range (reported, not
    clamped); NaN when nothing maps."""
    def mapped(v: float) -> float:
        r, status = invert(grid, curve, v)
        return {"below": -math.inf, "above": math.inf}.get(status, r)

    if replicates is not None and len(replicates):
        vals = np.array([mapped(float(v)) for v in replicates if v is not None and math.isfinite(float(v))], dtype=float)
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            return math.nan, math.nan, "replicates"
        q = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2], method="lower")  # an order statistic: ±∞ stays ±∞
        return float(q[0]), float(q[1]), "replicates"
    return mapped(lo), mapped(hi), "ci endpoints (the file has no bootstrap replicates)"


def fit_common(grid: Sequence[float], curves: dict[str, Sequence[float]], values: dict[str, float], *, points: int = 1001) -> dict:
    """One ρ for all channels: ``argmin_ρ Σ_ch (curve_ch(ρ) − value_ch)²`` over ``points`` ρ in [0, 1] (curves linearly
    interpolated), with each channel's residual ``value_ch − curve_ch(ρ*)`` and the RMS residual."""
    dense = np.linspace(0.0, 1.0, points)
    keys = [k for k in curves if math.isfinite(values.get(k, math.nan))]
    if not keys:
        return {"rho": math.nan, "residuals": {}, "rms": math.nan, "channels": []}
    fitted = {k: np.interp(dense, np.asarray(grid, float), np.asarray(curves[k], float)) for k in keys}
    sse = sum((fitted[k] - values[k]) ** 2 for k in keys)
    i = int(np.argmin(sse))
    residuals = {k: float(values[k] - fitted[k][i]) for k in keys}
    return {"rho": float(dense[i]), "residuals": residuals, "rms": float(math.sqrt(sse[i] / len(keys))), "channels": keys}


def fit(llm: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """Per channel × step × truth: ρ̂, status and CI; per step × truth: the common ρ. JSON-able (NaN/∞ as None with a status)."""
    per, common = [], []
    for (step, truth), cg in curves.groupby(["step", "truth"]):
        shape, values = {}, {}
        for channel, g in cg.groupby("channel"):
            g = g.sort_values("rho")
            m = llm[(llm.channel == channel) & (llm.step == step) & (llm.truth == truth)]
            if m.empty:
                continue
            row = m.iloc[0]
            rho, status = invert(g.rho, g.r, row.r)
            lo, hi, source = map_interval(g.rho, g.r, replicates=row.replicates, lo=row.ci_lo, hi=row.ci_hi)
            per.append({"channel": channel, "step": int(step), "truth": truth, "llm_r": _f(row.r), "llm_ci": [_f(row.ci_lo), _f(row.ci_hi)],
                        "completions": row.completions, "rho_hat": _f(rho), "status": status, "rho_ci": [_bound(lo), _bound(hi)],
                        "ci_source": source, "monotone": is_monotone(g.r, tolerance=0.01),
                        "toy_range": [_f(float(g.r.min())), _f(float(g.r.max()))], "toy_r_at_0": _f(float(g.r.iloc[0])),
                        "toy_r_at_1": _f(float(g.r.iloc[-1])),
                        "nearest_rho": _f(float(g.rho.iloc[int(np.argmin(g.r))] if status == "below" else g.rho.iloc[int(np.argmax(g.r))]
                                                if status == "above" else rho))})
            if status != "not identifiable":
                shape[channel], values[channel] = g.r.to_numpy(), float(row.r)
                grid = g.rho.to_numpy()
        if shape:
            c = fit_common(grid, shape, values)
            common.append({"step": int(step), "truth": truth, "rho": c["rho"], "rms_residual": c["rms"],
                           "residuals": {k: round(v, 4) for k, v in c["residuals"].items()}})
    return {"per_channel": per, "common": common}


def _f(x) -> Optional[float]:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _bound(x: float) -> Union[float, str, None]:
    """A CI bound for JSON: a number, ``"below"``/``"above"`` the toy's range, or None."""
    if x == -math.inf:
        return "below"
    if x == math.inf:
        return "above"
    return _f(x)


def calibrated_rho(calibration: dict, channel: str, *, step: int = 0, truth: str = PRIMARY_TRUTH) -> tuple[float, str]:
    """The calibrated ρ of ``channel`` (an LLM or toy channel name) from a CALIBRATION.json payload, and its status.

    ``below``/``above``: the ρ of the curve's minimum/maximum, the nearest toy teacher (the status says so); raises
    ValueError when the channel was not calibrated."""
    names = {channel, {v: k for k, v in LLM_TO_TOY.items()}.get(channel, channel)}
    rows = [r for r in calibration.get("fit", {}).get("per_channel", []) if r.get("channel") in names and r.get("step") == step
            and r.get("truth") == truth]
    if not rows:
        known = sorted({r.get("channel") for r in calibration.get("fit", {}).get("per_channel", [])})
        raise ValueError(f"channel {channel!r} is not calibrated at step {step} ({truth}); calibrated: {', '.join(known) or 'none'}")
    r = rows[0]
    if r["status"] == "ok":
        return float(r["rho_hat"]), "ok"
    if r["status"] in ("below", "above") and r.get("nearest_rho") is not None:
        return float(r["nearest_rho"]), f"{r['status']} the toy's range: the nearest toy teacher (ρ = {r['nearest_rho']:g})"
    raise ValueError(f"channel {channel!r} has no calibrated ρ (status: {r['status']})")


__all__ = ["CalibrationConfig", "read_credit_truth", "step0_correlations", "toy_curves", "summarise_curves", "invert", "map_interval",
           "fit_common", "fit", "calibrated_rho", "is_monotone"]
