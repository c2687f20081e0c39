"""Interruption of a real `sdpo-sim sweep` (spawned workers, tiny world):

- Ctrl-C (SIGINT to the whole process group, as a terminal sends it): one line "interrupted: N runs kept; run the
  same command again to resume", exit 130, no traceback from the parent or the workers, no temporary files; the
  same command then finishes the sweep, skipping the N kept runs.
- SIGKILL of the parent: no child (workers, the multiprocessing resource tracker) survives it 5 s later.
- In-process: a KeyboardInterrupt in the serial path becomes ``Interrupted`` with the runs on disk.

Synchronisation is by polling with deadlines; the only fixed wait is the 5 s the SIGKILL check asks for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sdpo_sim.execution import groups
from sdpo_sim.sweep import Interrupted, kept_runs, plan, run_sweep, toy_run
from sdpo_sim.sweep_spec import Spec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the sweep's children")

# 8 runs of a 3×2 world, each a few tenths of a second per core, so on 2 workers the sweep still has several runs to
# go when its first one is kept (the ratio holds however loaded the machine is). The grid varies only fields that
# runs cannot share a program over (method, feedback, batch size: not in train.PER_RUN_FIELDS), so each run is its own
# program and is kept on its own; a grid over lr/noise/rho would train as two programs of four runs, kept four at a
# time, and the interrupt could come after both (test_the_grid_trains_as_one_program_per_run checks this premise)
SPEC = {"name": "interrupt", "base": {"vocab_size": 3, "seq_len": 2, "steps": 200, "seeds": 1, "num_generations": 2,
                                      "eval_every": 100},
        "grid": {"method": ["sdpo", "reinforce"], "feedback": ["binary", "continuous"], "batch_size": [4, 6]}}
RUNS = 8
DEADLINE_S = 180.0  # generous: spawning two workers that import torch on a shared 2-core machine


def wait_for(condition, what: str, deadline_s: float = DEADLINE_S, proc: subprocess.Popen | None = None):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def start_sweep(tmp_path: Path) -> tuple[subprocess.Popen, list]:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    cmd = [sys.executable, "-m", "sdpo_sim", "sweep", "spec.yaml", "--out", "out", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, cmd


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list: a child belongs to the thread that spawned it)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return pids


def start_time(pid: int):
    """Field 22 of /proc/PID/stat (start time in clock ticks) and the state, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19], fields[0]  # starttime, state


def kept(out: Path) -> int:
    return kept_runs(out) if out.is_dir() else 0


def first_run_kept_with_workers(proc: subprocess.Popen, out: Path):
    """Children (2 workers + the resource tracker) once at least one run is on disk."""
    pids = children(proc.pid)
    return pids if kept(out) >= 1 and len(pids) >= 3 else None


def test_the_grid_trains_as_one_program_per_run():
    programs = groups(plan(Spec.from_dict(SPEC)), toy_run)
    assert len(programs) == RUNS and all(len(p) == 1 for p in programs)


def test_ctrl_c_prints_one_line_exits_130_and_the_same_command_resumes(tmp_path):
    proc, cmd = start_sweep(tmp_path)
    out = tmp_path / "out"
    try:
        wait_for(lambda: first_run_kept_with_workers(proc, out), "the first kept run", proc=proc)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the parent and its workers get it
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    n = kept_runs(out)
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.splitlines() == [f"interrupted: {n} runs kept; run the same command again to resume"], stderr
    assert "Traceback" not in stdout + stderr and stdout == ""
    assert 1 <= n < RUNS, f"the interrupt came after the sweep finished ({n} runs)"
    assert not list(out.rglob("*.tmp")), "a stopped worker left a temporary file"
    assert not (out / "summary.parquet").exists()  # the tables are written only by a finished sweep
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{RUNS} runs ({n} already done, {RUNS - n} ran ok, 0 failed)" in done.stdout


def test_sigkill_of_a_sweep_leaves_no_child_running(tmp_path):
    proc, _ = start_sweep(tmp_path)
    try:
        pids = wait_for(lambda: first_run_kept_with_workers(proc, tmp_path / "out"), "the workers running", proc=proc)
        started = {pid: start_time(pid) for pid in pids}
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(5.0)  # the criterion: no child survives its parent's SIGKILL by 5 s
    survivors = []
    for pid, before in started.items():
        now = start_time(pid)  # same pid and start time = the same process; a zombie (Z) has exited
        if before is not None and now is not None and now[0] == before[0] and now[1] != "Z":
            survivors.append(pid)
    for pid in survivors:  # do not leave them to burn CPU if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"children {survivors} of the killed sweep are still running"


def test_keyboard_interrupt_in_process_becomes_interrupted_with_the_kept_runs(tmp_path):
    """The serial path: the second run is interrupted; the first is kept, nothing half-written remains."""
    from sdpo_sim.sweep import toy_run

    calls = []

    def run_then_interrupt(config):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return toy_run(config)

    spec = {**SPEC, "base": {**SPEC["base"], "steps": 2}, "grid": {"method": ["sdpo", "reinforce", "grpo"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(Interrupted) as caught:
        run_sweep(path, tmp_path / "out", workers=1, progress=False, run_fn=run_then_interrupt)
    assert caught.value.kept == 1 == kept_runs(tmp_path / "out")
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert [r["status"] for r in records] == ["ok"] and not list((tmp_path / "out").rglob("*.tmp"))
    result = run_sweep(path, tmp_path / "out", workers=1, progress=False)
    assert result.counts == {"total": 3, "skipped": 1, "ok": 2, "failed": []}
