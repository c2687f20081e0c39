"""Measuring the claims: each claim of the reference simulation study (docs/design.md §2), from a sweep's tables.

:func:`evaluate` reads a sweep made from ``specs/claims.yaml`` (or its smaller siblings ``main`` and
``quick``: same block names) and returns one :class:`Claim` per statement, each with per-condition
measurements, 95% bootstrap CIs over (task seed, seed) units, and a verdict by a rule fixed in
advance (below) — never tuned toward the study's numbers. Each claim also says how its value is shown
(:data:`VALUE_FORMATS`); writing the report is :mod:`sdpo_sim.claims.report`'s job.

Verdict rules. Each claim is checked separately under each condition (feedback type, noise level):
- a *range* claim ("+0.13…0.18", "15–22%") passes a condition when the CI overlaps the range;
- a *threshold/direction* claim ("> 0.70", "A > B") passes when the whole CI is on the claimed side;
- the claim **holds** when every condition passes, **holds only under stated conditions** when some
  do (they are listed), **does not hold** when none do; **not measured** when the sweep lacks the block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..plots import with_arm
from ..stats import (
    TASK,
    bootstrap_ci,
    first_crossing,
    interquartile_mean,
    paired_difference,
    probability_of_improvement,
    summarize,
)
from ..tuning import ALTERNATIVES as TUNING_ALTERNATIVES
from .formatting import fmt

HOLDS, CONDITIONAL, FAILS, MISSING = "holds", "holds only under stated conditions", "does not hold", "not measured"
FEEDBACK_ORDER = ("binary", "ordinal", "continuous", "critique")

# How a claim's value is shown (sdpo_sim.claims.report writes each so): number 0.734; signed, a difference whose sign
# shows in the summary table (+0.150) but not in the details table (0.150); percent 15.0%; step, a training step
# ('step 20', 20 in the details table, 'never' when not reached).
VALUE_FORMATS = ("number", "signed", "percent", "step")


@dataclass
class Condition:
    """One measurement under one condition: value, CI, n units and whether it passes the claim's rule."""

    condition: str
    value: float
    ci_lo: float
    ci_hi: float
    n: int
    passes: bool
    note: str = ""


@dataclass
class Claim:
    """One claim of the study: what it says, what we measure, the rule, the per-condition measurements and the verdict."""

    id: str
    statement: str  # what the study says
    study_value: str
    metric: str  # what we measure, exactly
    rule: str  # when a condition passes
    setting: str  # fixed conditions of the measurement
    value_format: str  # how the value is shown: a key of VALUE_FORMATS
    conditions: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    robustness: str = ""  # how the verdict fares under the alternative choices (robustness())

    def __post_init__(self) -> None:
        if self.value_format not in VALUE_FORMATS:
            raise ValueError(f"claim {self.id}: value_format={self.value_format!r} is not allowed; choose one of {', '.join(map(repr, VALUE_FORMATS))}")

    @property
    def verdict(self) -> str:
        if not self.conditions:
            return MISSING
        passed = [c.passes for c in self.conditions]
        return HOLDS if all(passed) else FAILS if not any(passed) else CONDITIONAL

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        d["conditions"] = [{k: jsonable(v) for k, v in asdict(c).items()} for c in self.conditions]
        return d


def jsonable(v: Any) -> Any:
    """A value as JSON writes it: numpy scalars as Python ones, floats rounded to 6 decimals, NaN/inf as ``None``."""
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# ----------------------------------------------------------------------------- selecting rows
def units(seeds: pd.DataFrame) -> pd.DataFrame:
    """Per-seed table with ``arm`` and duplicates of shared runs removed per block."""
    return with_arm(seeds)


def _block(frame: pd.DataFrame, *names: str) -> pd.DataFrame:
    """Rows of these blocks; a run shared by two of them counts once."""
    if "block" not in frame:
        return frame.iloc[0:0]
    keys = ["run_id", "seed", "step"] if "step" in frame else ["run_id", "seed"]
    frame = frame if "arm" in frame else with_arm(frame)
    return frame[frame["block"].isin(names)].drop_duplicates(keys)


def _where(frame: pd.DataFrame, **eq: Any) -> pd.DataFrame:
    for k, v in eq.items():
        frame = frame[frame[k].isin(v)] if isinstance(v, (list, tuple, set)) else frame[frame[k] == v]
    return frame


def _feedbacks(frame: pd.DataFrame) -> list:
    present = list(frame["feedback"].unique()) if "feedback" in frame else []
    return [f for f in FEEDBACK_ORDER if f in present] + sorted(f for f in present if f not in FEEDBACK_ORDER)


# ----------------------------------------------------------------------------- verdict rules
def _overlaps(lo: float, hi: float, a: float, b: float) -> bool:
    return math.isfinite(lo) and math.isfinite(hi) and hi >= a and lo <= b


def _above(lo: float, threshold: float) -> bool:
    return math.isfinite(lo) and lo > threshold


# ----------------------------------------------------------------------------- the claims
BASELINES = ("reinforce", "grpo")  # the tuned policy-gradient baselines SDPO is compared with


def _present_baselines(frame: pd.DataFrame) -> list[str]:
    return [b for b in BASELINES if b in set(frame["arm"])] if len(frame) else []


def _best_baseline(frame: pd.DataFrame, metric: str) -> str | None:
    """The baseline with the highest mean ``metric`` in ``frame`` (``None`` when none was run)."""
    means = {b: float(_where(frame, arm=b)[metric].mean()) for b in _present_baselines(frame)}
    return max(means, key=means.get) if means else None


def claim_margin(seeds: pd.DataFrame) -> Claim:
    c = Claim("C1", "SDPO outperforms the baselines by +0.13 to +0.18 mean reward", "+0.13 … +0.18",
              "paired difference of final exact reward J, SDPO − the best tuned baseline of that condition (REINFORCE or GRPO, "
              "whichever has the higher mean final J there; every method at its tuned lr), matched on task seed and seed",
              "CI overlaps [0.13, 0.18]", "block main: noise 0, ρ=0.5, tuned lr and β, Bayes teacher, markov policy", value_format="signed")
    main = _block(seeds, "main")
    for fb in _feedbacks(main):
        part = _where(main, feedback=fb)
        best = _best_baseline(part, "final_reward")
        if best is None or part[part.arm == "sdpo"].empty:
            continue
        d = paired_difference(part, "final_reward", "arm", "sdpo", best)
        if d.empty or d["n"].iloc[0] == 0:
            continue
        r = d.iloc[0]
        notes = []
        for b in _present_baselines(part):
            f = paired_difference(part, "final_reward", "arm", "sdpo", b).iloc[0]
            a = paired_difference(part, "auc", "arm", "sdpo", b).iloc[0]
            notes.append(f"vs {b}{' (best)' if b == best else ''}: final {fmt(f['mean'], signed=True)} [{fmt(f['ci_lo'])}, {fmt(f['ci_hi'])}], "
                         f"AUC {fmt(a['mean'], signed=True)} [{fmt(a['ci_lo'])}, {fmt(a['ci_hi'])}]")
        c.conditions.append(Condition(f"feedback={fb}", r["mean"], r["ci_lo"], r["ci_hi"], int(r["n"]), _overlaps(r["ci_lo"], r["ci_hi"], 0.13, 0.18),
                                      "; ".join(notes)))
    for b in _present_baselines(main):
        final = _where(main, arm=b)["final_reward"].mean()
        if final > 0.95:
            c.notes.append(f"Tuned {b} solves these tasks: mean final J = {final:.3f} (max 1). Margins at the final step are bounded by "
                           "what is left; the AUC margins and budgets (C7, seeds table) show sample efficiency.")
    return c


def claim_credit(seeds: pd.DataFrame, history: pd.DataFrame) -> Claim:
    c = Claim("C2", "SDPO's credit assignment correlates > 0.70 with the ground truth", "> 0.70",
              "Pearson correlation of SDPO's feedback credit log p_T(y_t | feedback) − log p_T(y_t | no feedback) (the teacher with the "
              "feedback against the same teacher network without it) with the exact advantage A*_t, pooled over a batch, averaged over "
              "evaluation steps; one value per (task seed, seed). The distillation signal log p_T − log p_θ, which also carries the lag "
              "of an EMA teacher behind the student, is in the notes",
              "whole CI above 0.70", "blocks main (EMA teacher, rate 0.05) and live_teacher: noise 0, ρ=0.5, tuned lr and β, Bayes teacher",
              value_format="number")
    frame = pd.concat([_block(seeds, "main"), _block(seeds, "live_teacher")])
    frame = frame.drop_duplicates(["run_id", "seed"]) if len(frame) else frame  # a run in both blocks counts once
    if len(frame) and "feedback_credit_corr" not in frame:
        c.notes.append("The runs predate the feedback-credit metric (no feedback_credit_corr column): rerun the sweep in a fresh directory.")
        return c
    start = _block(with_arm(history), "main", "live_teacher") if not history.empty else history
    for kind in ("ema", "live"):
        part = _where(frame, teacher_kind=kind)
        for fb in _feedbacks(part):
            r, rf = _sdpo_and_reinforce(part, frame, fb, "feedback_credit_corr")
            if r is None:
                continue
            signal = summarize(_where(part, feedback=fb, arm="sdpo"), "credit_corr").iloc[0]
            notes = [f"distillation signal {fmt(signal['mean'])} [{fmt(signal['ci_lo'])}, {fmt(signal['ci_hi'])}]"]
            rf = summarize(_where(frame, feedback=fb, arm="reinforce"), "credit_corr")
            if len(rf) and rf["n"].iloc[0]:
                notes.append(f"REINFORCE's advantage on the same feedback: {fmt(rf['mean'].iloc[0])}")
            if len(start):
                s0 = _where(start, feedback=fb, arm="sdpo", teacher_kind=kind, step=0)["feedback_credit_pearson"]
                if len(s0):
                    notes.append(f"at step 0 (initial policy): {fmt(float(s0.mean()))}")
            c.conditions.append(Condition(f"teacher_kind={kind}, feedback={fb}", r["mean"], r["ci_lo"], r["ci_hi"], int(r["n"]), _above(r["ci_lo"], 0.70), "; ".join(notes)))
    rho = _where(_block(seeds, "rho"), arm="sdpo")
    if len(rho):
        by = summarize(rho, "feedback_credit_corr", ["feedback", "rho"])
        best = by.sort_values("mean").iloc[-1]
        c.notes.append(f"Depends on the teacher's self-knowledge ρ (block rho, feedback credit): highest {best['mean']:.3f} at feedback={best['feedback']}, "
                       f"ρ={best['rho']:g}; at ρ=0: " + ", ".join(f"{r.feedback} {r.mean:.3f}" for r in by[by.rho == 0].itertuples()))
    c.notes.append("The feedback credit has no teacher lag, so EMA and live rows measure the same thing; with a live teacher it equals the "
                   "distillation signal. Late in training the policy is nearly deterministic and A* is tiny, so correlations there are noisy.")
    return c


def _sdpo_and_reinforce(sdpo_frame: pd.DataFrame, reinforce_frame: pd.DataFrame, feedback: str, metric: str):
    """Summary rows (mean, CI, n) of ``metric`` under ``feedback``: SDPO's from ``sdpo_frame`` and REINFORCE's from
    ``reinforce_frame``; each ``None`` when that arm has no units (REINFORCE's too when SDPO's is missing)."""
    s = summarize(_where(sdpo_frame, feedback=feedback, arm="sdpo"), metric)
    if s.empty or s["n"].iloc[0] == 0:
        return None, None
    rf = summarize(_where(reinforce_frame, feedback=feedback, arm="reinforce"), metric)
    return s.iloc[0], (rf.iloc[0] if len(rf) and rf["n"].iloc[0] else None)


def claim_entropy(seeds: pd.DataFrame, history: pd.DataFrame) -> Claim:
    c = Claim("C3", "SDPO reduces policy entropy by 15–22%", "15% … 22%",
              "relative drop of per-token entropy, 1 − H(final)/H(step 0), of SDPO", "CI overlaps [15%, 22%]",
              "block main: noise 0, ρ=0.5; final step", value_format="percent")
    main = _block(seeds, "main")
    for fb in _feedbacks(main):
        r, rf = _sdpo_and_reinforce(main, main, fb, "entropy_drop")
        if r is None:
            continue
        note = f"REINFORCE: {fmt(rf['mean'], pct=True)}" if rf is not None else ""
        matched = _entropy_at_matched(history, fb)
        if matched:
            note += f"; {matched}"
        c.conditions.append(Condition(f"feedback={fb}", r["mean"], r["ci_lo"], r["ci_hi"], int(r["n"]), _overlaps(r["ci_lo"], r["ci_hi"], 0.15, 0.22), note))
    return c


def _entropy_at_matched(history: pd.DataFrame, feedback: str) -> str:
    """SDPO − REINFORCE entropy at the first step each reaches a common reward level (paired on seeds)."""
    if history.empty:
        return ""
    h = _where(_block(with_arm(history), "main"), feedback=feedback, arm=["sdpo", "reinforce"])
    if h["arm"].nunique() < 2:
        return ""
    finals = h[h.step == h.groupby("run_id")["step"].transform("max")].groupby("arm")["reward"].mean()
    start = h[h.step == 0]["reward"].mean()
    level = start + 0.9 * (finals.min() - start)  # 90% of the way to the weaker arm's final reward
    rows = [{"arm": arm, "task_seed": ts, "seed": seed, "entropy": first_crossing(g["step"], g["reward"], level, g["entropy"])}
            for (arm, ts, seed), g in h.sort_values("step").groupby(["arm", "task_seed", "seed"])]
    d = paired_difference(pd.DataFrame(rows).dropna(), "entropy", "arm", "sdpo", "reinforce")
    if d.empty or not d["n"].iloc[0]:
        return f"entropy at matched reward J={level:.3f}: not reached by both"
    r = d.iloc[0]
    return f"entropy at matched reward J={level:.3f}, SDPO − REINFORCE: {fmt(r['mean'], signed=True)} nats [{fmt(r['ci_lo'])}, {fmt(r['ci_hi'])}]"


def claim_richness(seeds: pd.DataFrame, value: str, cid: str, what: str, blocks: Sequence[str] = ("main",)) -> Claim:
    c = Claim(cid, f"{what} scales monotonically with feedback richness (critique > continuous > ordinal > binary)", "monotone",
              f"paired differences of SDPO's {value} between adjacent feedback types, matched on task seed and seed; the value shown "
              "is the smallest adjacent difference (the step closest to breaking the order), every step is in the notes",
              "every adjacent step's CI above 0 (a monotone order needs all of them)", f"block(s) {', '.join(blocks)}: SDPO, noise 0, ρ=0.5",
              value_format="signed")
    frame = _where(pd.concat([_block(seeds, b) for b in blocks]), arm="sdpo")
    kinds = sorted(frame["teacher_kind"].unique()) if len(frame) else []
    for kind in kinds:
        sd = _where(frame, teacher_kind=kind)
        fbs = [f for f in FEEDBACK_ORDER if f in set(sd["feedback"])]
        steps = [(f"{hi} − {lo}", paired_difference(sd, value, "feedback", hi, lo).iloc[0]) for lo, hi in zip(fbs[:-1], fbs[1:])]
        steps = [(label, d) for label, d in steps if d["n"]]
        if not steps:
            continue
        label, weakest = min(steps, key=lambda item: item[1]["mean"])
        note = "; ".join(f"{lab}: {fmt(d['mean'], signed=True)} [{fmt(d['ci_lo'])}, {fmt(d['ci_hi'])}]"
                         f"{'' if _above(d['ci_lo'], 0.0) else ' (not above 0)'}" for lab, d in steps)
        c.conditions.append(Condition(f"teacher_kind={kind}" + (f", {len(steps) + 1} feedback types" if len(fbs) < len(FEEDBACK_ORDER) else ""),
                                      weakest["mean"], weakest["ci_lo"], weakest["ci_hi"], int(weakest["n"]),
                                      all(_above(d["ci_lo"], 0.0) for _, d in steps) and len(steps) == len(FEEDBACK_ORDER) - 1,
                                      f"weakest step {label}; " + note))
    return c


def _relative_losses(frame: pd.DataFrame, feedback: str, arm: str, smax: float) -> pd.Series:
    """``1 − J(σ_max)/J(σ=0)`` per (task seed, seed) of one arm (units run at both noise levels)."""
    part = _where(frame, feedback=feedback, arm=arm)
    zero = part[part.noise == 0].groupby([TASK, "seed"])["final_reward"].mean()
    high = part[part.noise == smax].groupby([TASK, "seed"])["final_reward"].mean()
    both = zero.index.intersection(high.index)
    return 1 - high[both] / zero[both]


def _task_ci(values: pd.Series) -> tuple[float, float, float]:
    """Mean and two-stage bootstrap CI of a series indexed by (task seed, seed)."""
    return bootstrap_ci(values.to_numpy(), tasks=values.index.get_level_values(0))


def claim_noise(seeds: pd.DataFrame) -> Claim:
    c = Claim("C5", "SDPO degrades gracefully: only 2.6% reward lost at extreme noise", "2.6% loss",
              "relative loss of final exact reward, 1 − J(σ_max)/J(σ=0), of SDPO, paired on task seed and seed; "
              "and SDPO's loss minus each baseline's (REINFORCE, GRPO: those run at σ_max), paired on task seed and seed",
              "SDPO's CI reaches down to ≤ 2.6% AND SDPO loses less than every baseline measured (each paired difference's whole CI "
              "below 0): graceful must be SDPO's, not the task's", "blocks main (σ=0) + noise; ρ=0.5", value_format="percent")
    frame = _block(seeds, "main", "noise")
    if frame.empty or frame["noise"].nunique() < 2:
        return c
    smax = float(frame["noise"].max())
    c.setting += f"; extreme noise σ_max = {smax:g} (reward units; the initial policy's reward s.d. is ≈ 0.125)"
    for fb in _feedbacks(frame):
        sdpo = _relative_losses(frame, fb, "sdpo", smax)
        if not len(sdpo):
            continue
        m, lo, hi = _task_ci(sdpo)
        notes, better = [], []
        for b in _present_baselines(_where(frame, noise=smax)):
            other = _relative_losses(frame, fb, b, smax)
            both = sdpo.index.intersection(other.index)
            if not len(both):
                continue
            dm, dlo, dhi = _task_ci(sdpo[both] - other[both])
            better.append(math.isfinite(dhi) and dhi < 0)
            notes.append(f"{b} loses {fmt(float(other.mean()), pct=True)}; SDPO − {b}: {fmt(dm, pct=True, signed=True)} "
                         f"[{fmt(dlo, pct=True)}, {fmt(dhi, pct=True)}]")
        if not better:
            notes.append("no baseline run at σ_max: cannot show the degradation is SDPO's")
        c.conditions.append(Condition(f"feedback={fb}", m, lo, hi, len(sdpo), math.isfinite(lo) and lo <= 0.026 and bool(better) and all(better),
                                      "; ".join(notes)))
    return c


def claim_hybrid(seeds: pd.DataFrame) -> Claim:
    c = Claim("C6", "Hybrid matches SDPO's reward with more entropy (1.82 vs 1.75 nats)", "1.82 vs 1.75",
              "paired difference of final per-token entropy, hybrid (divergence controller) − SDPO, at the SAME noise level (the study compared two)",
              "entropy difference CI above 0 and reward difference CI above −0.01 (matches)", "block hybrid: continuous feedback, ρ=0.5",
              value_format="signed")
    hy = _block(seeds, "hybrid")
    if hy.empty:
        return c
    for noise in sorted(hy["noise"].unique()):
        part = _where(hy, noise=noise)
        e = paired_difference(part, "entropy", "arm", "hybrid-divergence", "sdpo")
        r = paired_difference(part, "final_reward", "arm", "hybrid-divergence", "sdpo")
        if e.empty or not e["n"].iloc[0]:
            continue
        e, r = e.iloc[0], r.iloc[0]
        ent = part.groupby("arm")["entropy"].mean()
        note = ("final entropy (nats): " + ", ".join(f"{a} {v:.2f}" for a, v in ent.items()) +
                f"; reward difference {fmt(r['mean'], signed=True)} [{fmt(r['ci_lo'])}, {fmt(r['ci_hi'])}]")
        c.conditions.append(Condition(f"noise={noise:g}", e["mean"], e["ci_lo"], e["ci_hi"], int(e["n"]),
                                      _above(e["ci_lo"], 0.0) and _above(r["ci_lo"], -0.01), note))
    c.notes.append(f"Maximal per-token entropy is ln V = {math.log(8):.3f} nats for V = 8: 1.82 nats would be 88% of it.")
    return c


def _separation(part: pd.DataFrame, baseline: str) -> tuple[float, pd.Series, list[str]]:
    """First evaluation step (> 0) where SDPO − ``baseline`` has its whole CI above 0 and the baseline is never
    significantly ahead afterwards; the paired-difference row at that step (or the last step); notes."""
    d = paired_difference(part, "reward", "arm", "sdpo", baseline, by=["step"]).sort_values("step")
    d = d[d["step"] > 0]
    ahead = (d["ci_lo"] > 0).to_numpy()
    never_behind_after = np.flip(np.logical_and.accumulate(np.flip(~(d["ci_hi"] < 0).to_numpy())))
    stays = ahead & never_behind_after  # ahead here, and the baseline never significantly ahead from here on
    first = float(d["step"].to_numpy()[stays.argmax()]) if stays.any() else float("nan")
    at = d[d["step"] == first].iloc[0] if stays.any() else d.iloc[-1]
    behind = d[d["ci_hi"] < 0]
    notes = [f"vs {baseline}: " + (f"separates at step {int(first)} ({fmt(at['mean'], signed=True)})" if stays.any() else "never separates for good")]
    if ahead.any():
        notes.append(f"first ahead of {baseline} at step {int(d['step'].to_numpy()[ahead.argmax()])}")
    if len(behind):
        notes.append(f"{baseline} ahead (CI below 0) at steps {', '.join(str(int(x)) for x in behind['step'][:6])}{'…' if len(behind) > 6 else ''}")
    return first, at, notes


def claim_separation(history: pd.DataFrame) -> Claim:
    c = Claim("C7", "SDPO separates from the baselines within 30 steps", "≤ 30 steps",
              "for each tuned baseline (REINFORCE, GRPO), the first evaluation step at which the paired reward difference SDPO − baseline has "
              "its whole CI above 0 and after which the baseline is never significantly ahead (CI below 0) — separates and stays separated "
              "(a tie at saturation is allowed); the value is the latest of these steps (separated from every baseline)",
              "that step ≤ 30", "block main: noise 0; evaluation every 10 steps", value_format="step")
    if history.empty:
        return c
    h = _block(with_arm(history), "main")
    for fb in _feedbacks(h):
        part = _where(h, feedback=fb)
        baselines = _present_baselines(part)
        if "sdpo" not in set(part["arm"]) or not baselines:
            continue
        results = [_separation(part, b) for b in baselines]
        steps = [first for first, _, _ in results]
        worst = int(np.argmax([s if math.isfinite(s) else math.inf for s in steps]))
        first, at, _ = results[worst]
        notes = [n for _, _, ns in results for n in ns]
        ok = all(math.isfinite(s) for s in steps)
        c.conditions.append(Condition(f"feedback={fb}", max(steps) if ok else float("nan"), at["ci_lo"] if ok else float("nan"),
                                      at["ci_hi"] if ok else float("nan"), int(at["n"]), ok and max(steps) <= 30, "; ".join(notes)))
    return c


def replica(seeds: pd.DataFrame) -> list[dict]:
    """Rows showing where the study's numbers come from: its own setting and teachers that read the tables."""
    rows = []
    for block in ("teachers", "demo_teacher", "seed_paper", "main"):
        part = _block(seeds, block)
        if part.empty:
            continue
        if block == "main":
            part = _where(part, arm="sdpo", task_seed=part["task_seed"].min())
        for (teacher, fb, arm, policy, opt), g in part.groupby(["teacher", "feedback", "arm", "policy", "optimizer"], sort=True):
            row = {"block": block, "teacher": teacher, "feedback": fb, "method": arm, "policy": policy, "optimizer": opt, "lr": float(g["lr"].iloc[0]),
                   "rho": float(g["rho"].iloc[0]), "n": int(len(g))}
            for value in ("final_reward", "credit_corr", "entropy_drop", "entropy"):
                m, lo, hi = bootstrap_ci(g[value])
                row[value], row[f"{value}_ci"] = jsonable(m), [jsonable(lo), jsonable(hi)]
            rows.append(row)
    sp = _block(seeds, "seed_paper")
    for fb in _feedbacks(sp):
        d = paired_difference(_where(sp, feedback=fb), "final_reward", "arm", "sdpo", "reinforce")
        if len(d) and d["n"].iloc[0]:
            for row in rows:
                if row["block"] == "seed_paper" and row["feedback"] == fb and row["method"] == "sdpo":
                    row["margin_vs_reinforce"] = jsonable(d["mean"].iloc[0])
                    row["margin_vs_reinforce_ci"] = [jsonable(d["ci_lo"].iloc[0]), jsonable(d["ci_hi"].iloc[0])]
    return rows


def aggregates(seeds: pd.DataFrame, metrics: Sequence[str] = ("final_reward", "auc")) -> list[dict]:
    """Across-task aggregates of block ``main`` (rliable's conventions), one row per feedback type × method × metric:
    the mean and interquartile mean over all (task, seed) units, the spread of the per-task means (min, max), the number
    of tasks, and for each baseline row the probability that an SDPO run beats a run of that method on the same task
    (Mann–Whitney, averaged over tasks)."""
    main = _block(seeds, "main")
    rows = []
    for fb in _feedbacks(main):
        part = _where(main, feedback=fb)
        for arm in sorted(part["arm"].unique()):
            runs = _where(part, arm=arm)
            for metric in metrics:
                per_task = runs.groupby(TASK)[metric].mean()
                poi = probability_of_improvement(part, metric, "arm", "sdpo", arm) if arm != "sdpo" else float("nan")
                rows.append({"feedback": fb, "method": arm, "metric": metric, "n": int(runs[metric].notna().sum()), "n_tasks": int(per_task.size),
                             "mean": jsonable(float(runs[metric].mean())), "iqm": jsonable(interquartile_mean(runs[metric])),
                             "task_min": jsonable(float(per_task.min())), "task_max": jsonable(float(per_task.max())),
                             "p_sdpo_better": jsonable(poi)})
    return rows


def _claims(seeds: pd.DataFrame, history: pd.DataFrame) -> list[Claim]:
    return [claim_margin(seeds), claim_credit(seeds, history), claim_entropy(seeds, history), claim_richness(seeds, "final_reward", "C4a", "Alignment quality (final reward)"),
            claim_richness(seeds, "credit_corr", "C4b", "Credit correlation", ("main", "live_teacher")), claim_noise(seeds), claim_hybrid(seeds), claim_separation(history)]


# Alternative choices a reviewer would accept, each a replacement of block main's runs by another block's
# (label, block, arms replaced; None: every arm, and only block main is kept — the other blocks belong to the default choice).
ALTERNATIVES = (
    ("the harder task family (motif)", "main_motif", None),
    ("a live teacher", "main_live", ("sdpo", "hybrid-divergence")),
)


def _substitute(frame: pd.DataFrame, block: str, arms) -> pd.DataFrame | None:
    """``frame`` with block main's rows (of ``arms``) replaced by ``block``'s rows relabelled main; None without that block."""
    if frame.empty or "block" not in frame or not (frame["block"] == block).any():
        return None
    frame = with_arm(frame)
    alt = frame[frame["block"] == block].assign(block="main")
    if arms is None:
        return alt
    keep = ~((frame["block"] == "main") & frame["arm"].isin(arms)) & (frame["block"] != block)
    return pd.concat([frame[keep], alt[alt["arm"].isin(arms)]], ignore_index=True)


def _at_alternative(frame: pd.DataFrame, name: str) -> pd.DataFrame | None:
    """The blocks the sweep evaluated again at tuning alternative ``name`` (blocks ``<b>@<name>``), relabelled ``<b>``;
    the other blocks are left out (they were run at the default choice only). None when there are none."""
    if frame.empty or "block" not in frame:
        return None
    suffix = f"@{name}"
    alt = frame[frame["block"].str.endswith(suffix)]
    return alt.assign(block=alt["block"].str[: -len(suffix)]) if len(alt) else None


def default_choice(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the blocks evaluated at a tuning alternative (``<b>@<name>``): the runs at the chosen lrs."""
    return frame[~frame["block"].str.contains("@", regex=False)] if "block" in frame and len(frame) else frame


def _alternatives(seeds: pd.DataFrame, history: pd.DataFrame):
    """(label, seeds, history) of every alternative choice the sweep ran: :data:`ALTERNATIVES`, then the tuning
    alternatives (:data:`sdpo_sim.tuning.ALTERNATIVES`)."""
    for label, block, arms in ALTERNATIVES:
        yield label, _substitute(seeds, block, arms), _substitute(history, block, arms)
    for name, label in TUNING_ALTERNATIVES.items():
        yield label, _at_alternative(seeds, name), _at_alternative(history, name)


def robustness(claims: Sequence[Claim], seeds: pd.DataFrame, history: pd.DataFrame) -> None:
    """Set each claim's ``robustness``: its verdict recomputed under every alternative choice the sweep ran
    (:func:`_alternatives`) — "robust (k of k)" when it stands under all, else "fragile: <verdict> with <alternative>"
    for each that flips it; alternatives that cannot measure a claim (its blocks belong to the default choice) are not
    counted."""
    outcomes: dict[str, list[tuple[str, str]]] = {c.id: [] for c in claims}
    for label, alt_seeds, alt_history in _alternatives(seeds, history):
        if alt_seeds is None:
            continue
        for alt in _claims(alt_seeds, alt_history if alt_history is not None else history.iloc[0:0]):
            if alt.id in outcomes and alt.verdict != MISSING:
                outcomes[alt.id].append((label, alt.verdict))
    for c in claims:
        flips = [(label, v) for label, v in outcomes[c.id] if v != c.verdict]
        if not outcomes[c.id] or c.verdict == MISSING:
            c.robustness = "not measured"
        elif not flips:
            c.robustness = f"robust ({len(outcomes[c.id])} of {len(outcomes[c.id])})"
        else:
            c.robustness = f"fragile ({len(outcomes[c.id]) - len(flips)} of {len(outcomes[c.id])} stand): " + "; ".join(f"{v} with {label}" for label, v in flips)


def evaluate(tables: dict) -> list[Claim]:
    """Every claim, from a claims-style sweep's tables (``seeds`` and ``history``), with its robustness to the
    alternatives of :data:`ALTERNATIVES` the sweep ran."""
    seeds, history = units(tables["seeds"]), tables["history"]
    if seeds.empty:
        raise ValueError("the sweep has no finished runs; nothing to evaluate")
    claims = _claims(seeds, history)
    robustness(claims, seeds, history)
    return claims
