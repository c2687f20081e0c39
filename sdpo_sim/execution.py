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
from .provenance import code_hash, git_commit
from .sweep_spec import Planned
from .workers import WorkerPool, exit_if_stopping, sigint_ignored

BACKENDS = ("process", "serial", "ray")
META_COLUMNS = ("block", "run_id", "status", "package_version", "git_commit", "code_hash")

RunFn = Callable[[dict], "tuple[pd.DataFrame, dict]"]  # full config -> (history, summary)


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


def execute_one(run_fn: RunFn, rid: str, config: dict, runs_dir: str, meta: dict) -> dict:
    """Worker body: run one config, write history then the JSON marker atomically; never raises."""
    try:
        return _execute_one(run_fn, rid, config, runs_dir, meta)
    finally:  # a worker told to stop (Ctrl-C in the parent) leaves once the run has unwound; the run stays pending
        exit_if_stopping()


def _execute_one(run_fn: RunFn, rid: str, config: dict, runs_dir: str, meta: dict) -> dict:
    runs = Path(runs_dir)
    meta_path, hist_path = record_paths(runs, rid)
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
                    atomic_write_text(record_paths(runs_dir, p.run_id)[0], json.dumps(rec, indent=1, default=str))
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



def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


