"""Sweeps: a YAML spec → a grid of toy-world runs → tidy Parquet/CSV tables; parallel and resumable.

A spec (see docs/experiments.md) has a ``base`` mapping of flat ``RunConfig``/``MethodConfig``
fields, a ``grid`` (Cartesian product of lists), optional ``cases`` (a list of overrides, each
crossed with the grid), optional ``blocks`` (several such sub-sweeps sharing ``base``) and an
optional ``tuning`` block (per-method learning rates chosen on disjoint seeds, :mod:`sdpo_sim.tuning`).

Layout of an output directory::

    DIR/spec.yaml              the spec this directory belongs to
    DIR/runs/<run_id>.json     one finished run: status ok|failed, full config, summary or error
    DIR/runs/<run_id>.parquet  its history (ok runs only); written before the .json marker
    DIR/history.{parquet,csv}  one row per block × run × seed × evaluation step
    DIR/summary.{parquet,csv}  one row per block × run
    DIR/seeds.{parquet,csv}    one row per block × run × seed (budgets, AUC, entropy drop, credit)
    DIR/tuning.{json,csv}      learning-rate selection (if the spec tunes)

A run's id is a hash of its full validated config, so restarting skips what is finished and a
changed spec is accepted only if every finished run is still part of it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import importlib.util
import itertools
import json
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pandas as pd
import yaml
from tqdm.auto import tqdm

from . import __version__
from .io import atomic_write, atomic_write_text, check_output_dir, remove_stale_temporaries
from .workers import WorkerPool, exit_if_stopping, sigint_ignored

SPEC_KEYS = ("name", "description", "base", "grid", "cases", "blocks", "tuning")
BLOCK_KEYS = ("name", "base", "grid", "cases")
BACKENDS = ("process", "serial", "ray")
PACKAGED_SPECS = ("claims", "main", "quick")  # names `sdpo-sim sweep` resolves to sdpo_sim/specs/*.yaml
META_COLUMNS = ("block", "run_id", "status", "package_version", "git_commit")

ConfigFn = Callable[[dict], dict]  # flat mapping -> full validated flat config (raises ValueError)
RunFn = Callable[[dict], "tuple[pd.DataFrame, dict]"]  # full config -> (history, summary)


# ----------------------------------------------------------------------------- toy-world adapters
def toy_config(data: Mapping[str, Any]) -> dict:
    """Validate a flat mapping as a ``RunConfig`` and return its full flat form (all defaults filled in)."""
    from .train import RunConfig

    return RunConfig.from_dict(dict(data)).to_dict()


def toy_run(config: Mapping[str, Any]) -> "tuple[pd.DataFrame, dict]":
    """Run the toy world on one full config: ``(history [seeds × eval steps rows], summary)``."""
    from .train import RunConfig, run

    result = run(RunConfig.from_dict(dict(config)))
    summary = dict(result.summary())
    summary.pop("config", None)
    return result.history, summary


# ----------------------------------------------------------------------------- spec
@dataclass
class Block:
    """One sub-sweep: ``base`` overrides, a grid and optional cases."""

    name: str
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    cases: list = field(default_factory=lambda: [{}])

    def points(self, shared_base: Mapping[str, Any]) -> list[dict]:
        """Every flat (unvalidated) config of this block: base ∪ case ∪ grid point, later winning."""
        keys = list(self.grid)
        out = []
        for case in self.cases:
            for values in itertools.product(*(self.grid[k] for k in keys)):
                out.append({**shared_base, **self.base, **case, **dict(zip(keys, values))})
        return out


@dataclass
class Spec:
    """A parsed, structurally checked sweep spec (field names are checked by :func:`plan`)."""

    name: str
    base: dict
    blocks: list
    tuning: Optional[dict] = None
    description: str = ""
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "spec") -> "Spec":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a sweep spec must be a mapping with keys {', '.join(SPEC_KEYS)}; got {type(data).__name__}")
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SPEC_KEYS)}")
        base = _mapping(data.get("base", {}), f"{source}: base")
        if "blocks" in data:
            if "grid" in data or "cases" in data:
                raise ValueError(f"{source}: give either top-level grid/cases or blocks, not both")
            raw_blocks = data["blocks"]
            if not isinstance(raw_blocks, list) or not raw_blocks:
                raise ValueError(f"{source}: blocks must be a non-empty list of mappings with keys {', '.join(BLOCK_KEYS)}")
        else:
            raw_blocks = [{"name": "main", "grid": data.get("grid", {}), "cases": data.get("cases", [{}])}]
        blocks, names = [], set()
        for i, rb in enumerate(raw_blocks):
            where = f"{source}: blocks[{i}]"
            rb = _mapping(rb, where)
            bad = sorted(set(rb) - set(BLOCK_KEYS))
            if bad:
                raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; allowed: {', '.join(BLOCK_KEYS)}")
            name = str(rb.get("name", f"block{i}"))
            if name in names:
                raise ValueError(f"{where}: duplicate block name {name!r}")
            names.add(name)
            grid = _grid(rb.get("grid", {}), f"{where}.grid" if "blocks" in data else f"{source}: grid")
            cases = _cases(rb.get("cases", [{}]), f"{where}.cases" if "blocks" in data else f"{source}: cases")
            for j, case in enumerate(cases):
                both = sorted(set(case) & set(grid))
                if both:
                    raise ValueError(f"{where}: field(s) {', '.join(map(repr, both))} set by both grid and cases[{j}]; set each field in one place")
            blocks.append(Block(name, _mapping(rb.get("base", {}), f"{where}.base"), grid, cases))
        tuning = data.get("tuning")
        if tuning is not None:
            tuning = _mapping(tuning, f"{source}: tuning")
        return cls(name=str(data.get("name", "sweep")), base=base, blocks=blocks, tuning=tuning, description=str(data.get("description", "")), raw=dict(data))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Spec":
        """Read a YAML spec with a safe loader."""
        path = Path(path)
        expected = f"a sweep spec file (YAML) or a packaged spec name ({' | '.join(PACKAGED_SPECS)}) is expected"
        if path.is_dir():
            raise ValueError(f"spec {str(path)!r} is a directory; {expected}")
        if not path.is_file():
            raise ValueError(f"spec file {str(path)!r} does not exist; {expected}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file; a sweep spec is YAML text") from None
        return cls.from_dict(data, source=str(path))


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of field names to values, got {type(value).__name__}")
    return dict(value)


def _grid(value: Any, where: str) -> dict:
    grid = _mapping(value, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
    return grid


def _cases(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of mappings")
    return [_mapping(c, f"{where}[{i}]") for i, c in enumerate(value)]


# ----------------------------------------------------------------------------- plan
def run_id(config: Mapping[str, Any]) -> str:
    """Stable 12-hex id of a full config: ``sha1(json(config, sorted keys))[:12]``."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Planned:
    """A validated run: its id, full config and the blocks it belongs to."""

    run_id: str
    config: dict
    blocks: list


def validate_points(points: Sequence[tuple[str, dict]], config_fn: ConfigFn) -> list[Planned]:
    """Validate every (block, flat config); deduplicate by run id. Raises ``ValueError`` naming the point."""
    planned: dict[str, Planned] = {}
    for block, point in points:
        try:
            full = config_fn(point)
        except ValueError as err:
            shown = {k: v for k, v in point.items()}
            raise ValueError(f"block {block!r}, run {shown}: {err}") from None
        rid = run_id(full)
        if rid in planned:
            if block not in planned[rid].blocks:
                planned[rid].blocks.append(block)
        else:
            planned[rid] = Planned(rid, full, [block])
    return list(planned.values())


def check_fields(spec: Spec, known: Sequence[str]) -> None:
    """Refuse any field name (in base, blocks, grids, cases) that is not a config field, naming where it is."""
    known_set = set(known)

    def check(keys: Sequence[str], where: str) -> None:
        bad = sorted(set(keys) - known_set)
        if bad:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, bad))}; known fields: {', '.join(sorted(known_set))}")

    check(list(spec.base), "base")
    for b in spec.blocks:
        check(list(b.base), f"block {b.name!r} base")
        check(list(b.grid), f"block {b.name!r} grid")
        for i, case in enumerate(b.cases):
            check(list(case), f"block {b.name!r} cases[{i}]")


def expand(spec: Spec) -> list[tuple[str, dict]]:
    """All (block name, flat config) points of the spec, in order."""
    return [(b.name, p) for b in spec.blocks for p in b.points(spec.base)]


# ----------------------------------------------------------------------------- execution
def git_commit() -> str:
    """The source tree's ``git rev-parse HEAD`` (+ ``-dirty`` if modified), or ``unknown``."""
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _paths(runs_dir: Path, rid: str) -> tuple[Path, Path]:
    return runs_dir / f"{rid}.json", runs_dir / f"{rid}.parquet"


def load_record(runs_dir: Path, rid: str) -> Optional[dict]:
    """The stored record of a run, or ``None`` if it has not finished (either way)."""
    meta, _ = _paths(runs_dir, rid)
    if not meta.is_file():
        return None
    return json.loads(meta.read_text())


def is_done(runs_dir: Path, rid: str) -> bool:
    rec = load_record(runs_dir, rid)
    return rec is not None and rec.get("status") == "ok" and _paths(runs_dir, rid)[1].is_file()


def execute_one(run_fn: RunFn, rid: str, config: dict, runs_dir: str, meta: dict) -> dict:
    """Worker body: run one config, write history then the JSON marker atomically; never raises."""
    try:
        return _execute_one(run_fn, rid, config, runs_dir, meta)
    finally:  # a worker told to stop (Ctrl-C in the parent) leaves once the run has unwound; the run stays pending
        exit_if_stopping()


def _execute_one(run_fn: RunFn, rid: str, config: dict, runs_dir: str, meta: dict) -> dict:
    runs = Path(runs_dir)
    meta_path, hist_path = _paths(runs, rid)
    start = time.perf_counter()
    record = {"run_id": rid, "config": config, **meta}
    try:
        history, summary = run_fn(config)
        if not isinstance(history, pd.DataFrame) or history.empty:
            raise RuntimeError(f"run function returned no history ({type(history).__name__})")
        atomic_write(hist_path, lambda tmp: history.to_parquet(tmp, index=False))
        record.update(status="ok", summary=_jsonable(summary), error=None)
    except Exception as err:  # a crashed run is recorded, the sweep goes on
        record.update(status="failed", summary=None, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record.update(wall_time_s=round(time.perf_counter() - start, 3), finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(meta_path, json.dumps(record, indent=1, default=str))
    return {"run_id": rid, "status": record["status"], "error": record["error"]}


@contextlib.contextmanager
def _single_thread():
    """Run torch on one thread inside the block, restoring the caller's setting after."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, raised once its workers are stopped: ``kept`` finished runs are on disk."""

    def __init__(self, kept: int) -> None:
        super().__init__(kept)
        self.kept = kept


def kept_runs(out: Union[str, Path]) -> int:
    """How many finished (ok) runs, tuning runs included, a sweep directory holds."""
    runs_dir = Path(out) / "runs"
    return sum(1 for meta in runs_dir.glob("*.json") if is_done(runs_dir, meta.stem)) if runs_dir.is_dir() else 0


def check_backend(workers: Any, backend: str) -> None:
    """Refuse a worker count or backend that cannot run, before anything is created (Ray must be importable)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {', '.join(map(repr, BACKENDS))}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer (1 runs in this process)")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("backend='ray' needs Ray, which is not installed; install the extra (pip install 'sdpo-lab[ray]') "
                         "or choose backend 'process' or 'serial'")


def execute(
    planned: Sequence[Planned],
    runs_dir: Path,
    *,
    run_fn: RunFn = toy_run,
    workers: int = 1,
    backend: str = "process",
    progress: bool = True,
    desc: str = "runs",
    pool: Optional[WorkerPool] = None,
) -> dict:
    """Run every planned config not yet finished; returns counts and failures.

    ``backend``: ``process`` (``workers`` spawned processes; ``workers=1`` runs in this process),
    ``serial`` (in this process), ``ray`` (a Ray cluster; needs the ``ray`` extra and a filesystem
    shared by the workers). ``pool`` lets several calls share the worker processes.
    """
    check_backend(workers, backend)
    runs_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(runs_dir)  # left by a worker killed mid-write (its run is not marked done: it reruns)
    pending = [p for p in planned if not is_done(runs_dir, p.run_id)]
    meta = {"package_version": __version__, "git_commit": git_commit()}
    outcome = {"total": len(planned), "skipped": len(planned) - len(pending), "ok": 0, "failed": []}
    bar = tqdm(total=len(pending), desc=desc, unit="run", disable=not progress or not pending)

    def record(res: dict) -> None:
        if res["status"] == "ok":
            outcome["ok"] += 1
        else:
            outcome["failed"].append({"run_id": res["run_id"], "error": res["error"]})
        bar.update(1)
        bar.set_postfix(failed=len(outcome["failed"]))

    try:
        if backend == "ray":
            _execute_ray(pending, runs_dir, run_fn, meta, record)
        elif backend == "serial" or workers == 1 or len(pending) <= 1:
            with _single_thread():  # tabular runs are many tiny ops: extra threads only contend
                for p in pending:
                    record(execute_one(run_fn, p.run_id, p.config, str(runs_dir), meta))
        else:
            with contextlib.ExitStack() as stack:
                if pool is None:  # a pool of its own, stopped on the way out (at once on Ctrl-C)
                    pool = stack.enter_context(WorkerPool(workers))
                _execute_pool(pending, runs_dir, run_fn, meta, record, pool)
    finally:
        bar.close()
    return outcome


def _execute_pool(pending: Sequence[Planned], runs_dir: Path, run_fn: RunFn, meta: dict, record: Callable[[dict], None],
                  pool: WorkerPool) -> None:
    """Run ``pending`` on the pool's workers; a worker that dies fails its run and the pool is replaced.
    On Ctrl-C the pending runs are cancelled and the workers stopped before ``KeyboardInterrupt`` goes on."""
    futures = {}
    try:
        for p in pending:
            futures[pool.submit(execute_one, run_fn, p.run_id, p.config, str(runs_dir), meta)] = p
        broken = False
        for fut in cf.as_completed(futures):
            p = futures[fut]
            try:
                record(fut.result())
            except Exception as err:  # the worker process itself died (e.g. killed, out of memory)
                broken = True
                error = f"worker process failed: {type(err).__name__}: {err}"
                if not is_done(runs_dir, p.run_id):
                    rec = {"run_id": p.run_id, "config": p.config, **meta, "status": "failed", "summary": None, "error": error}
                    atomic_write_text(_paths(runs_dir, p.run_id)[0], json.dumps(rec, indent=1, default=str))
                record({"run_id": p.run_id, "status": "failed", "error": error})
        if broken:
            pool.reset()
    except KeyboardInterrupt:
        with sigint_ignored():
            pool.stop()
        raise


def _execute_ray(pending: Sequence[Planned], runs_dir: Path, run_fn: RunFn, meta: dict, record: Callable[[dict], None]) -> None:
    import ray  # check_backend made sure it is installed

    ray.init(ignore_reinit_error=True)
    remote = ray.remote(execute_one)
    refs = [remote.remote(run_fn, p.run_id, p.config, str(runs_dir), meta) for p in pending]
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        record(ray.get(done[0]))


# ----------------------------------------------------------------------------- tables
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _with_config(frame: pd.DataFrame, config: Mapping[str, Any], meta: Mapping[str, Any]) -> pd.DataFrame:
    """Prepend meta columns and one column per config field; a field named like a metric becomes ``config.<name>``."""
    frame = frame.copy()
    cols = {}
    for k, v in meta.items():
        cols[k] = v
    for k, v in config.items():
        name = f"config.{k}" if k in frame.columns or k in meta else k
        cols[name] = v
    cols["config"] = json.dumps(dict(config), sort_keys=True, default=str)
    extra = pd.DataFrame({k: [v] * len(frame) for k, v in cols.items()}, index=frame.index)
    return pd.concat([extra, frame], axis=1)


def collect(planned: Sequence[Planned], runs_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the stored runs of a plan into ``(history, summary)`` tidy frames (one row set per block)."""
    histories, summaries = [], []
    for p in planned:
        rec = load_record(runs_dir, p.run_id)
        if rec is None:
            continue
        for block in p.blocks:
            meta = {"block": block, "run_id": p.run_id, "status": rec["status"], "package_version": rec.get("package_version"), "git_commit": rec.get("git_commit")}
            summ = {k: v for k, v in (rec.get("summary") or {}).items() if k != "per_seed"}
            if isinstance(summ.get("final_reward_ci95"), (list, tuple)) and len(summ["final_reward_ci95"]) == 2:
                lo, hi = summ.pop("final_reward_ci95")
                summ["final_reward_ci_lo"], summ["final_reward_ci_hi"] = lo, hi
            row = pd.DataFrame([{**summ, "error": rec.get("error"), "wall_time_s": rec.get("wall_time_s")}])
            summaries.append(_with_config(row, p.config, meta))
            if rec["status"] == "ok":
                hist = pd.read_parquet(_paths(runs_dir, p.run_id)[1])
                histories.append(_with_config(hist, p.config, meta))
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    return history, summary


def write_table(frame: pd.DataFrame, path_stem: Path) -> None:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically."""
    atomic_write(path_stem.with_suffix(".parquet"), lambda tmp: frame.to_parquet(tmp, index=False))
    atomic_write(path_stem.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))


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


def _known_fields(config_fn: ConfigFn) -> list[str]:
    return list(config_fn({}))


def plan(spec: Spec, config_fn: ConfigFn = toy_config) -> list[Planned]:
    """Validate the whole spec (field names, every grid point) before anything runs."""
    check_fields(spec, _known_fields(config_fn))
    points = expand(spec)
    if not points:
        raise ValueError("the spec expands to no runs")
    planned = validate_points(points, config_fn)
    if spec.tuning is not None:
        from .tuning import TuningSpec

        TuningSpec.from_dict(spec.tuning, _known_fields(config_fn)).check_against(spec, points, config_fn)
    return planned


def check_compatible(out: Path, spec: Spec, wanted: set, *, ignore: Sequence[str] = ()) -> None:
    """Refuse a directory holding finished runs that the new spec would not contain.

    A stored run is part of the spec if its id is in ``wanted`` — ids computed from configs with the
    fields in ``ignore`` removed (``lr`` when tuning chooses it), see :func:`loose_id`.
    """
    runs_dir = out / "runs"
    if not runs_dir.is_dir():
        return
    orphan = []
    for meta in sorted(runs_dir.glob("*.json")):
        config = json.loads(meta.read_text()).get("config", {})
        if meta.stem not in wanted and loose_id(config, ignore) not in wanted:
            orphan.append(meta.stem)
    if orphan:
        old = out / "spec.yaml"
        hint = ""
        if old.is_file():
            try:
                before = yaml.safe_load(old.read_text()) or {}
                changed = sorted(k for k in set(before) | set(spec.raw) if before.get(k) != spec.raw.get(k))
                hint = f" (changed top-level key(s): {', '.join(changed)})" if changed else ""
            except yaml.YAMLError:
                pass
        raise ValueError(
            f"{out} holds {len(orphan)} finished run(s) that this spec does not contain{hint}, e.g. {orphan[0]}: "
            "the spec changed in a way that conflicts with the existing results. Use a new --out directory "
            "(or delete the old one); adding grid values or seeds to a spec is fine and resumes.")


def loose_id(config: Mapping[str, Any], ignore: Sequence[str] = ()) -> str:
    """:func:`run_id` of a config without the fields in ``ignore``."""
    return run_id({k: v for k, v in config.items() if k not in ignore}) if ignore else run_id(config)


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
        from .tuning import TuningSpec, exempt_blocks, tune

        tspec = TuningSpec.from_dict(spec.tuning, _known_fields(config_fn))
        wanted = {p.run_id for p in tspec.plan(expand(spec), config_fn, exempt_blocks(spec))} | {p.run_id for p in planned} | {loose_id(p.config, ["lr"]) for p in planned}
        check_compatible(out, spec, wanted, ignore=["lr"])  # refuse before running anything
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
        from .stats import per_seed_metrics

        seeds = per_seed_metrics(history.assign(run_id=history["block"] + "/" + history["run_id"]))
        seeds["run_id"] = seeds["run_id"].str.split("/", n=1).str[1]
        write_table(history, out / "history")
        write_table(seeds, out / "seeds")
    if not summary.empty:
        write_table(summary, out / "summary")
    return SweepResult(out, history, summary, seeds, counts["failed"], counts, tuning_record)


def load_tables(out: Union[str, Path]) -> dict[str, pd.DataFrame]:
    """Read a finished sweep's tables (``history``, ``summary``, ``seeds``) from Parquet."""
    out = Path(out)
    if not out.exists():
        raise ValueError(f"sweep directory {str(out)!r} does not exist; give a directory written by `sdpo-sim sweep SPEC --out DIR`")
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file, not a sweep directory; give a directory written by `sdpo-sim sweep SPEC --out DIR`")
    if not (out / "summary.parquet").is_file():
        raise ValueError(f"{out} holds no sweep results (no summary.parquet); run `sdpo-sim sweep SPEC --out {out}` first")
    tables = {}
    for name in ("history", "summary", "seeds"):
        path = out / f"{name}.parquet"
        tables[name] = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    return tables
