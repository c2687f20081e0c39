"""Toy-world throughput: 64 runs × 300 steps × 32 rollouts, markov policy, SDPO + bayes teacher, exact
metrics every 10 steps, all runs vectorised in one ``run()`` — against a one-run-at-a-time loop of the
same work in the same process. The loop is timed on ``--loop-runs`` runs (default 4) and extrapolated
linearly (each run is independent, so its cost does not depend on the others).

Second figure: a whole learning-rate tuning grid (6 learning rates × ``--grid-seeds`` seeds, default 32: 192 runs)
trained as one tensor program by ``run_group`` against the same one-run loop; target ≥ 20× (issue 13).

Third figure: a claims condition, 8 task seeds × 10 seeds (task_seed is a per-run field), as one program against
the same 8 configurations as 8 programs of 10 (how the claims report trained them before).

    .venv/bin/python benchmarks/bench_toy_throughput.py            # writes benchmarks/results/toy_throughput.json
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import figure, load_average, write_results

from sdpo_sim.train import RunConfig, run, run_group

TARGET_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--loop-runs", type=int, default=4)
    parser.add_argument("--grid-seeds", type=int, default=32, help="seeds per learning rate of the tuning grid (6 learning rates)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; 2 threads were slower under load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    base = dict(method="sdpo", teacher="bayes", policy="markov", steps=args.steps, batch_size=32, eval_every=10)

    run(RunConfig.from_dict({**base, "seeds": 2, "steps": 2}))  # warm-up: imports and first-call costs
    t0, c0 = time.perf_counter(), time.process_time()
    run(RunConfig.from_dict({**base, "seeds": args.runs}))
    vector_s, vector_cpu = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    for seed in range(args.loop_runs):
        run(RunConfig.from_dict({**base, "seeds": 1, "seed_start": seed}))
    loop_s = (time.perf_counter() - t0) * args.runs / args.loop_runs
    loop_cpu = (time.process_time() - c0) * args.runs / args.loop_runs

    lrs = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    grid = [RunConfig.from_dict({**base, "seeds": args.grid_seeds, "lr": lr}) for lr in lrs]
    t0 = time.perf_counter()
    run_group(grid)
    grid_s = time.perf_counter() - t0
    grid_work = len(lrs) * args.grid_seeds * args.steps

    tasks = [RunConfig.from_dict({**base, "seeds": 10, "task_seed": t}) for t in range(8)]
    t0 = time.perf_counter()
    run_group(tasks)
    tasks_one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for cfg in tasks:
        run(cfg)
    tasks_apart_s = time.perf_counter() - t0
    tasks_work = 8 * 10 * args.steps
    loop_rate = args.runs * args.steps / loop_s  # the one-run loop, runs·steps per second

    work = args.runs * args.steps
    figures = [
        figure(f"wall time, {args.runs} runs × {args.steps} steps (vectorised)", round(vector_s, 2), TARGET_S, "s",
               target_ratio=1.0, note=f"target ≤ {TARGET_S:g} s on a 2-core CPU; CPU time {vector_cpu:.1f} s; "
                                                f"load average {load_average()} (machine shared)"),
        figure("throughput: vectorised vs one-run-at-a-time loop", round(work / vector_s, 1), round(work / loop_s, 1),
               "runs·steps/s", higher_is_better=True,
               note=f"loop timed on {args.loop_runs} runs and extrapolated to {args.runs}; CPU-time ratio "
                    f"{loop_cpu / vector_cpu:.2f}"),
        figure(f"throughput: a tuning grid ({len(lrs)} learning rates × {args.grid_seeds} seeds) as one program vs the one-run loop",
               round(grid_work / grid_s, 1), round(loop_rate, 1), "runs·steps/s", target_ratio=20.0, higher_is_better=True,
               note=f"run_group: one Adam parameter group per learning rate; {grid_s:.1f} s for {len(lrs) * args.grid_seeds} runs"),
        figure("throughput: a claims condition (8 tasks × 10 seeds) as one program vs as 8 programs of 10",
               round(tasks_work / tasks_one_s, 1), round(tasks_work / tasks_apart_s, 1), "runs·steps/s", higher_is_better=True,
               note=f"one program {tasks_one_s:.1f} s, eight programs {tasks_apart_s:.1f} s"),
    ]
    for f in figures:
        print(f"{f['figure']}: {f['value']} {f['unit']} (baseline {f['baseline']}, ratio {f['ratio']:.2f})")
    write_results(
        "toy_throughput", "Toy world: vectorised runs vs one-run loop (SDPO + bayes, exact metrics every 10 steps)",
        figures, settings={**base, "runs": args.runs, "loop_runs": args.loop_runs, "threads": args.threads, "grid_seeds": args.grid_seeds},
        raw={"vectorised_s": vector_s, "vectorised_cpu_s": vector_cpu, "loop_s_extrapolated": loop_s,
             "loop_cpu_s_extrapolated": loop_cpu, "grid_s": grid_s, "tasks_one_program_s": tasks_one_s,
             "tasks_eight_programs_s": tasks_apart_s, "load_average": load_average()}, wall_time_s=time.time() - start,
    )


if __name__ == "__main__":
    main()
