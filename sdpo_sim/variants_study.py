"""The variants study (issue 16): which of the field's SDPO variants keeps SDPO's early speed without its entropy collapse?

A sibling of the claims report (:mod:`sdpo_sim.claims`): one sweep (``specs/variants.yaml``; ``variants_quick.yaml``
for the tests) runs SDPO, GRPO and each variant of docs/variants.md (:data:`ARMS`) under every feedback channel on
several tasks, each arm × feedback at its own tuned lr (and β where it distills; the tuning key names the fields
that make each arm, :func:`check_spec`), with block ``main`` evaluated again at the tuning alternatives
(``main@other|low|high``, :data:`sdpo_sim.tuning.ALTERNATIVES`). :func:`evaluate` measures, per arm × feedback:

- exact reward J at steps 10, 30, 100 and the final step (mean, 95% CI, hierarchical over tasks then seeds);
- per-token entropy at matched reward: H at the first step a run's exact J reaches the level
  ``L = J_0 + 0.9·(min_arm mean final J − J_0)`` of its feedback channel (J_0 the mean initial reward; the rule of
  the claims report's entropy-at-matched-reward note, applied to every arm), linearly interpolated between
  evaluation steps (:func:`sdpo_sim.stats.first_crossing`); runs that never reach L are left out and counted;
- the feedback credit correlation (distilling arms: Pearson r of ``log p_T(y|f) − log p_T(y)`` with A*);
- paired differences arm − SDPO of each (matched on task seed and seed), with CIs.

Verdict rules (fixed before any result was looked at), per arm other than SDPO and per feedback channel:

- **keeps early speed**: the CI of the paired difference of J at step 30 (arm − SDPO) lies above −:data:`SPEED_MARGIN`;
- **avoids collapse**: the CI of the paired difference of entropy at matched reward (arm − SDPO) lies above 0;
- a channel *passes* when both hold. The arm's verdict on "keeps SDPO's early speed without its entropy collapse":
  *holds* (every channel passes), *holds only under stated conditions* (some do, listed), *does not hold* (none),
  *not measured* (no channel could be measured) — the claims report's verdict strings.

Robustness (the claims report's rule): each arm's verdict recomputed at every tuning alternative the sweep ran;
*robust (k of k)* when it stands under all, *fragile (j of k stand): ...* naming each alternative that flips it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .claims.measure import (  # the claims report's verdict strings, row selection and tuning-alternative blocks
    CONDITIONAL,
    FAILS,
    FEEDBACK_ORDER,
    HOLDS,
    MISSING,
    _at_alternative,
    default_choice,
    jsonable,
)
from .core.method import DISTILLING
from .stats import TASK, first_crossing, paired_difference, summarize
from .sweep_spec import Spec
from .train import RunConfig
from .tuning import ALTERNATIVES as TUNING_ALTERNATIVES

# arm name -> the config fields that make it (the spec's cases; a test checks that the packaged specs say the same).
# SDPG's schedule lengths (distill_warmup_steps, distill_decay_steps) depend on the step budget, so they are set in the
# spec (canonical: warm-up 20 steps, decay over the last 70 of 200) and do not name the arm.
ARMS: dict[str, dict[str, Any]] = {
    "sdpo": {"method": "sdpo"},
    "grpo": {"method": "grpo"},
    "blend": {"method": "blend"},
    "srpo": {"method": "srpo", "distill_token_weight": "teacher_confidence"},
    "sc-sdpo": {"method": "sdpo", "distill_prompt_weight": "success_std"},
    "sdpg": {"method": "sdpo", "distill_gate": "positive_advantage"},
    "forward-ce": {"method": "sdpo", "distill_loss": "forward_ce", "alpha": 0.0},
    "ref-kl": {"method": "sdpo", "ref_beta": 0.04},  # TRL's GRPOConfig.beta default before it became 0.0
}
REFERENCE, BASELINE = "sdpo", "grpo"
DESCRIPTIONS = {
    "sdpo": "SDPO (reference)", "grpo": "GRPO (baseline)", "blend": "advantage blend, λ = 0.9, full support",
    "srpo": "SRPO-style routing + teacher-confidence token weights", "sc-sdpo": "SC-SDPO-style prompt weights sqrt(p(1 − p))",
    "sdpg": "SDPG-style positive-advantage gate + warm-up/decay schedule", "forward-ce": "forward cross-entropy (alpha 0)",
    "ref-kl": "SDPO + KL to the initial policy, ref_beta 0.04",
}
# fields that tell arms apart: every arm's value of each (its setting, else the default) identifies it
_DEFAULTS = RunConfig().to_dict()
IDENTIFYING = tuple(dict.fromkeys(k for settings in ARMS.values() for k in settings))
SPEED_STEP = 30  # "early": J at this training step
SPEED_MARGIN = 0.02  # reward units: a sixth of the initial policy's reward s.d. (≈ 0.125) on the canonical tasks
MATCH_FRACTION = 0.9  # matched reward: this far from the initial reward to the weakest arm's final reward
REWARD_METRICS = ("reward_at_10", "reward_at_30", "reward_at_100", "final_reward")
OUTCOMES = ("keeps speed, avoids collapse", "keeps speed, collapses as SDPO", "slower, avoids collapse", "slower, collapses as SDPO", "not measured")
VERDICTS = (HOLDS, CONDITIONAL, FAILS, MISSING)
QUESTION = "keeps SDPO's early speed without its entropy collapse"


def _settings(arm: str) -> dict:
    return {k: ARMS[arm].get(k, _DEFAULTS[k]) for k in IDENTIFYING}


def arm_of(config: Mapping[str, Any]) -> str:
    """The arm of :data:`ARMS` a flat run config belongs to (every identifying field equal); ValueError if none."""
    for arm in ARMS:
        if all(config.get(k, _DEFAULTS[k]) == v for k, v in _settings(arm).items()):
            return arm
    shown = {k: config.get(k, _DEFAULTS[k]) for k in IDENTIFYING}
    raise ValueError(f"a run with {shown} is none of the study's arms ({', '.join(ARMS)}); see sdpo_sim.variants_study.ARMS")


def label_arms(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with column ``arm`` set to each row's arm of :data:`ARMS` (from its identifying columns)."""
    if frame.empty:
        return frame
    cols = [c for c in IDENTIFYING if c in frame]
    keys = frame[cols].drop_duplicates()
    lookup = {tuple(r): arm_of(dict(zip(cols, r))) for r in keys.itertuples(index=False)}
    return frame.assign(arm=[lookup[tuple(r)] for r in frame[cols].itertuples(index=False)])


def check_spec(spec: Spec) -> None:
    """Refuse a spec the study cannot read: it needs block ``main`` whose cases are arms of :data:`ARMS` (SDPO among
    them), and a tuning key (``tuning.per``) that gives every arm its own choice."""
    main = [b for b in spec.blocks if b.name == "main"]
    if not main:
        raise ValueError(f"spec {spec.name!r}: the variants study needs a block named 'main'; blocks: {', '.join(b.name for b in spec.blocks)}")
    arms = [arm_of({**spec.base, **main[0].base, **case}) for case in main[0].cases]
    if REFERENCE not in arms or len(set(arms)) != len(arms):
        raise ValueError(f"spec {spec.name!r}: block main's cases must be distinct arms including {REFERENCE!r}; they are {arms}")
    per = [p for p in (spec.tuning or {}).get("per", []) if p != "feedback"]
    if spec.tuning is not None:
        keys = {arm: tuple(_settings(arm).get(p, _DEFAULTS.get(p)) for p in per) for arm in arms}
        clash = [a for a in arms if list(keys.values()).count(keys[a]) > 1]
        if clash:
            raise ValueError(f"spec {spec.name!r}: tuning.per={spec.tuning.get('per')} gives arms {clash} one shared choice; "
                             f"add the fields that tell them apart (of {', '.join(IDENTIFYING)})")


# ----------------------------------------------------------------------------- measurements
def matched_levels(history: pd.DataFrame) -> dict[str, float]:
    """Per feedback channel, the matched reward level ``J_0 + MATCH_FRACTION·(min_arm mean final J − J_0)``."""
    out = {}
    for fb, h in history.groupby("feedback", sort=False):
        last = h[h["step"] == h.groupby("run_id")["step"].transform("max")]
        start = float(h[h["step"] == 0]["reward"].mean())
        out[str(fb)] = start + MATCH_FRACTION * (float(last.groupby("arm")["reward"].mean().min()) - start)
    return out


def entropy_at_level(history: pd.DataFrame, levels: Mapping[str, float]) -> pd.DataFrame:
    """One row per (arm, feedback, task seed, seed): the per-token entropy at the first step J reaches its channel's
    level (NaN when it never does)."""
    rows = [{"arm": arm, "feedback": fb, TASK: ts, "seed": seed,
             "entropy_matched": first_crossing(g["step"], g["reward"], levels[str(fb)], g["entropy"])}
            for (arm, fb, ts, seed), g in history.groupby(["arm", "feedback", TASK, "seed"], sort=True)]
    return pd.DataFrame(rows, columns=["arm", "feedback", TASK, "seed", "entropy_matched"])


def _ci(frame: pd.DataFrame, value: str) -> dict:
    s = summarize(frame, value).iloc[0] if len(frame) else None
    return {"mean": s["mean"], "ci": [s["ci_lo"], s["ci_hi"]], "n": int(s["n"])} if s is not None and s["n"] else {"mean": math.nan, "ci": [math.nan, math.nan], "n": 0}


def _diff(frame: pd.DataFrame, value: str, arm: str) -> dict:
    d = paired_difference(frame, value, "arm", arm, REFERENCE)
    if d.empty or not d["n"].iloc[0]:
        return {"mean": math.nan, "ci": [math.nan, math.nan], "n": 0}
    r = d.iloc[0]
    return {"mean": r["mean"], "ci": [r["ci_lo"], r["ci_hi"]], "n": int(r["n"])}


def outcome(speed_diff: Mapping[str, Any], entropy_diff: Mapping[str, Any], margin: float = SPEED_MARGIN) -> tuple[str, bool]:
    """(outcome string of :data:`OUTCOMES`, passes) of one arm under one channel from its paired differences vs SDPO
    (``{"ci": [lo, hi]}``): keeps speed ⇔ J@30 difference CI above −margin; avoids collapse ⇔ entropy difference CI above 0."""
    s_lo, e_lo = speed_diff["ci"][0], entropy_diff["ci"][0]
    if not (math.isfinite(s_lo) and math.isfinite(e_lo)):
        return OUTCOMES[-1], False
    fast, wide = s_lo > -margin, e_lo > 0
    return OUTCOMES[(0 if fast else 2) + (0 if wide else 1)], fast and wide


def verdict(passes: Sequence[Optional[bool]]) -> str:
    """The claims report's verdict over the measured channels (``None``: not measured)."""
    measured = [p for p in passes if p is not None]
    return MISSING if not measured else HOLDS if all(measured) else FAILS if not any(measured) else CONDITIONAL


@dataclass
class ArmVerdict:
    """One arm's answer to the question: the verdict, the channels that pass, and its robustness."""

    arm: str
    verdict: str
    passes_under: list = field(default_factory=list)
    robustness: str = ""


def measure(seeds: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The table (one row per arm × feedback: every measurement, its CI, the paired differences vs SDPO, the outcome)
    and the matched levels, from block ``main``'s per-seed and history tables (already labelled by :func:`label_arms`)."""
    levels = matched_levels(history)
    matched = entropy_at_level(history, levels)
    rows = []
    fbs = [f for f in FEEDBACK_ORDER if f in set(seeds["feedback"])] + sorted(set(seeds["feedback"]) - set(FEEDBACK_ORDER))
    for fb in fbs:
        part, mpart = seeds[seeds["feedback"] == fb], matched[matched["feedback"] == fb]
        for arm in [a for a in ARMS if a in set(part["arm"])]:
            own, mown = part[part["arm"] == arm], mpart[mpart["arm"] == arm]
            distills = str(own["method"].iloc[0]) in DISTILLING  # β is the teacher's sharpness: only a distilling arm reads it
            row = {"arm": arm, "feedback": fb, "lr": float(own["lr"].iloc[0]), "beta": float(own["beta"].iloc[0]) if distills else math.nan,
                   "level": levels[fb]}
            for metric in REWARD_METRICS:
                row[metric] = _ci(own, metric)
            row["entropy_matched"] = _ci(mown, "entropy_matched")
            row["matched_missing"] = int(mown["entropy_matched"].isna().sum())
            row["entropy_final"] = _ci(own, "entropy")
            row["feedback_credit_corr"] = _ci(own, "feedback_credit_corr")
            if arm != REFERENCE:
                row["vs_sdpo"] = {m: _diff(part, m, arm) for m in (*REWARD_METRICS, "entropy")}
                row["vs_sdpo"]["entropy_matched"] = _diff(mpart.dropna(), "entropy_matched", arm)
                row["outcome"], row["passes"] = outcome(row["vs_sdpo"][f"reward_at_{SPEED_STEP}"], row["vs_sdpo"]["entropy_matched"])
            rows.append(row)
    return pd.DataFrame(rows), levels


def verdicts(table: pd.DataFrame) -> list[ArmVerdict]:
    """Each non-reference arm's verdict from :func:`measure`'s table."""
    out = []
    for arm in [a for a in ARMS if a != REFERENCE and a in set(table["arm"])]:
        rows = table[table["arm"] == arm]
        passes = [None if o == OUTCOMES[-1] else bool(p) for o, p in zip(rows["outcome"], rows["passes"])]
        v = verdict(passes)
        out.append(ArmVerdict(arm, v, [fb for fb, p in zip(rows["feedback"], passes) if p] if v == CONDITIONAL else []))
    return out


def _tables(seeds: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Block main's rows (a run listed under two blocks counts once), labelled by arm."""
    s = seeds[seeds["block"] == "main"].drop_duplicates(["run_id", "seed"])
    h = history[history["block"] == "main"].drop_duplicates(["run_id", "seed", "step"])
    return label_arms(s), label_arms(h)


@dataclass
class Study:
    """What :func:`evaluate` returns: the table, the matched levels, the verdicts (with robustness) and the
    alternatives' verdicts."""

    table: pd.DataFrame
    levels: dict
    verdicts: list
    alternatives: dict = field(default_factory=dict)  # label -> {arm: verdict}

    def to_dict(self) -> dict:
        rows = [{k: _json(v) for k, v in r.items()} for r in self.table.to_dict(orient="records")]
        return {"levels": _json(self.levels), "rows": rows, "verdicts": [asdict(v) for v in self.verdicts], "alternatives": self.alternatives}


def _json(v: Any) -> Any:
    """JSON-ready: floats rounded (claims' :func:`~sdpo_sim.claims.measure.jsonable`), NaN as None, recursively."""
    if isinstance(v, Mapping):
        return {k: _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, float) and not isinstance(v, bool) and math.isnan(v):
        return None
    return jsonable(v)


def evaluate(tables: Mapping[str, pd.DataFrame]) -> Study:
    """The study from a variants sweep's tables (``seeds``, ``history``): measurements and verdicts at the chosen
    lrs, each verdict's robustness over the tuning alternatives the sweep ran."""
    seeds, history = tables["seeds"], tables["history"]
    if seeds.empty or history.empty:
        raise ValueError("the sweep has no finished runs; nothing to evaluate")
    table, levels = measure(*_tables(default_choice(seeds), default_choice(history)))
    found = verdicts(table)
    alternatives: dict[str, dict[str, str]] = {}
    for name, label in TUNING_ALTERNATIVES.items():
        alt_s, alt_h = _at_alternative(seeds, name), _at_alternative(history, name)
        if alt_s is None or alt_h is None:
            continue
        alt_table, _ = measure(*_tables(alt_s, alt_h))
        alternatives[label] = {v.arm: v.verdict for v in verdicts(alt_table)}
    for v in found:
        outcomes = [(label, alt[v.arm]) for label, alt in alternatives.items() if alt.get(v.arm, MISSING) != MISSING]
        flips = [(label, x) for label, x in outcomes if x != v.verdict]
        v.robustness = ("not measured" if not outcomes or v.verdict == MISSING else f"robust ({len(outcomes)} of {len(outcomes)})" if not flips else
                        f"fragile ({len(outcomes) - len(flips)} of {len(outcomes)} stand): " + "; ".join(f"{x} with {label}" for label, x in flips))
    return Study(table, levels, found, alternatives)


def figure_tables(tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Block main at the chosen lrs in the form :func:`sdpo_sim.plots.write_figures` draws one colour per arm from:
    ``method`` is the arm's name (``with_arm`` keys arms by method), and only the columns the learning-curve and
    entropy–reward figures read, so the arms' differing settings (alpha, β, ref_beta, ...) are not held fixed away."""
    seeds, history = _tables(default_choice(tables["seeds"]), default_choice(tables["history"]))
    cols = ["block", "run_id", "seed", "step", TASK, "feedback", "noise", "vocab_size", "reward", "entropy"]
    keep = [c for c in cols if c in history]
    return {"history": history[keep].assign(method=history["arm"]), "seeds": seeds[[c for c in ["block", "run_id", "seed", TASK, "feedback"] if c in seeds]].assign(method=seeds["arm"])}


def finite_rows(study: Study, steps: int) -> bool:
    """Whether every arm × feedback row has a finite J at every budget a run of ``steps`` steps reaches (J@100 is not
    measured in a 30-step run) and a finite final entropy (a check for the tests)."""
    metrics = [m for m in REWARD_METRICS if m == "final_reward" or int(m.rsplit("_", 1)[1]) <= steps]
    return bool(len(study.table)) and all(np.isfinite(r[m]["mean"]) for _, r in study.table.iterrows() for m in [*metrics, "entropy_final"])
