"""``sdpo-llm grid``: a grid of tiny-model recipes (CPU, zero GPUs, one step each), serially and on a local Ray
cluster, with the table, the figure, the records and the logs; the Ray driver SIGKILLed mid-grid and the same
command resuming it without running a finished point again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llm.grid import plan, run_grid

pytestmark = pytest.mark.usefixtures("one_thread")
DEADLINE_S = 300.0  # generous: a driver importing torch, transformers and Ray on a shared 2-core machine


def spec_file(tmp_path: Path, tiny_dir: Path) -> Path:
    """4 points of one step each: SDPO and GRPO at two learning rates (eval on 2 held-out prompts, k = 2)."""
    spec = {"name": "tiny", "base": "tiny-cpu",
            "set": {"model.path": str(tiny_dir), "training.steps": 1, "training.prompts_per_step": 2, "training.max_new_tokens": 6,
                    "training.save_every": 0, "training.heatmap_every": 0, "method.num_generations": 3, "context.max_context_tokens": 200,
                    "training.eval_steps": 1, "training.eval_prompts": 2, "training.eval_num_generations": 2},
            "grid": {"training.learning_rate": [1.0e-3, 3.0e-3]},  # crossed with the points: sdpo at both, grpo at both ...
            "points": [{"method.name": "sdpo"}, {"method.name": "grpo"}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def group_pids(pgid: int) -> list[int]:
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
    """SIGKILL what is left of a process group (Ray's per-node agents can outlive a SIGKILLed driver, ray#52385)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_serial_grid_writes_one_tidy_row_per_point_and_resumes(tmp_path, tiny_dir):
    spec = spec_file(tmp_path, tiny_dir)
    res = run_grid(spec, tmp_path / "out", progress=False)
    assert res["failed"] == [] and (res["total"], res["ok"]) == (4, 4)
    table = pd.read_csv(tmp_path / "out" / "grid.csv")
    assert sorted(table.method) == ["grpo", "grpo", "sdpo", "sdpo"] and set(table.status) == {"ok"}
    for col in ("final_reward", "eval_reward", "entropy"):
        assert table[col].notna().all() and table[col].between(0, 10).all(), col  # rewards in [0, 1]; entropy ≤ log(vocab ≈ 100) < 5
    assert (table.wall_time_s > 0).all() and len(set(table.run_id)) == 4
    assert (tmp_path / "out" / "grid.svg").read_text().lstrip().startswith("<?xml")
    for rid in table.run_id:
        rec = json.loads((tmp_path / "out" / "runs" / f"{rid}.json").read_text())
        assert rec["status"] == "ok" and rec["recipe"]["training"]["output_dir"] == str((tmp_path / "out" / "runs" / rid).resolve())
        assert (tmp_path / "out" / "runs" / rid / "metrics.jsonl").is_file()
        log = (tmp_path / "out" / "runs" / f"{rid}.log").read_text().splitlines()
        assert "attempt in this process" in log[0] and log[-1].endswith("] ok")
    again = run_grid(spec, tmp_path / "out", progress=False)
    assert (again["skipped"], again["ok"]) == (4, 0)


def test_bad_grid_specs_are_refused_before_anything_is_created(tmp_path, tiny_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "tiny-cpu", "grid": {"training.stepz": [1]}, "set": {"model.path": str(tiny_dir)}}))
    with pytest.raises(ValueError, match="stepz"):
        run_grid(bad, tmp_path / "out", progress=False)
    bad.write_text(yaml.safe_dump({"base": "tiny-cpu", "recipes": ["a.yaml"]}))
    with pytest.raises(ValueError, match="exactly one of base"):
        run_grid(bad, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="cpus_per_run=0"):
        run_grid(spec_file(tmp_path, tiny_dir), tmp_path / "out", backend="ray", cpus_per_run=0.0, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_ray_grid_resumes_after_its_driver_is_killed_and_matches_the_serial_grid(tmp_path, tiny_dir):
    pytest.importorskip("ray")
    spec = spec_file(tmp_path, tiny_dir)
    points = {p.run_id for p in plan(spec, (tmp_path / "ray").resolve())}
    cmd = [sys.executable, "-m", "llm", "grid", str(spec), "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "1",
           "--gpus-per-run", "0", "--no-progress"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    runs = tmp_path / "ray" / "runs"
    try:
        end = time.monotonic() + DEADLINE_S
        while not (runs.is_dir() and any(runs.glob("*.json"))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "timed out waiting for the first finished point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        stop_group(proc.pid)  # the driver and the local cluster it started
    kept = {p.stem for p in runs.glob("*.json")}
    assert 1 <= len(kept) < 4, f"the kill came after the grid finished ({len(kept)} points)"
    done = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    stdout, stderr = done.communicate(timeout=600)
    end = time.monotonic() + 30.0
    while group_pids(done.pid) and time.monotonic() < end:  # a driver that finishes stops the cluster it started
        time.sleep(0.1)
    left = group_pids(done.pid)
    stop_group(done.pid)
    assert done.returncode == 0 and left == [], (stderr, left)
    skipped = int(stdout.split("(")[1].split(" already done")[0])
    assert skipped >= len(kept) and f"4 runs ({skipped} already done, {4 - skipped} ran ok, 0 failed)" in stdout
    table = pd.read_csv(tmp_path / "ray" / "grid.csv")
    assert set(table.run_id) == points and len(table) == 4 and set(table.status) == {"ok"}
    for rid in kept:  # a point finished before the kill was not run again
        assert (runs / f"{rid}.log").read_text().count("attempt in Ray node") == 1
    serial = run_grid(spec, tmp_path / "serial", progress=False)["table"]
    # the same recipes, seeds and one torch thread on both sides: the same float32 arithmetic, so the same numbers exactly
    cols = ["method", "training.learning_rate", "final_reward", "eval_reward", "entropy"]
    key = ["method", "training.learning_rate"]
    pd.testing.assert_frame_equal(table[cols].sort_values(key).reset_index(drop=True), serial[cols].sort_values(key).reset_index(drop=True),
                                  check_exact=True)
