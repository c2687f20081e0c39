"""Current working tree vs a base commit: the same workloads timed on both, in alternating fresh processes.

The base tree is checked out with ``git worktree add --detach`` into a temporary directory (removed at the end);
each measurement is one fresh child process run with ``cwd`` and ``PYTHONPATH`` set to its tree, which asserts
that ``sdpo_sim`` and ``llm`` were imported from that tree (the venv's editable install points at the current
checkout; PYTHONPATH comes before it). Children run one at a time on one torch thread; a child times one
workload once, after a warm-up:

- ``toy_vectorised``: ``sdpo_sim.train.run`` of SDPO, 64 seeds × 100 steps, exact metrics every 10 steps;
- ``toy_one_run``: the same with 1 seed × 300 steps (the per-step overhead of a single run);
- ``llm_step``: the median wall time of ``llm.trainer.Trainer.step`` over steps 2..N−1 (steps 0 and 1 warm up)
  on the shipped ``tiny-cpu`` recipe of the child's own tree, with a tiny random Qwen3 built once by the current
  tree's ``llm.tiny.build_tiny`` and the learning rate 1e-6 (the policy must not drift while timed).

Rounds alternate base and current for each workload (which goes first alternates too). Figure = the fastest of
the current tree's processes ÷ the fastest of the base's (the least-disturbed run on a shared machine); medians,
CPU times and every process's time are in the note and raw. Each child also reports a result of its work (the toy
runs' final reward, the LLM steps' mean completion length), so the two trees are seen to do the same work.

Target: ratio ≤ 1.10, "no slowdown beyond noise". On this 2-core machine, shared with other jobs, fresh
processes of the *same* tree spread by a few per cent to ~12% (max/min over 3 processes: 1.02-1.11 for the base,
1.03-1.12 for the current tree in the committed run; each workload's are in its note, measured in the same run); a
slowdown inside that spread cannot be told from noise by this benchmark.

    .venv/bin/python benchmarks/bench_versions.py                       # writes benchmarks/results/versions.json
    .venv/bin/python benchmarks/bench_versions.py --workloads llm_step --rounds 5 --base 5570394

A run of a subset of ``--workloads`` keeps the other workloads' rows of an existing results file for the same base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

# the code under test: a worker imports it from the tree its PYTHONPATH names (checked in ``_check_tree``)
import llm
import sdpo_sim
from llm.recipe import load_recipe, resolve_recipe_path
from llm.tiny import build_tiny
from llm.trainer import Trainer
from sdpo_sim.train import RunConfig, run

NAME = "versions"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "5570394"  # "Golden outputs before the architecture refactor"
TARGET_RATIO = 1.10
WORKLOADS = ("toy_vectorised", "toy_one_run", "llm_step")
TOY = {"toy_vectorised": {"method": "sdpo", "seeds": 64, "steps": 100, "eval_every": 10},
       "toy_one_run": {"method": "sdpo", "seeds": 1, "steps": 300, "eval_every": 10}}
LLM_WARMUP = 2  # steps 0 and 1 are not timed
CHILD_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------- worker
def _check_tree(tree: Path) -> None:
    """Fail loudly unless ``sdpo_sim`` and ``llm`` were imported from ``tree``."""
    for module in (sdpo_sim, llm):
        where = Path(module.__file__).resolve()
        if not where.is_relative_to(tree.resolve()):
            raise SystemExit(f"{module.__name__} was imported from {where}, not from the tree {tree} under test "
                             "(PYTHONPATH must name the tree and come before any other copy)")


def time_toy(workload: str) -> dict[str, Any]:
    """One toy-world ``run`` of the workload's flat config after a 2-seed, 10-step warm-up of the same config."""
    cfg = TOY[workload]
    run(RunConfig.from_dict({**cfg, "seeds": min(cfg["seeds"], 2), "steps": 10}))
    c0, t0 = time.process_time(), time.perf_counter()
    result = run(RunConfig.from_dict(cfg))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "check": result.summary()["final_reward"]}


def time_llm_steps(model_dir: str, steps: int) -> dict[str, Any]:
    """Median wall time of ``Trainer.step(s)`` for s in ``LLM_WARMUP .. steps-1`` on the tree's tiny-cpu recipe."""
    with tempfile.TemporaryDirectory(prefix="bench-versions-run-") as out:
        recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {
            "model.path": model_dir, "training.output_dir": f"{out}/run", "training.steps": steps,
            "training.learning_rate": 1e-6, "training.seed": 0})
        trainer = Trainer(recipe)
        wall, cpu, lengths = [], [], []
        for s in range(steps):
            c0, t0 = time.process_time(), time.perf_counter()
            metrics = trainer.step(s)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            lengths.append(metrics["response_length"])
    wall, cpu, lengths = wall[LLM_WARMUP:], cpu[LLM_WARMUP:], lengths[LLM_WARMUP:]
    return {"seconds": statistics.median(wall), "cpu_s": statistics.median(cpu), "check": statistics.mean(lengths),
            "step_times_s": [round(t, 4) for t in wall]}


def work(args: argparse.Namespace) -> dict[str, Any]:
    """A worker process: time ``args.worker`` on the tree ``args.tree`` (which it must have imported)."""
    _check_tree(Path(args.tree))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.worker in TOY:
        return time_toy(args.worker)
    if args.worker == "llm_step":
        return time_llm_steps(args.model_dir, args.llm_steps)
    raise SystemExit(f"--worker: no such workload: {args.worker}")


# ------------------------------------------------------------------------------------------- parent
def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def spawn(tree: Path, workload: str, model_dir: str, llm_steps: int) -> dict[str, Any]:
    """Run this script's worker for ``workload`` in a fresh process with ``cwd`` and ``PYTHONPATH`` = ``tree``;
    the last line it prints is its JSON result. The child is killed if it outlives ``CHILD_TIMEOUT_S``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", workload, "--tree", str(tree),
           "--model-dir", model_dir, "--llm-steps", str(llm_steps)]
    proc = subprocess.run(cmd, check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{workload} on {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(trees: dict[str, Path], workloads: list[str], rounds: int, model_dir: str, llm_steps: int) -> dict:
    """``{workload: {tree: [child result, ...]}}``, base and current alternating (first one way, then the other)."""
    out: dict[str, dict[str, list]] = {w: {t: [] for t in trees} for w in workloads}
    for r in range(rounds):
        for w in workloads:
            for t in (("base", "current") if r % 2 == 0 else ("current", "base")):
                res = spawn(trees[t], w, model_dir, llm_steps)
                out[w][t].append(res)
                print(f"round {r + 1}/{rounds} {w:<15} {t:<8} {res['seconds']:.4f} s", flush=True)
    return out


def summarise(w: str, tree: str, results: list[dict]) -> dict[str, Any]:
    """One raw row: fastest, median and spread (max/min) of a tree's processes for one workload."""
    times = [r["seconds"] for r in results]
    checks = [r["check"] for r in results]
    return {"min_s": min(times), "median_s": statistics.median(times), "spread": max(times) / min(times),
            "cpu_min_s": min(r["cpu_s"] for r in results), "check": statistics.mean(checks),
            "check_range": max(checks) - min(checks), "times_s": [round(t, 4) for t in times]}


def workload_figure(w: str, base: dict, cur: dict, base_label: str, llm_steps: int, figure) -> dict[str, Any]:
    what = {"toy_vectorised": "toy run() 64 seeds × 100 steps", "toy_one_run": "toy run() 1 seed × 300 steps",
            "llm_step": f"LLM Trainer.step, median of steps {LLM_WARMUP}..{llm_steps - 1}"}[w]
    note = (f"fastest of {len(cur['times_s'])} fresh processes each; medians current {cur['median_s']:.4g} s vs base "
            f"{base['median_s']:.4g} s (ratio {cur['median_s'] / base['median_s']:.3f}); CPU-time ratio "
            f"{cur['cpu_min_s'] / base['cpu_min_s']:.3f}; spread (max/min) of the base's own processes "
            f"{base['spread']:.3f}, of the current's {cur['spread']:.3f}; per process: base {base['times_s']}, "
            f"current {cur['times_s']}; work check ({'final reward' if w in TOY else 'mean completion length'}): "
            f"base {base['check']:.6g}, current {cur['check']:.6g}")
    return figure(f"{w}: {what}, current vs base {base_label}", cur["min_s"], base["min_s"], "s",
                  target_ratio=TARGET_RATIO, note=note)


def _kept_rows(path: Path, base_commit: str, measured: list[str]) -> tuple[list[dict], dict]:
    """Figures and raw rows of workloads not measured now, from an existing results file for the same base."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], {}
    if old.get("settings", {}).get("base_commit") != base_commit:
        return [], {}
    keep = [w for w in WORKLOADS if w not in measured]
    figures = [f for f in old.get("figures", []) if f.get("figure", "").split(":")[0] in keep]
    for f in figures:
        f["note"] = f"{f.get('note', '')} (measured by the run of {old.get('created')})"
    raw = {k: v for k, v in (old.get("raw") or {}).items() if k.split(" ")[0] in keep}
    return figures, raw


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=DEFAULT_BASE, help=f"the base commit (default {DEFAULT_BASE})")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="workloads to time")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per tree and workload, ≥ 1, run alternately")
    p.add_argument("--llm-steps", type=int, default=22, help=f"Trainer.step calls per process, > {LLM_WARMUP} "
                   f"(the first {LLM_WARMUP} are warm-up)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args)))
        return 0
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds}: must be ≥ 1")
    if args.llm_steps <= LLM_WARMUP:
        p.error(f"--llm-steps={args.llm_steps}: must be > {LLM_WARMUP}")
    try:
        base_commit = _git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        p.error(f"--base={args.base!r}: not a commit of this repository")
    # only the parent imports _common: it puts this checkout first on sys.path and imports its sdpo_sim, which a
    # worker for another tree must not do
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import figure, finish, load_average

    _check_tree(ROOT)
    workloads = [w for w in WORKLOADS if w in args.workloads]
    t0, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        base_tree = Path(tmp) / "base"
        _git("worktree", "add", "--detach", str(base_tree), base_commit)
        try:
            model_dir = str(build_tiny(Path(tmp) / "tiny-model", seed=0)) if "llm_step" in workloads else ""
            results = measure({"base": base_tree, "current": ROOT}, workloads, args.rounds, model_dir, args.llm_steps)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True, check=False)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, check=False)  # in case the removal failed
    base_label = base_commit[:7]
    figures, raw = [], {}
    for w in workloads:
        rows = {t: summarise(w, t, rs) for t, rs in results[w].items()}
        raw.update({f"{w} {t}": row for t, row in rows.items()})
        figures.append(workload_figure(w, rows["base"], rows["current"], base_label, args.llm_steps, figure))
    if workloads != list(WORKLOADS):
        kept_figures, kept_raw = _kept_rows(Path(args.out_dir) / f"{NAME}.json", base_commit, workloads)
        figures, raw = kept_figures + figures, {**kept_raw, **raw}
        order = {w: i for i, w in enumerate(WORKLOADS)}
        figures.sort(key=lambda f: order.get(f["figure"].split(":")[0], len(order)))
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    settings = {
        "base_commit": base_commit, "base_subject": _git("log", "-1", "--format=%s", base_commit)[:100],
        "current": _git("rev-parse", "HEAD") + (" + uncommitted changes" if dirty else ""),
        "workloads_measured": workloads, "rounds": args.rounds, "threads": 1, "llm_steps": args.llm_steps,
        "llm_warmup_steps": LLM_WARMUP, "toy_configs": TOY,
        "llm": "each tree's shipped tiny-cpu recipe; overrides model.path (build_tiny of the current tree, hidden 64, "
               "2 layers, seed 0, untrained), training.output_dir (a temp dir), training.steps, "
               "training.learning_rate 1e-6, training.seed 0",
        "figure": "min over rounds (current) / min over rounds (base); one fresh process per measurement",
        "load_average_before": load_before, "load_average_after": load_average()}
    table = [f"{key:<24} min {row['min_s']:.4f} s  median {row['median_s']:.4f} s  spread {row['spread']:.3f}" for key, row in raw.items()]
    return finish(NAME, f"Current tree vs base commit {base_commit[:7]}: toy runs and an LLM training step, fresh processes",
                  figures, settings, raw, time.perf_counter() - t0, args.out_dir, table)


if __name__ == "__main__":
    raise SystemExit(main())
