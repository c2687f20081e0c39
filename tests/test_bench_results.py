"""benchmarks/_common.py and run_all.py: results rows, verdicts, and RESULTS.md rendering (nothing is timed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench_helpers import BENCH, load_benchmark

common, run_all = load_benchmark("_common"), load_benchmark("run_all")


def test_figure_ratio_and_target_directions():
    mem = common.figure("peak", 100.0, 1000.0, "MiB", target_ratio=1 / 8)
    assert mem["ratio"] == pytest.approx(0.1) and mem["met"] is True and mem["target"] == "<= 0.125"
    slow = common.figure("time", 3.0, 2.0, "s", target_ratio=1.0)
    assert slow["ratio"] == pytest.approx(1.5) and slow["met"] is False
    tput = common.figure("tokens/s", 110.0, 100.0, "tok/s", target_ratio=1.2, higher_is_better=True)
    assert tput["target"] == ">= 1.2" and tput["met"] is False
    info = common.figure("wall time", 12.0, None, "s")
    assert info["ratio"] is None and info["met"] is None and info["target"] is None


def test_verdict_says_by_how_much():
    assert run_all.verdict(common.figure("t", 3.0, 2.0, "s", target_ratio=1.0)) == "**missed** by 1.50×"
    assert run_all.verdict(common.figure("x", 100.0, 100.0, "tok/s", target_ratio=1.2, higher_is_better=True)) == "**missed** by 1.20×"
    assert run_all.verdict(common.figure("m", 1.0, 10.0, "MiB", target_ratio=0.125)) == "met"
    assert run_all.verdict(common.figure("w", 5.0, None, "s")) == "–"


def test_peak_rss_sees_a_large_allocation():
    # in a fresh process: inside the test session, memory that earlier tests freed but the allocators kept resident can
    # back the block without raising the high-water mark (this failed once after tests/test_llm_memory.py)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np, _common as c; m = c.PeakRSS().start(); "
            "b = np.ones(64 * 1024 * 1024 // 8); del b; print(m.growth_mib())")  # 64 MiB, touched
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=120, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) > 50


def test_render_includes_own_and_foreign_files(tmp_path):
    fig = common.figure("time: ours vs peer", 3.0, 2.0, "s", target_ratio=1.0, note="the peer skips X")
    common.write_results("alpha", "Alpha bench", [fig], {"N": 4}, {"ours": {"median_s": 3.0}, "peer": {"median_s": 2.0}},
                         1.5, results_dir=tmp_path)
    (tmp_path / "claims_wall_time.json").write_text(json.dumps(
        {"title": "claims report", "figures": [{"figure": "wall time", "value": 42.0, "unit": "s"}]}))
    (tmp_path / "broken.json").write_text("{not json")
    results = run_all.collect(tmp_path)
    assert [r["name"] for r in results] == ["alpha", "broken", "claims_wall_time"]
    text = run_all.render(results, {"cpu": "TestCPU", "cores": 2, "ram_gib": 8.0, "os": "x"},
                          {"python": "3.11", "torch": "2.13.0"}, {"alpha": {"returncode": 0, "seconds": 1.0}}, "now")
    assert "TestCPU" in text and "| torch | 2.13.0 |" in text
    assert "| alpha | time: ours vs peer | 3 s | 2 s | 1.5 | <= 1 | **missed** by 1.50× |" in text
    assert "Why: the peer skips X" in text
    assert "| claims_wall_time | wall time | 42 s | – | – | – | – |" in text
    assert "Results file unreadable" in text
    assert "Not run by this invocation" in text  # the foreign file is marked with its own date


def test_discover_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_all.discover(["no_such_bench"])
    assert [p.name for p in run_all.discover(["fused_loss"])] == ["bench_fused_loss.py"]


def test_spawn_worker_returns_the_last_json_line_and_reports_a_failure(tmp_path):
    script = tmp_path / "bench_x.py"
    script.write_text("import json, sys\n"
                      "if sys.argv[2] == 'bad':\n    sys.exit('no such variant: bad')\n"
                      "print('noise from a library')\nprint(json.dumps({'variant': sys.argv[2], 'args': sys.argv[3:]}))\n")
    assert common.spawn_worker(str(script), "ours", ["--n", "4"]) == {"variant": "ours", "args": ["--n", "4"]}
    with pytest.raises(RuntimeError, match="bench_x.py --worker bad failed:\n.*no such variant: bad"):
        common.spawn_worker(str(script), "bad", [])
