"""Execution of planned runs: in this process, in spawned worker processes, or on Ray; each run's record on disk.

``DIR/runs/<run_id>.parquet`` (its history, ok runs only) is written before ``DIR/runs/<run_id>.json`` (status,
full config, summary or error), the marker that makes a run count as done. Ctrl-C stops the workers and raises
:class:`Interrupted` with the number of finished runs kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import json
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pandas as pd
from tqdm.auto import tqdm

from . import __version__
from .core.io import atomic_write, atomic_write_text, remove_stale_temporaries
from .core.threads import one_thread
from .provenance import code_hash, git_commit
from .sweep_spec import Planned
from .workers import WorkerPool, exit_if_stopping, sigint_ignored

BACKENDS = ("process", "serial", "ray")
META_COLUMNS = ("block", "run_id", "status", "package_version", "git_commit", "code_hash")

RunFn = Callable[[dict], "tuple[pd.DataFrame, dict]"]  # full config -> (history, summary)
# A run function may also train several configurations as one program: it then has ``group_key(config) -> str``
# (configs with equal keys can share a program), ``run_many(configs) -> [(history, summary), ...]`` and
# ``group_runs`` (the most runs, seeds summed, one program holds). Results must not depend on the grouping.


# ----------------------------------------------------------------------------- execution
def record_paths(runs_dir: Path, rid: str) -> tuple[Path, Path]:
    return runs_dir / f"{rid}.json", runs_dir / f"{rid}.parquet"


def load_record(runs_dir: Path, rid: str) -> Optional[dict]:
    """The stored record of a run, or ``None`` if it has not finished (either way)."""
    meta, _ = record_paths(runs_dir, rid)
    if not meta.is_file():
        return None
    return json.loads(meta.read_text())


def is_done(runs_dir: Path, rid: str) -> bool:
    rec = load_record(runs_dir, rid)
    return rec is not None and rec.get("status") == "ok" and record_paths(runs_dir, rid)[1].is_file()


def execute_group(run_fn: RunFn, items: Sequence[tuple[str, dict]], runs_dir: str, meta: dict) -> list[dict]:
    """Worker body for ``items`` = [(run id, config)] that share one program (``run_fn.run_many``; one item: ``run_fn``).
    Each run's history then its JSON marker is written atomically; never raises. If the shared program fails,
    every item is run alone so that each failure is recorded against its own run."""
    try:
        if len(items) == 1:
            return [_execute(lambda: [run_fn(items[0][1])], items, runs_dir, meta)[0]]
        out = _execute(lambda: run_fn.run_many([c for _, c in items]), items, runs_dir, meta, fallback=True)
        return out if out is not None else [_execute(lambda c=c: [run_fn(c)], [(rid, c)], runs_dir, meta)[0] for rid, c in items]
    finally:  # a worker told to stop (Ctrl-C in the parent) leaves once the run has unwound; the run stays pending
        exit_if_stopping()


def _execute(train: Callable[[], list], items: Sequence[tuple[str, dict]], runs_dir: str, meta: dict, *, fallback: bool = False) -> Optional[list[dict]]:
    runs = Path(runs_dir)
    start = time.perf_counter()
    try:
        results = train()
        if len(results) != len(items):
            raise RuntimeError(f"run function returned {len(results)} results for {len(items)} configurations")
        for history, _ in results:
            if not isinstance(history, pd.DataFrame) or history.empty:
                raise RuntimeError(f"run function returned no history ({type(history).__name__})")
        error = None
    except Exception as err:  # a crashed run is recorded, the sweep goes on
        if fallback:
            return None
        results, error = [(None, None)] * len(items), (f"{type(err).__name__}: {err}", traceback.format_exc())
    wall = round((time.perf_counter() - start) / len(items), 3)  # a shared program's time is split evenly
    out = []
    for (rid, config), (history, summary) in zip(items, results):
        meta_path, hist_path = record_paths(runs, rid)
        record = {"run_id": rid, "config": config, **meta}
        if error is None:
            atomic_write(hist_path, lambda tmp, h=history: h.to_parquet(tmp, index=False))
            record.update(status="ok", summary=_jsonable(summary), error=None)
        else:
            record.update(status="failed", summary=None, error=error[0], traceback=error[1])
        record.update(wall_time_s=wall, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), shared_program=len(items))
        atomic_write_text(meta_path, json.dumps(record, indent=1, default=str))
        out.append({"run_id": rid, "status": record["status"], "error": record["error"]})
    return out


def groups(pending: Sequence[Planned], run_fn: RunFn) -> list[list[Planned]]:
    """``pending`` split into the programs it trains as: runs with equal ``run_fn.group_key`` together, in plan
    order, at most ``run_fn.group_runs`` seeds per program; one run per program for a plain run function."""
    if not hasattr(run_fn, "run_many"):
        return [[p] for p in pending]
    open_chunk: dict[str, tuple[list[Planned], int]] = {}  # group key -> (its newest program, the seeds it holds)
    out: list[list[Planned]] = []
    for p in pending:
        key, size = run_fn.group_key(p.config), int(p.config.get("seeds", 1))
        chunk, held = open_chunk.get(key, (None, 0))
        if chunk is None or held + size > run_fn.group_runs:
            chunk, held = [], 0
            out.append(chunk)
        chunk.append(p)
        open_chunk[key] = (chunk, held + size)
    return out


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
    run_fn: RunFn,
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
    meta = {"package_version": __version__, "git_commit": git_commit(), "code_hash": code_hash()}
    outcome = {"total": len(planned), "skipped": len(planned) - len(pending), "ok": 0, "failed": []}
    bar = tqdm(total=len(pending), desc=desc, unit="run", disable=not progress or not pending)

    def record(res: dict) -> None:
        if res["status"] == "ok":
            outcome["ok"] += 1
        else:
            outcome["failed"].append({"run_id": res["run_id"], "error": res["error"]})
        bar.update(1)
        bar.set_postfix(failed=len(outcome["failed"]))

    programs = groups(pending, run_fn)
    try:
        if backend == "ray":
            _execute_ray(programs, runs_dir, run_fn, meta, record)
        elif backend == "serial" or workers == 1 or len(programs) <= 1:
            with one_thread():  # tabular runs are many tiny ops: extra threads only contend
                for group in programs:
                    for res in execute_group(run_fn, _items(group), str(runs_dir), meta):
                        record(res)
        else:
            with contextlib.ExitStack() as stack:
                if pool is None:  # a pool of its own, stopped on the way out (at once on Ctrl-C)
                    pool = stack.enter_context(WorkerPool(workers))
                _execute_pool(programs, runs_dir, run_fn, meta, record, pool)
    finally:
        bar.close()
    return outcome


def _items(group: Sequence[Planned]) -> list[tuple[str, dict]]:
    return [(p.run_id, p.config) for p in group]


def _execute_pool(programs: Sequence[Sequence[Planned]], runs_dir: Path, run_fn: RunFn, meta: dict, record: Callable[[dict], None],
                  pool: WorkerPool) -> None:
    """Run each program on the pool's workers; a worker that dies fails its runs and the pool is replaced.
    On Ctrl-C the pending runs are cancelled and the workers stopped before ``KeyboardInterrupt`` goes on."""
    futures = {}
    try:
        for group in programs:
            futures[pool.submit(execute_group, run_fn, _items(group), str(runs_dir), meta)] = group
        broken = False
        for fut in cf.as_completed(futures):
            try:
                results = fut.result()
            except Exception as err:  # the worker process itself died (e.g. killed, out of memory)
                broken = True
                error = f"worker process failed: {type(err).__name__}: {err}"
                results = []
                for p in futures[fut]:
                    if not is_done(runs_dir, p.run_id):
                        rec = {"run_id": p.run_id, "config": p.config, **meta, "status": "failed", "summary": None, "error": error}
                        atomic_write_text(record_paths(runs_dir, p.run_id)[0], json.dumps(rec, indent=1, default=str))
                    results.append({"run_id": p.run_id, "status": "failed", "error": error})
            for res in results:
                record(res)
        if broken:
            pool.reset()
    except KeyboardInterrupt:
        with sigint_ignored():
            pool.stop()
        raise


def _execute_ray(programs: Sequence[Sequence[Planned]], runs_dir: Path, run_fn: RunFn, meta: dict, record: Callable[[dict], None]) -> None:
    import ray  # check_backend made sure it is installed

    ray.init(ignore_reinit_error=True)
    remote = ray.remote(execute_group)
    refs = [remote.remote(run_fn, _items(group), str(runs_dir), meta) for group in programs]
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        for res in ray.get(done[0]):
            record(res)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


