"""Ray backend overhead: the same tiny toy sweep (8 runs, each its own program) on the local process pool and on a
local Ray cluster with the same number of workers; the figure is the ratio of wall times (Ray / pool).

Two Ray figures: cold (a fresh command: the cluster is started inside the timing, as `sdpo-sim sweep --backend ray`
does) and warm (the cluster already up, as with `--ray-address` to a running one). The pool is always cold (its
workers are spawned inside the timing, as every `sdpo-sim sweep` does). The tables of all three are checked equal.

    .venv/bin/python benchmarks/bench_ray_overhead.py            # writes benchmarks/results/ray_overhead.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import figure, load_average, write_results

from sdpo_sim.execution import RayBackend, ray_connect, ray_disconnect
from sdpo_sim.sweep import Spec, run_sweep

SPEC = {"name": "overhead", "base": {"vocab_size": 3, "seq_len": 2, "steps": 200, "seeds": 1, "num_generations": 2, "eval_every": 100},
        "grid": {"method": ["sdpo", "reinforce"], "feedback": ["binary", "continuous"], "batch_size": [4, 6]}}


def timed(out: Path, workers: int, backend) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    res = run_sweep(Spec.from_dict(SPEC), out, workers=workers, backend=backend, progress=False)
    wall = time.perf_counter() - t0
    assert res.failed == [], res.failed
    return wall, (out / "history.parquet").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool_s, pool_hist = timed(tmp / "pool", args.workers, "process")
        cold_s, cold_hist = timed(tmp / "ray-cold", args.workers, RayBackend())  # starts the local cluster
        ray_disconnect()
        ray_connect(RayBackend(), args.workers)  # the cluster up before the timing
        warm_s, warm_hist = timed(tmp / "ray-warm", args.workers, RayBackend())
        ray_disconnect()
    assert pool_hist == cold_hist == warm_hist, "the Ray tables differ from the pool's"
    runs = 8
    note = f"{runs} runs × {SPEC['base']['steps']} steps on {args.workers} workers; load average {load_average()} (machine shared); tables byte-identical"
    figures = [
        figure("wall time, Ray (cold: local cluster started) vs process pool", round(cold_s, 2), round(pool_s, 2), "s", note=note),
        figure("wall time, Ray (warm: cluster already running) vs process pool", round(warm_s, 2), round(pool_s, 2), "s",
               note="per-task overhead only: scheduling, worker start-up (torch import) and the per-node results-directory check"),
    ]
    for f in figures:
        print(f"{f['figure']}: {f['value']} {f['unit']} (baseline {f['baseline']}, ratio {f['ratio']:.2f})")
    write_results("ray_overhead", "Sweep backends: Ray vs the local process pool on the same tiny sweep", figures,
                  settings={**SPEC["base"], "runs": runs, "workers": args.workers},
                  raw={"pool_s": pool_s, "ray_cold_s": cold_s, "ray_warm_s": warm_s, "load_average": load_average()}, wall_time_s=time.time() - start)


if __name__ == "__main__":
    main()
