"""Fair learning rates (and teacher sharpness β): chosen per method and condition on tuning seeds disjoint from the evaluation seeds.

A sweep spec's ``tuning`` block::

    tuning:
      lr: [0.03, 0.1, 0.3]     # candidates
      beta: [0.5, 1.0, 2.0]    # optional: candidates of the self-teacher's β, for the methods that distill (sdpo, hybrid, blend, srpo)
      seeds: 4                 # tuning seeds seed_start .. seed_start+seeds-1 ...
      seed_start: 1000         # ... must not overlap any evaluation run's seeds
      criterion: auc           # auc (mean exact reward over the step budget) | final (final exact reward)
      per: [method]            # one lr per value of these fields (averaged over all other conditions)
      where: {noise: 0.0}      # optional: tune only on grid points matching these values
      blocks: [main]           # optional: tune only on these blocks' points
      steps: 100               # optional: a shorter budget for tuning
      margin: 0.01             # optional: candidates within this of the best mean criterion are "near-best"
      alternatives: [main]     # optional: blocks evaluated again at each alternative choice (below)

A block whose own ``base`` fixes ``lr`` (e.g. a replica of a published setting) keeps it and is
not tuned on (nor is β there). Rule (recorded in ``tuning.json``): for each group of ``per``, the candidate (lr, and β
for distilling methods) with the highest mean criterion over all tuning runs and seeds of that group; ties go to the
smaller lr, then the smaller β. Methods that do not distill ignore β, so they are tuned over lr alone.

Alternative choices a reviewer would accept (:data:`ALTERNATIVES`), for the verdict-robustness column of the claims
report: the other criterion's best (``auc`` ↔ ``final``), and the smallest and the largest lr among the near-best
candidates (mean criterion within ``margin`` of the best; at that lr, its best β). Each block of ``alternatives`` is
evaluated again at each of them as block ``<name>@<alternative>``; a point whose alternative equals the chosen
candidate is the same run (one run id, listed under both blocks), so only the differing choices cost runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd

from .core.io import atomic_write_text
from .core.method import DISTILLING  # the methods whose loss reads the teacher, so β matters (sdpo, hybrid, blend, srpo)
from .execution import execute
from .stats import per_seed_metrics, summarize
from .sweep_spec import expand, validate_points
from .tables import collect, write_table

CRITERIA = ("auc", "final")
TUNING_KEYS = ("lr", "beta", "seeds", "seed_start", "criterion", "per", "where", "blocks", "steps", "margin", "alternatives")
# name -> what it is (for the reports): alternative choices of (lr, β) per group, see alternative_choices()
ALTERNATIVES = {"other": "the other tuning criterion", "low": "the smallest near-best lr", "high": "the largest near-best lr"}


@dataclass
class TuningSpec:
    lr: list
    seeds: int = 4
    seed_start: int = 1000
    criterion: str = "auc"
    per: list = field(default_factory=lambda: ["method"])
    where: dict = field(default_factory=dict)
    blocks: Optional[list] = None
    steps: Optional[int] = None
    beta: Optional[list] = None  # candidates of β for distilling methods (None: β is not tuned)
    margin: float = 0.01  # near-best: mean criterion within this of the best (criterion units: reward in [0, 1])
    alternatives: Optional[list] = None  # blocks evaluated again at every alternative choice

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], known_fields: Sequence[str]) -> "TuningSpec":
        bad = sorted(set(data) - set(TUNING_KEYS))
        if bad:
            raise ValueError(f"tuning: unknown key(s) {', '.join(map(repr, bad))}; allowed: {', '.join(TUNING_KEYS)}")
        lr = data.get("lr")
        if not isinstance(lr, list) or not lr or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lr):
            raise ValueError(f"tuning.lr must be a non-empty list of positive numbers, got {lr!r}")
        for key in ("seeds", "seed_start"):
            v = data.get(key, getattr(cls, key))
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "seeds" else 0):
                raise ValueError(f"tuning.{key}={v!r} must be a {'positive' if key == 'seeds' else 'non-negative'} integer")
        criterion = data.get("criterion", "auc")
        if criterion not in CRITERIA:
            raise ValueError(f"tuning.criterion={criterion!r} is not allowed; choose one of {', '.join(map(repr, CRITERIA))}")
        per = data.get("per", ["method"])
        per = [per] if isinstance(per, str) else per
        if not isinstance(per, list) or not per or any(p not in known_fields for p in per) or "lr" in per:
            raise ValueError(f"tuning.per={per!r} must be a non-empty list of config fields other than lr (known: {', '.join(known_fields)})")
        where = data.get("where") or {}
        if not isinstance(where, Mapping) or any(k not in known_fields for k in where):
            raise ValueError(f"tuning.where={where!r} must map config fields to values")
        blocks = data.get("blocks")
        if blocks is not None and (not isinstance(blocks, list) or not blocks):
            raise ValueError(f"tuning.blocks={blocks!r} must be a non-empty list of block names")
        steps = data.get("steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"tuning.steps={steps!r} must be a positive integer")
        beta = data.get("beta")
        if beta is not None and (not isinstance(beta, list) or not beta
                                 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in beta)):
            raise ValueError(f"tuning.beta must be a non-empty list of positive numbers, got {beta!r}")
        if "beta" in per:
            raise ValueError("tuning.per must not contain beta: beta is a tuned candidate (tuning.beta), not a condition")
        if beta is not None and "method" not in per:
            raise ValueError("tuning.beta needs method in tuning.per: only distilling methods are tuned over beta")
        margin = data.get("margin", 0.01)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise ValueError(f"tuning.margin={margin!r} must be a number in [0, 1) (criterion units: reward)")
        alternatives = data.get("alternatives")
        if alternatives is not None and (not isinstance(alternatives, list) or not alternatives or not all(isinstance(b, str) for b in alternatives)):
            raise ValueError(f"tuning.alternatives={alternatives!r} must be a non-empty list of block names")
        return cls([float(x) for x in lr], data.get("seeds", 4), data.get("seed_start", 1000), criterion, list(per), dict(where), blocks, steps,
                   None if beta is None else [float(x) for x in beta], float(margin), alternatives)

    @property
    def rule(self) -> str:
        seeds = f"{self.seed_start}..{self.seed_start + self.seeds - 1}"
        beta = f" and, for {'/'.join(DISTILLING)}, β in {self.beta}" if self.beta else ""
        return (f"lr in {self.lr}{beta} maximising mean {self.criterion} per {'×'.join(self.per)} on tuning seeds {seeds}"
                + (f" at {self.steps} steps" if self.steps else ""))

    def selects(self, block: str, point: Mapping[str, Any]) -> bool:
        """Whether a grid point is one the tuning runs on."""
        if self.blocks is not None and block not in self.blocks:
            return False
        return all(point.get(k) == v for k, v in self.where.items())

    def betas(self, config: Mapping[str, Any]) -> list:
        """The β candidates of a grid point: :attr:`beta` for a distilling method, else only its own β."""
        return list(self.beta) if self.beta and config.get("method") in DISTILLING else [config.get("beta")]

    def tuning_point(self, point: Mapping[str, Any], lr: float, beta: Optional[float] = None) -> dict:
        changes = {"lr": lr, "seeds": self.seeds, "seed_start": self.seed_start, **({"beta": beta} if self.beta and beta is not None else {})}
        if self.steps is not None:
            changes["steps"] = self.steps
        return {**point, **changes}

    def plan(self, points: Sequence[tuple[str, dict]], config_fn, exempt: Sequence[str] = ()) -> list:
        chosen = [(b, p) for b, p in points if b not in exempt and self.selects(b, config_fn(p))]  # where matches defaults too
        if not chosen:
            raise ValueError(f"tuning: no grid point matches where={self.where} blocks={self.blocks}")
        return validate_points([("tuning", self.tuning_point(p, lr, beta)) for _, p in chosen for lr in self.lr
                                for beta in self.betas(config_fn(p))], config_fn)

    def check_against(self, spec, points: Sequence[tuple[str, dict]], config_fn) -> None:
        """Refuse lr in the grid, block names that do not exist, and seed ranges that overlap."""
        names = {b.name for b in spec.blocks}
        if "lr" in spec.base:
            raise ValueError("base.lr is set but the tuning block chooses lr; remove one (a block's own base may fix lr to opt out of tuning)")
        if self.beta and "beta" in spec.base:
            raise ValueError("base.beta is set but tuning.beta chooses beta; remove one")
        for key in ("blocks", "alternatives"):
            listed = getattr(self, key)
            if listed is not None and set(listed) - names:
                raise ValueError(f"tuning.{key} names unknown block(s) {sorted(set(listed) - names)}; blocks: {sorted(names)}")
        if any("@" in n for n in names):
            raise ValueError(f"block names must not contain '@' (it marks a tuning alternative): {sorted(n for n in names if '@' in n)}")
        exempt = exempt_blocks(spec)
        for b in spec.blocks:
            if "lr" in b.grid or any("lr" in c for c in b.cases):
                raise ValueError(f"block {b.name!r}: lr is chosen by tuning; remove it from the grid/cases (or drop the tuning block)")
        tune_seeds = set(range(self.seed_start, self.seed_start + self.seeds))
        for block, p in points:
            if block in exempt:
                continue
            full = config_fn(p)
            eval_seeds = set(range(full["seed_start"], full["seed_start"] + full["seeds"]))
            if tune_seeds & eval_seeds:
                raise ValueError(f"tuning.seed_start={self.seed_start}: tuning seeds {min(tune_seeds)}..{max(tune_seeds)} overlap the evaluation seeds "
                                 f"{min(eval_seeds)}..{max(eval_seeds)} of block {block!r}; they must be disjoint")
        self.plan(points, config_fn, exempt)


def exempt_blocks(spec) -> set:
    """Blocks whose own base fixes lr: they keep it and are not tuned on."""
    return {b.name for b in spec.blocks if "lr" in b.base}


def _knobs(tspec: TuningSpec) -> list:
    return ["lr", "beta"] if tspec.beta else ["lr"]


def _choice(row: pd.Series, knobs: Sequence[str], distills: bool) -> dict:
    return {k: float(row[k]) for k in knobs if k == "lr" or distills}  # β only where it is a candidate


def _scores(per_seed: pd.DataFrame, tspec: TuningSpec, criterion: str) -> pd.DataFrame:
    return summarize(per_seed, "auc" if criterion == "auc" else "final_reward", [*tspec.per, *_knobs(tspec)])


def _groups(scores: pd.DataFrame, tspec: TuningSpec):
    """(group key, whether its method distills, its rows sorted best first: mean descending, ties to the smaller knobs)."""
    knobs = _knobs(tspec)
    for key, part in scores.groupby(tspec.per, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        yield key, dict(zip(tspec.per, key)).get("method") in DISTILLING, part.sort_values(["mean", *knobs], ascending=[False, *[True] * len(knobs)])


def select(per_seed: pd.DataFrame, tspec: TuningSpec) -> tuple[pd.DataFrame, dict]:
    """Score every (group, lr, β) and pick the best per group. Returns (score table, {group key: {"lr": …, "beta": …}})."""
    knobs = _knobs(tspec)
    scores = _scores(per_seed, tspec, tspec.criterion)
    chosen = {key: _choice(ranked.iloc[0], knobs, distills) for key, distills, ranked in _groups(scores, tspec)}
    scores["selected"] = [all(chosen.get(tuple(r[p] for p in tspec.per), {}).get(k) == r[k] for k in knobs) for _, r in scores.iterrows()]
    return scores, chosen


def alternative_choices(per_seed: pd.DataFrame, tspec: TuningSpec) -> dict:
    """The alternative choices of :data:`ALTERNATIVES`, each ``{group key: {"lr": …, "beta": …}}``:

    - ``other``: the best by the other criterion (``final`` when tuning by ``auc``, and the reverse);
    - ``low`` / ``high``: among the near-best candidates, ``mean ≥ best − margin`` by the tuning criterion, the one
      with the smallest / the largest lr (at that lr, its best β).
    """
    knobs, out = _knobs(tspec), {"other": {}, "low": {}, "high": {}}
    other = "final" if tspec.criterion == "auc" else "auc"
    out["other"] = {key: _choice(ranked.iloc[0], knobs, d) for key, d, ranked in _groups(_scores(per_seed, tspec, other), tspec)}
    for key, distills, ranked in _groups(_scores(per_seed, tspec, tspec.criterion), tspec):
        near = ranked[ranked["mean"] >= ranked["mean"].iloc[0] - tspec.margin]  # best first, so the first row per lr is its best β
        out["low"][key] = _choice(near[near["lr"] == near["lr"].min()].iloc[0], knobs, distills)
        out["high"][key] = _choice(near[near["lr"] == near["lr"].max()].iloc[0], knobs, distills)
    return out


def _selected_rows(chosen: dict, tspec: TuningSpec) -> list:
    """The record's rows of one choice; a choice at the smallest or largest candidate may mean the grid is too narrow:
    flagged, not hidden."""
    return [{**dict(zip(tspec.per, k)), **v, "at_edge": len(tspec.lr) > 1 and v["lr"] in (min(tspec.lr), max(tspec.lr)),
             **({"beta_at_edge": len(tspec.beta) > 1 and v["beta"] in (min(tspec.beta), max(tspec.beta))} if "beta" in v else {})}
            for k, v in sorted(chosen.items(), key=lambda kv: str(kv[0]))]


def _at_choice(block: str, point: dict, config_fn, tspec: TuningSpec, chosen: dict) -> tuple[str, dict]:
    """``point`` of ``block`` at the choice of its group."""
    key = tuple(config_fn(point)[k] for k in tspec.per)
    if key not in chosen:
        raise ValueError(f"tuning: no tuning runs for {dict(zip(tspec.per, key))} (block {block!r}); widen tuning.where/blocks")
    return block, ({**point, **chosen[key]} if config_fn(point)["method"] in DISTILLING else {**point, "lr": chosen[key]["lr"]})


def tune(spec, tspec: TuningSpec, out: Path, *, config_fn, run_fn, workers: int, backend: str, progress: bool, pool=None):
    """Run the tuning grid, choose the lrs, write ``tuning.json``/``.csv``; return (record, evaluation plan)."""
    points = expand(spec)
    exempt = exempt_blocks(spec)
    tuning_plan = tspec.plan(points, config_fn, exempt)
    counts = execute(tuning_plan, out / "runs", run_fn=run_fn, workers=workers, backend=backend, progress=progress, desc="tuning", pool=pool)
    if counts["failed"]:
        raise RuntimeError(f"{len(counts['failed'])} tuning run(s) failed, e.g. {counts['failed'][0]['error']} (see {out}/runs/{counts['failed'][0]['run_id']}.json)")
    history, _ = collect(tuning_plan, out / "runs")
    per_seed = per_seed_metrics(history)
    scores, chosen = select(per_seed, tspec)
    alternatives = alternative_choices(per_seed, tspec) if tspec.alternatives else {}
    eval_points = []
    for block, p in points:
        if block in exempt:
            eval_points.append((block, p))
            continue
        eval_points.append(_at_choice(block, p, config_fn, tspec, chosen))
        if block in (tspec.alternatives or ()):
            eval_points += [_at_choice(f"{block}@{name}", p, config_fn, tspec, alt) for name, alt in alternatives.items()]
    planned = validate_points(eval_points, config_fn)
    record = {
        "rule": tspec.rule,
        "criterion": tspec.criterion,
        "per": tspec.per,
        "tuning_seeds": [tspec.seed_start, tspec.seed_start + tspec.seeds - 1],
        "runs": len(tuning_plan),
        "selected": _selected_rows(chosen, tspec),
        "scores": json.loads(scores.to_json(orient="records")),
        **({"margin": tspec.margin, "alternative_blocks": tspec.alternatives,
            "alternatives": {name: {"rule": ALTERNATIVES[name], "selected": _selected_rows(alt, tspec)} for name, alt in alternatives.items()}}
           if alternatives else {}),
    }
    atomic_write_text(out / "tuning.json", json.dumps(record, indent=1))
    write_table(scores, out / "tuning")
    (out / "tuning.parquet").unlink(missing_ok=True)  # the CSV and JSON are the record; keep the directory lean
    return record, planned


def selected_lr(record: Mapping[str, Any], **group: Any) -> Optional[float]:
    """The lr a tuning record chose for a group, e.g. ``selected_lr(rec, method="sdpo")``."""
    for row in record.get("selected", []):
        if all(row.get(k) == v for k, v in group.items()):
            return float(row["lr"])
    return None
