"""The Ray backend for real: a local two-node cluster (``ray start --head`` on loopback plus a worker node joining
it), tiny toy-world sweeps on it, and the faults a cluster has.

- Tables: the same sweep on Ray and on the local backend gives byte-identical history/seeds Parquet files (and
  equal summaries but for wall time).
- A worker SIGKILLed in the middle of a run: the task is retried (``max_retries=1``) or, with no retries, the run is
  recorded failed with Ray's reason; every finished run is kept once; the same command then completes the sweep.
- The driver SIGKILLed mid-sweep: the same command resumes from disk, no run twice.
- Ctrl-C of a driver that started its own cluster: exit 130 with one line, outstanding tasks cancelled, none of the
  Ray processes it started left.
- Bad input: unreachable address, non-positive CPUs per run, a results path a worker node cannot write: exit 2, one line.

The worker node runs in a mount namespace of its own (``unshare -m``) where ``<base>/readonly`` is read-only, the
stand-in for a node that does not mount the results path writable (where ``unshare`` is refused, that one case
skips). Synchronisation is by polling with deadlines; nothing asserts a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ray = pytest.importorskip("ray")

from sdpo_sim.cli import main  # noqa: E402
from sdpo_sim.execution import RayBackend, ray_disconnect  # noqa: E402
from sdpo_sim.sweep import Spec, plan, run_sweep  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find processes")

BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # `ray start` nodes and drivers must agree on auth
DEADLINE_S = 180.0  # generous: Ray nodes and workers importing torch on a shared 2-core machine
TINY = {"vocab_size": 4, "seq_len": 3, "steps": 10, "seeds": 2, "batch_size": 16, "eval_every": 5}
SPEC = {"name": "ray", "base": TINY, "grid": {"method": ["reinforce", "sdpo"], "noise": [0.0, 0.2]}}  # 4 runs, 2 programs
# one run long enough (400 steps: seconds) to be killed in the middle, two short ones; each its own program (steps differ)
KILL_SPEC = {"name": "kill", "base": {**TINY, "method": "sdpo"}, "cases": [{"steps": 400, "eval_every": 200}, {"steps": 10}, {"steps": 12}]}
# 8 runs of one program each (method, feedback, batch size are not per-run fields), as tests/test_interrupt_sim.py has
MANY = {"name": "many", "base": {"vocab_size": 3, "seq_len": 2, "steps": 200, "seeds": 1, "num_generations": 2, "eval_every": 100},
        "grid": {"method": ["sdpo", "reinforce"], "feedback": ["binary", "continuous"], "batch_size": [4, 6]}}


def wait_for(condition, what: str, deadline_s: float = DEADLINE_S, proc: subprocess.Popen | None = None):
    """Poll ``condition()`` until truthy; fail naming ``what`` at the deadline (or when ``proc`` ended first)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver ended (rc {proc.returncode}) before {what}: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_group(pgid: int) -> None:
    """SIGTERM a process group, SIGKILL what is left after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while group_pids(pgid) and time.monotonic() < end:
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def start(groups: list, cmd: list, env: dict) -> None:
    """Run a `ray start` command in a process group of its own (appended to ``groups``); once more if it fails: Ray gives
    a raylet 30 s to register, which an overloaded shared machine can miss."""
    for attempt in range(2):
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        groups.append(proc.pid)
        out, _ = proc.communicate(timeout=DEADLINE_S)
        if proc.returncode == 0:
            return
        stop_group(proc.pid)
    pytest.fail(f"`{' '.join(cmd)}` failed twice: {out[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (1 CPU) and a worker node (1 CPU) on loopback, each in its own process group, stopped after the
    module. Yields ``(address, base directory, whether <base>/readonly is read-only on the worker node)``."""
    base = tmp_path_factory.mktemp("ray-cluster")
    (base / "readonly").mkdir()
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # this process is a driver too
    env = {**os.environ, **RAY_ENV}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    groups = []
    try:
        start(groups, [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false", *common], env)
        worker_cmd = [str(BIN / "ray"), "start", f"--address={address}", *common]
        readonly = can_unshare()
        if readonly:  # the worker node sees <base>/readonly read-only (the same files, no writes)
            ro = str(base / "readonly")
            script = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec " + " ".join(worker_cmd)
            worker_cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        start(groups, worker_cmd, env)
        ray.init(address=address, log_to_driver=False, logging_level="warning")
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, "both nodes alive")
        ray.shutdown()
        yield address, base, readonly
    finally:
        ray_disconnect()
        if ray.is_initialized():
            ray.shutdown()
        for pgid in groups:
            stop_group(pgid)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sweep(spec: dict, out: Path, **kw):
    return run_sweep(Spec.from_dict(spec), out, progress=False, **kw)


def records(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdpo_sim", "sweep", *args]


def test_tables_on_ray_are_bitwise_those_of_the_local_backend(cluster, tmp_path):
    address, base, _ = cluster
    on_ray = sweep(SPEC, base / "tables-ray", workers=2, backend=RayBackend(address=address))
    local = sweep(SPEC, tmp_path / "local", backend="serial")
    assert on_ray.failed == [] and on_ray.counts["ok"] == 4
    for table in ("history", "seeds"):  # no wall time in these: the files themselves are equal
        assert (base / "tables-ray" / f"{table}.parquet").read_bytes() == (tmp_path / "local" / f"{table}.parquet").read_bytes(), table
    summary = [c for c in local.summary.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(on_ray.summary[summary], local.summary[summary], check_exact=True)
    for rid in records(base / "tables-ray"):  # each run's log beside its record: where it ran and how it ended
        log = (base / "tables-ray" / "runs" / f"{rid}.log").read_text().splitlines()
        assert "attempt on node" in log[0] and " pid " in log[0] and log[-1].endswith("] ok"), log
    assert not list((base / "tables-ray" / "runs").glob(".ray-probe-*")), "the per-node check left its files"


def _long_run(out: Path, spec: dict) -> str:
    return next(p.run_id for p in plan(Spec.from_dict(spec)) if p.config["steps"] == 400)


def _kill_the_long_run(out: Path, spec: dict, backend: RayBackend):
    """Run ``spec`` on Ray in a thread; SIGKILL the worker running its long run once its log names the pid."""
    rid, box = _long_run(out, spec), {}
    thread = threading.Thread(target=lambda: box.update(result=sweep(spec, out, workers=2, backend=backend)))
    thread.start()
    log = out / "runs" / f"{rid}.log"
    line = wait_for(lambda: log.is_file() and "pid" in log.read_text() and log.read_text(), "the long run's log")
    pid = int(line.split(" pid ")[1].split(":")[0])
    os.kill(pid, signal.SIGKILL)
    thread.join(DEADLINE_S)
    assert not thread.is_alive() and "result" in box
    return rid, box["result"]


def _exactly_once(out: Path, spec: dict) -> None:
    planned = {p.run_id for p in plan(Spec.from_dict(spec))}
    assert set(records(out)) == planned
    hist = pd.read_parquet(out / "history.parquet")
    assert not hist.duplicated(["run_id", "seed", "step"]).any() and set(hist.run_id) == planned


def test_a_worker_killed_mid_run_is_retried_and_every_run_is_kept_once(cluster):
    address, base, _ = cluster
    out = base / "kill-retry"
    rid, result = _kill_the_long_run(out, KILL_SPEC, RayBackend(address=address, max_retries=1))
    assert result.failed == [] and result.counts["ok"] == 3
    log = (out / "runs" / f"{rid}.log").read_text()
    assert log.count("attempt on node") == 2 and log.rstrip().endswith("] ok"), log  # the killed attempt, then the retry
    _exactly_once(out, KILL_SPEC)
    assert not list((out / "runs").glob(".*.tmp"))


def test_a_worker_killed_with_no_retries_left_fails_its_run_with_the_reason_and_a_rerun_completes(cluster):
    address, base, _ = cluster
    out = base / "kill-fail"
    rid, result = _kill_the_long_run(out, KILL_SPEC, RayBackend(address=address, max_retries=0))
    assert [f["run_id"] for f in result.failed] == [rid] and result.counts["ok"] == 2
    rec = records(out)[rid]
    assert rec["status"] == "failed" and rec["error"].startswith("Ray task failed after 0 retries:") and "Error" in rec["error"], rec["error"]
    assert (out / "runs" / f"{rid}.log").read_text().splitlines()[-1].endswith(rec["error"])  # the reason in its log too
    again = sweep(KILL_SPEC, out, workers=2, backend=RayBackend(address=address))
    assert again.failed == [] and again.counts == {"total": 3, "skipped": 2, "ok": 1, "failed": []}
    _exactly_once(out, KILL_SPEC)


def test_the_driver_killed_mid_sweep_resumes_from_disk(cluster):
    address, base, _ = cluster
    (base / "many.yaml").write_text(yaml.safe_dump(MANY))
    cmd = cli(str(base / "many.yaml"), "--out", str(base / "driver-kill"), "--backend", "ray", "--ray-address", address, "--no-progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    runs = base / "driver-kill" / "runs"
    try:
        wait_for(lambda: runs.is_dir() and any(runs.glob("*.json")), "the first kept run", proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop_group(proc.pid)
    kept = len(list(runs.glob("*.json")))
    assert 1 <= kept < 8, f"the kill came after the sweep finished ({kept} runs)"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    skipped = int(done.stdout.split("(")[1].split(" already done")[0])
    assert skipped >= kept and f"8 runs ({skipped} already done, {8 - skipped} ran ok, 0 failed)" in done.stdout  # tasks of the dead driver may have finished meanwhile
    _exactly_once(base / "driver-kill", MANY)


def test_ctrl_c_cancels_outstanding_tasks_and_stops_the_cluster_it_started(tmp_path):
    (tmp_path / "many.yaml").write_text(yaml.safe_dump(MANY))
    cmd = cli("many.yaml", "--out", "out", "--backend", "ray", "--workers", "2", "--no-progress")  # no address: a local cluster of its own
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **RAY_ENV})
    runs = tmp_path / "out" / "runs"
    try:
        wait_for(lambda: runs.is_dir() and any(runs.glob("*.json")), "the first kept run", proc=proc)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            stop_group(proc.pid)
    kept = len([r for r in records(tmp_path / "out").values() if r["status"] == "ok"])
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.splitlines() == [f"interrupted: {kept} runs kept; run the same command again to resume"], stderr
    assert 1 <= kept < 8, f"the interrupt came after the sweep finished ({kept} runs)"
    left = wait_for(lambda: not group_pids(proc.pid) or None, "the Ray processes the driver started to exit", deadline_s=30.0) and group_pids(proc.pid)
    assert left == []
    assert len(records(tmp_path / "out")) == kept  # cancelled: nothing finished after the driver left
    assert not list(runs.glob(".*.tmp")) and not (tmp_path / "out" / "summary.parquet").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--ray-address", "127.0.0.1:1"], "ray_address='127.0.0.1:1' is not reachable"),
    (["--ray-address", "nowhere"], "ray_address='nowhere' is not allowed"),
    (["--ray-cpus-per-run", "0"], "ray cpus_per_run=0.0 must be a finite number > 0"),
    (["--ray-cpus-per-run", "-1"], "ray cpus_per_run=-1.0 must be a finite number > 0"),
    (["--ray-max-retries", "-1"], "ray max_retries=-1 must be an integer >= 0"),
])
def test_bad_ray_settings_exit_2_with_one_line_before_anything_is_created(tmp_path, capsys, flags, needle):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["sweep", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"), "--backend", "ray", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_ray_flags_without_the_ray_backend_are_refused(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["sweep", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"), "--ray-cpus-per-run", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--ray-cpus-per-run apply to --backend ray only" in err


def test_a_results_path_a_worker_node_cannot_write_exits_2_naming_it(cluster, capsys):
    address, base, readonly = cluster
    if not readonly:
        pytest.skip("unshare -m is refused here: no node with a read-only view of the results path")
    (base / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    out = base / "readonly" / "out"
    assert main(["sweep", str(base / "spec.yaml"), "--out", str(out), "--backend", "ray", "--ray-address", address, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not usable from Ray node" in err and "cannot write there" in err and "Read-only file system" in err, err
    assert not list((out / "runs").glob("*.json")) and not list((out / "runs").glob(".ray-probe-*"))
