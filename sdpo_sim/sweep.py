"""Sweeps: a spec → (tuning →) runs → tidy Parquet/CSV tables; parallel, resumable. The orchestration only:
specs are :mod:`sdpo_sim.sweep_spec`, running is :mod:`sdpo_sim.execution`, tables are :mod:`sdpo_sim.tables`.

Layout of an output directory::

    DIR/spec.yaml              the spec this directory belongs to
    DIR/runs/<run_id>.json     one finished run: status ok|failed, full config, summary or error
    DIR/runs/<run_id>.parquet  its history (ok runs only); written before the .json marker
    DIR/history.{parquet,csv}  one row per block × run × seed × evaluation step
    DIR/summary.{parquet,csv}  one row per block × run
    DIR/seeds.{parquet,csv}    one row per block × run × seed (budgets, AUC, entropy drop, credit)
    DIR/tuning.{json,csv}      learning-rate selection (if the spec tunes)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import pandas as pd
import yaml

from .core.io import atomic_write_text, check_output_dir, remove_stale_temporaries
from .execution import Interrupted, RunFn, check_backend, execute, kept_runs
from .stats import per_seed_metrics
from .sweep_spec import (
    ConfigFn,
    Planned,
    Spec,
    check_compatible,
    check_fields,
    expand,
    known_fields,
    loose_id,
    validate_points,
)
from .tables import collect, write_table
from .train import RunConfig, group_key, run, run_group
from .tuning import TuningSpec, exempt_blocks, tune
from .workers import WorkerPool


# ----------------------------------------------------------------------------- toy-world adapters
def toy_config(data: Mapping[str, Any]) -> dict:
    """Validate a flat mapping as a ``RunConfig`` and return its full flat form (all defaults filled in)."""
    return RunConfig.from_dict(dict(data)).to_dict()


def _result(result) -> "tuple[pd.DataFrame, dict]":
    summary = dict(result.summary())
    summary.pop("config", None)
    return result.history, summary


class ToyRun:
    """The toy world as a sweep's run function: one full config → ``(history [seeds × eval steps rows], summary)``;
    configurations that differ only in per-run fields (lr, β, ρ, noise, seeds) train as one program
    (:func:`sdpo_sim.train.run_group`), bit for bit as they would alone."""

    # seeds summed per program: [80, 32, 6, 8] training tensors and one run's exact tables at a time; 80 holds a claims
    # condition's eight tasks × ten evaluation seeds (task_seed is a per-run field), which train ~1.1× faster than 64 + 16
    group_runs = 80

    def __call__(self, config: Mapping[str, Any]) -> "tuple[pd.DataFrame, dict]":
        return _result(run(RunConfig.from_dict(dict(config))))

    def group_key(self, config: Mapping[str, Any]) -> str:
        return group_key(RunConfig.from_dict(dict(config)))

    def run_many(self, configs: Sequence[Mapping[str, Any]]) -> "list[tuple[pd.DataFrame, dict]]":
        return [_result(r) for r in run_group([RunConfig.from_dict(dict(c)) for c in configs])]


toy_run = ToyRun()


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    """Where a sweep wrote, what it holds and what failed."""

    out: Path
    history: pd.DataFrame
    summary: pd.DataFrame
    seeds: pd.DataFrame
    failed: list
    counts: dict
    tuning: Optional[dict] = None

    def report(self) -> str:
        lines = [f"sweep: {self.counts['total']} runs ({self.counts['skipped']} already done, {self.counts['ok']} ran ok, {len(self.failed)} failed)",
                 f"tables: {self.out}/history.{{parquet,csv}}, summary.{{parquet,csv}}, seeds.{{parquet,csv}}"]
        if self.tuning:
            lines.append(f"learning rates chosen by {self.tuning['criterion']} on tuning seeds: {self.out}/tuning.json")
        for f in self.failed:
            lines.append(f"FAILED {f['run_id']}: {f['error']}  (see {self.out}/runs/{f['run_id']}.json)")
        return "\n".join(lines)


def plan(spec: Spec, config_fn: ConfigFn = toy_config) -> list[Planned]:
    """Validate the whole spec (field names, every grid point) before anything runs."""
    check_fields(spec, known_fields(config_fn))
    points = expand(spec)
    if not points:
        raise ValueError("the spec expands to no runs")
    planned = validate_points(points, config_fn)
    if spec.tuning is not None:
        TuningSpec.from_dict(spec.tuning, known_fields(config_fn)).check_against(spec, points, config_fn)
    return planned


def run_sweep(
    spec: Union[Spec, str, Path],
    out: Union[str, Path],
    *,
    workers: int = 1,
    backend: str = "process",
    progress: bool = True,
    config_fn: ConfigFn = toy_config,
    run_fn: RunFn = toy_run,
) -> SweepResult:
    """Validate everything (spec, every grid point, workers, backend, output directory) before creating
    anything, then (tune,) run what is missing and write the tidy tables. Resumable; see the module doc.
    Ctrl-C stops the workers and raises :class:`Interrupted` with the number of runs kept."""
    try:
        return _run_sweep(spec, Path(out), workers=workers, backend=backend, progress=progress, config_fn=config_fn, run_fn=run_fn)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(kept_runs(out)) from None


def _run_sweep(spec: Union[Spec, str, Path], out: Path, *, workers: int, backend: str, progress: bool,
               config_fn: ConfigFn, run_fn: RunFn) -> SweepResult:
    check_backend(workers, backend)
    if not isinstance(spec, Spec):
        spec = Spec.load(spec)
    planned = plan(spec, config_fn)
    tuning_record = None
    check_output_dir(out, "sweep output directory")
    if spec.tuning is None:
        check_compatible(out, spec, {p.run_id for p in planned})
    else:
        tspec = TuningSpec.from_dict(spec.tuning, known_fields(config_fn))
        tuned = ["lr"] if tspec.beta is None else ["lr", "beta"]  # the fields tuning chooses: a stored run may differ in them
        wanted = {p.run_id for p in tspec.plan(expand(spec), config_fn, exempt_blocks(spec))} | {p.run_id for p in planned} | {loose_id(p.config, tuned) for p in planned}
        check_compatible(out, spec, wanted, ignore=tuned)  # refuse before running anything
    # everything is validated: from here on the sweep creates its directory
    atomic_write_text(out / "spec.yaml", yaml.safe_dump(spec.raw, sort_keys=False))
    remove_stale_temporaries(out)  # tables half-written by a sweep that was killed
    with WorkerPool(workers) as pool:
        if spec.tuning is not None:
            tuning_record, planned = tune(spec, tspec, out, config_fn=config_fn, run_fn=run_fn, workers=workers, backend=backend, progress=progress, pool=pool)
        counts = execute(planned, out / "runs", run_fn=run_fn, workers=workers, backend=backend, progress=progress, desc=f"{spec.name}", pool=pool)
    history, summary = collect(planned, out / "runs")
    rule = tuning_record["rule"] if tuning_record is not None else "given in the spec"
    for frame in (summary, history):
        if not frame.empty:
            frame["lr_selected_by"] = rule
    seeds = pd.DataFrame()
    if not history.empty:
        seeds = per_seed_metrics(history.assign(run_id=history["block"] + "/" + history["run_id"]))
        seeds["run_id"] = seeds["run_id"].str.split("/", n=1).str[1]
        write_table(history, out / "history")
        write_table(seeds, out / "seeds")
    if not summary.empty:
        write_table(summary, out / "summary")
    return SweepResult(out, history, summary, seeds, counts["failed"], counts, tuning_record)


