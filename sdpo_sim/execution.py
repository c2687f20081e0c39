"""Execution of planned runs: in this process, in spawned worker processes, or on Ray; each run's record on disk.

``DIR/runs/<run_id>.parquet`` (its history, ok runs only) is written before ``DIR/runs/<run_id>.json`` (status,
full config, summary or error), the marker that makes a run count as done. Ctrl-C stops the workers and raises
:class:`Interrupted` with the number of finished runs kept.

On Ray (:class:`RayBackend`, docs/cluster.md) each program is one task; ``DIR/runs/<run_id>.log`` beside the
record holds, per attempt, the node, host and pid that ran it, the run's own output and how it ended. A task whose
worker dies is retried ``max_retries`` times (skipping what the killed attempt already finished), then its runs
are recorded failed with Ray's reason. Before anything runs, one task per node checks that it can read and write
the runs directory (a results path every node must reach).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import importlib.util
import io
import json
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass
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
RAY_STOP_GRACE_S = 3.0  # Ctrl-C: how long cancelled Ray tasks may take to unwind (atomic writes clean up) before they are killed
RAY_PROBE_TIMEOUT_S = 120.0  # how long the per-node check of the runs directory may wait for a worker on every node
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


@dataclass(frozen=True)
class RayBackend:
    """The ``ray`` backend with its settings (``backend="ray"`` is ``RayBackend()``).

    ``address``: ``None`` starts a local cluster of ``workers`` CPUs (shut down with this process, or at once on
    Ctrl-C); ``"auto"`` joins the cluster ``ray start`` runs on this machine; ``"HOST:PORT"`` (or ``ray://...``)
    joins that one. ``cpus_per_run`` / ``gpus_per_run``: the resources each task (one program) asks for, so a node
    of C CPUs runs ``floor(C / cpus_per_run)`` at a time. ``max_retries``: how often a task whose worker or node
    died is run again before its runs are recorded failed."""

    address: Optional[str] = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_retries: int = 1

    def check(self) -> None:
        """Refuse settings that cannot run (one line each), and an explicit ``HOST:PORT`` nobody listens on."""
        for name, value, low in (("cpus_per_run", self.cpus_per_run, "> 0"), ("gpus_per_run", self.gpus_per_run, ">= 0")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 if low == "> 0" else value >= 0) or value != value or value == float("inf"):
                raise ValueError(f"ray {name}={value!r} must be a finite number {low} (the CPUs/GPUs each run's task asks for)")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"ray max_retries={self.max_retries!r} must be an integer >= 0 (0: a run whose worker dies is recorded failed)")
        if self.address is not None:
            _check_reachable(self.address)


def _check_reachable(address: str) -> None:
    """``HOST:PORT`` must accept a TCP connection (``ray.init`` would otherwise retry for a long while); ``auto`` and
    ``ray://`` addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address={address!r} is not allowed; give 'auto' (the cluster `ray start` runs here), HOST:PORT of a "
                         "head node, a ray:// client address, or none to start a local cluster")
    try:
        socket.create_connection((host, int(port)), timeout=3.0).close()
    except OSError as err:
        raise ValueError(f"ray_address={address!r} is not reachable ({err.strerror or err}); start a head node there "
                         "(`ray start --head`), or give no address to start a local cluster") from None


def backend_name(backend: Union[str, RayBackend]) -> str:
    """``"ray"`` for a :class:`RayBackend`, else the backend string itself."""
    return "ray" if isinstance(backend, RayBackend) else backend


def check_backend(workers: Any, backend: Union[str, RayBackend]) -> None:
    """Refuse a worker count or backend that cannot run, before anything is created (Ray must be importable)."""
    if isinstance(backend, RayBackend):
        backend.check()
    backend = backend_name(backend)
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
    backend: Union[str, RayBackend] = "process",
    progress: bool = True,
    desc: str = "runs",
    pool: Optional[WorkerPool] = None,
) -> dict:
    """Run every planned config not yet finished; returns counts and failures.

    ``backend``: ``process`` (``workers`` spawned processes; ``workers=1`` runs in this process),
    ``serial`` (in this process), ``ray`` or a :class:`RayBackend` (a Ray cluster; needs the ``ray`` extra and a
    filesystem shared by the nodes). ``pool`` lets several calls share the worker processes.
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
        if backend_name(backend) == "ray":
            _execute_ray(programs, runs_dir, run_fn, meta, record, backend if isinstance(backend, RayBackend) else RayBackend(), workers)
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
                results = _record_lost(futures[fut], runs_dir, meta, f"worker process failed: {type(err).__name__}: {err}")
            for res in results:
                record(res)
        if broken:
            pool.reset()
    except KeyboardInterrupt:
        with sigint_ignored():
            pool.stop()
        raise


def _record_lost(group: Sequence[Planned], runs_dir: Path, meta: dict, error: str) -> list[dict]:
    """The runs of a program whose worker died: each one not finished meanwhile is recorded failed with ``error``."""
    results = []
    for p in group:
        if not is_done(runs_dir, p.run_id):
            rec = {"run_id": p.run_id, "config": p.config, **meta, "status": "failed", "summary": None, "error": error}
            atomic_write_text(record_paths(runs_dir, p.run_id)[0], json.dumps(rec, indent=1, default=str))
        results.append({"run_id": p.run_id, "status": "failed", "error": error})
    return results


# ----------------------------------------------------------------------------- Ray
_ray_session: dict = {}  # the Ray connection this process made: {"key": (address, num_cpus), "started": bool}


def _ray():
    """The ``ray`` module, imported on first use: it is an optional extra and takes about a second to import."""
    return importlib.import_module("ray")  # check_backend made sure it is installed


def ray_connect(backend: RayBackend, workers: int) -> bool:
    """Connect this process to the cluster ``backend`` names (start a local one of ``workers`` CPUs when it names
    none); an existing connection is kept: one this process made with the same settings, or one its caller made
    (``ray.init`` before the sweep). Returns whether the cluster is one this process started. Failing to connect is
    a ``ValueError`` of one line."""
    ray = _ray()
    key = (backend.address, workers if backend.address is None else None)
    if ray.is_initialized():
        if not _ray_session:
            return False  # the caller's own connection
        if _ray_session["key"] == key:
            return _ray_session["started"]
        ray.shutdown()
        _ray_session.clear()
    kwargs = dict(log_to_driver=False, include_dashboard=False, configure_logging=True, logging_level="warning")
    if backend.address is None:
        try:
            ray.init(address="local", num_cpus=workers, **kwargs)  # "local": a new cluster, never one found running here
        except Exception as err:  # Ray raises a bare Exception when its raylet misses its 30 s start-up window (an overloaded machine)
            raise OSError(f"Ray could not start a local cluster: {_first_line(err)}") from None
    else:
        try:
            ray.init(address=backend.address, **kwargs)
        except (ConnectionError, RuntimeError) as err:
            raise ValueError(f"cannot connect to the Ray cluster at {backend.address!r}: {_first_line(err)}") from None
    _ray_session.update(key=key, started=backend.address is None)
    return _ray_session["started"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def ray_disconnect() -> None:
    """Leave the cluster this process connected to (and stop it, if it started it); a caller's own connection stays."""
    if _ray_session:
        _ray_session.clear()
        _ray().shutdown()


def _probe_node(runs_dir: str, token: str) -> Optional[str]:
    """On one node: read the driver's probe file and write this node's; ``None`` if both work, else why not."""
    runs = Path(runs_dir)
    try:
        seen = (runs / f".ray-probe-{token}").read_text()
    except OSError as err:
        return f"cannot read what the driver writes there ({type(err).__name__}: {err.strerror or err})"
    if seen != token:
        return "sees a different file there than the driver wrote"
    try:
        (runs / f".ray-probe-{token}-{os.getpid()}-{socket.gethostname()}").write_text(token)
    except OSError as err:
        return f"cannot write there ({type(err).__name__}: {err.strerror or err})"
    return None


def check_shared_dir(runs_dir: Path) -> None:
    """One zero-CPU task pinned to each live node reads a file the driver wrote in ``runs_dir`` and writes one back:
    a ``ValueError`` of one line names the first node that cannot (results must go where every node can reach)."""
    ray = _ray()
    token = uuid.uuid4().hex
    probe = runs_dir / f".ray-probe-{token}"
    probe.write_text(token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(_probe_node)
        refs = [task.options(num_cpus=0, max_retries=0, scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(runs_dir), token) for n in nodes]
        for node, problem in zip(nodes, ray.get(refs, timeout=RAY_PROBE_TIMEOUT_S)):
            if problem is not None:
                raise ValueError(f"results directory {str(runs_dir)!r} is not usable from Ray node {node.get('NodeManagerAddress')} "
                                 f"({node['NodeID'][:8]}): it {problem}; give --out a path every node mounts (e.g. NFS), writable by the workers")
        written = len(list(runs_dir.glob(f".ray-probe-{token}-*")))
        if written != len(nodes):
            raise ValueError(f"results directory {str(runs_dir)!r}: {len(nodes)} Ray nodes wrote there but the driver sees {written} of "
                             "their files; give --out a path every node mounts at the same place (e.g. NFS)")
    finally:
        for path in runs_dir.glob(f".ray-probe-{token}*"):
            path.unlink(missing_ok=True)


class _Tee(io.TextIOBase):
    """A text stream writing to several open files (a shared program's output goes to each of its runs' logs)."""

    def __init__(self, files: Sequence[Any]) -> None:
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
            f.flush()
        return len(text)


def _log_line(text: str) -> str:
    return f"[{datetime.now(timezone.utc).isoformat(timespec='seconds')}] {text}\n"


def ray_group(run_fn: RunFn, items: Sequence[tuple[str, dict]], runs_dir: str, meta: dict) -> list[dict]:
    """Ray task body: :func:`execute_group` on one torch thread (as the local backends run), skipping runs an
    earlier, killed attempt of this task already finished, with each run's output appended to ``<run_id>.log``."""
    runs = Path(runs_dir)
    done = [{"run_id": rid, "status": "ok", "error": None} for rid, _ in items if is_done(runs, rid)]
    todo = [(rid, c) for rid, c in items if not is_done(runs, rid)]
    if not todo:
        return done
    node = _ray().get_runtime_context().get_node_id()
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(runs / f"{rid}.log", "a", encoding="utf-8")) for rid, _ in todo]
        for f in logs:
            f.write(_log_line(f"attempt on node {node[:8]} host {socket.gethostname()} pid {os.getpid()}: {len(todo)} run(s) as one program"))
            f.flush()
        tee = _Tee(logs)
        with one_thread(), contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
            results = execute_group(run_fn, todo, runs_dir, meta)
        for f, res in zip(logs, results):
            f.write(_log_line(f"{res['status']}" + ("" if res["error"] is None else f": {res['error']}")))
    return done + results


def _execute_ray(programs: Sequence[Sequence[Planned]], runs_dir: Path, run_fn: RunFn, meta: dict, record: Callable[[dict], None],
                 backend: RayBackend, workers: int) -> None:
    """Each program as one Ray task (``backend``'s resources and retries); results recorded as they come back. A task
    that fails for good (its worker or node died more than ``max_retries`` times) has its runs recorded failed with
    Ray's reason. Ctrl-C cancels every outstanding task and stops a cluster this process started."""
    if not programs:
        return
    ray = _ray()
    started = ray_connect(backend, workers)
    pending: list = []
    try:
        check_shared_dir(runs_dir)
        task = ray.remote(ray_group).options(num_cpus=backend.cpus_per_run, num_gpus=backend.gpus_per_run, max_retries=backend.max_retries,
                                             retry_exceptions=False)
        owner = {}
        for group in programs:
            owner[task.remote(run_fn, _items(group), str(runs_dir), meta)] = group
        pending = list(owner)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayError as err:  # the worker or its node died, more often than max_retries allows
                results = _record_lost(owner[done[0]], runs_dir, meta, f"Ray task failed after {backend.max_retries} retries: {type(err).__name__}: {_first_line(err)}")
                for res in results:  # the dead worker could not say so in the run's log
                    with open(runs_dir / f"{res['run_id']}.log", "a", encoding="utf-8") as log:
                        log.write(_log_line(f"failed: {res['error']}"))
            for res in results:
                record(res)
        remove_stale_temporaries(runs_dir)  # left by a worker killed mid-write (its task was retried or its runs failed)
    except KeyboardInterrupt:
        with sigint_ignored():
            _cancel(pending)
            if started:
                ray_disconnect()
            remove_stale_temporaries(runs_dir)
        raise


def _cancel(refs: Sequence[Any]) -> None:
    """Cancel Ray tasks: a KeyboardInterrupt in those running (their atomic writes clean up), then, after
    :data:`RAY_STOP_GRACE_S`, their workers killed."""
    ray = _ray()
    for ref in refs:
        ray.cancel(ref)
    _, left = ray.wait(list(refs), num_returns=len(refs), timeout=RAY_STOP_GRACE_S) if refs else ([], [])
    for ref in left:
        ray.cancel(ref, force=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


