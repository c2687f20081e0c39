"""Golden outputs: what the toy world and the LLM trainer compute, frozen so a refactor can prove it changed nothing.

Three outputs (issue 12, "results are unchanged"):

- ``toy_sweep``: the packaged ``quick`` sweep (tuning included), history and per-seed tables, metric columns only;
- ``toy_run``: one ``sdpo-sim run --json`` summary (a hybrid with the divergence controller and critique feedback);
- ``llm_steps``: the metrics of two training steps of the ``tiny-cpu`` recipe on a fixed, randomly initialised tiny model.

Floating-point results depend on which CPU kernels torch dispatches to (vector width changes the order of sums) and
on the thread count, so the outputs are computed in a child process with ``ATEN_CPU_CAPABILITY=default`` (ATen's
scalar kernels), one OpenMP thread and MKL's conditional numerical reproducibility in its compatible mode. That is
not enough across CPUs: goldens written on one x86-64 machine differed on an AMD EPYC (AVX2, no AVX-512) in the last
float32 bits of the training trajectories (entropy by 6e-8), so the machine that wrote them is recorded beside them
(:func:`machine`: the torch build, the CPU model and vector extensions, the C library). On that machine
``tests/test_golden.py`` compares the toy world bitwise; on any other it compares at the rounding bound of float32
training (``TOY_RTOL`` there), which still catches any change of method, a dropped term or a factor.

Regenerate (only when a change is *meant* to change results, and say so in the commit)::

    .venv/bin/python tests/golden_outputs.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
REPO = Path(__file__).resolve().parent.parent
# the environment that makes float results independent of the CPU (see the module docstring)
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE",
              "CUDA_VISIBLE_DEVICES": ""}
# columns that identify a toy-world row; everything numeric that a run measures is compared
TOY_KEYS = ("block", "method", "feedback", "teacher", "teacher_kind", "controller", "noise", "rho", "policy", "optimizer", "lr")
HISTORY_METRICS = ("seed", "step", "reward", "entropy", "seq_entropy", "kl_init", "divergence", "alpha_mix", "credit_pearson",
                   "credit_spearman", "credit_pearson_within", "grad_cos", "batch_reward")
SEED_METRICS = ("seed", "reward_at_10", "reward_at_30", "reward_at_last", "final_reward", "initial_reward", "auc",
                "entropy_initial", "entropy", "entropy_drop", "credit_corr", "credit_corr_within", "grad_cos", "alpha_mix", "kl_init")
TOY_RUN_ARGS = ["run", "--method", "hybrid", "--controller", "divergence", "--feedback", "critique", "--seeds", "3",
                "--steps", "40", "--eval-every", "10", "--vocab-size", "5", "--seq-len", "4", "--json"]


def _toy_table(frame, metrics):
    """The identifying columns (renamed ``config.X`` → ``X``) and the metric columns of a sweep table, in plan order."""
    frame = frame.rename(columns={c: c.split(".", 1)[1] for c in frame.columns if c.startswith("config.")})
    keys = [k for k in TOY_KEYS if k in frame.columns]
    return frame[keys + [m for m in metrics if m in frame.columns]].reset_index(drop=True)


def toy_sweep(out: Path) -> dict:
    """The quick sweep's history and per-seed tables (metric columns), run serially in this process."""
    from sdpo_sim.sweep import run_sweep

    result = run_sweep(REPO / "sdpo_sim" / "specs" / "quick.yaml", out / "quick-sweep", workers=1, progress=False)
    chosen = {t: getattr(result, t) for t in ("history", "seeds")}
    # the blocks at the tuning alternatives (main@other, ...) are new outputs, tested in test_sweep/test_claims
    chosen = {t: f[~f["block"].str.contains("@", regex=False)] for t, f in chosen.items()}
    return {"history": _toy_table(chosen["history"], HISTORY_METRICS), "seeds": _toy_table(chosen["seeds"], SEED_METRICS)}


def toy_run() -> dict:
    """One ``sdpo-sim run --json`` summary, through the real command line."""
    proc = subprocess.run([sys.executable, "-m", "sdpo_sim", *TOY_RUN_ARGS], capture_output=True, text=True, check=True,
                          cwd=REPO, env={**os.environ, **PINNED_ENV})
    summary = json.loads(proc.stdout)
    summary.pop("config", None)  # the config echo is the input, not a result
    return summary


def llm_steps(out: Path) -> list[dict]:
    """Metrics of two ``tiny-cpu`` steps on a randomly initialised tiny model (seed 0), wall-clock fields removed."""
    from llm.recipe import load_recipe, resolve_recipe_path
    from llm.tiny import build_tiny
    from llm.trainer import Trainer

    model = build_tiny(out / "tiny-random", seed=0)
    recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {
        "model.path": str(model), "training.steps": 2, "training.output_dir": str(out / "llm-run"),
        "training.save_every": 0, "training.heatmap_every": 0})
    rows = Trainer(recipe).train()
    timing = ("seconds", "time", "wall", "tokens_per_s", "per_s")
    return [{k: v for k, v in row.items() if not any(t in k for t in timing)} for row in rows]


def machine() -> dict:
    """What decides the bits beyond the code and :data:`PINNED_ENV`: the torch build, the CPU and the C library."""
    import hashlib
    import platform

    import torch

    cpu = {"model": platform.processor() or platform.machine(), "extensions": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu["model"])
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
        cpu = {"model": model, "extensions": sorted(f for f in flags if f.startswith(("avx", "fma", "sse", "amx")))}
    return {"torch": torch.__version__, "torch_build": hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:16],
            "cpu": cpu, "libc": "-".join(platform.libc_ver())}


def emit(out: Path) -> None:
    """Compute the three outputs under the pinned environment (this process must already run in it) into ``out``."""
    for name, value in PINNED_ENV.items():
        if os.environ.get(name) != value:
            raise SystemExit(f"golden outputs must be computed with {name}={value} (run through compute_in_child)")
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tables = toy_sweep(Path(tmp))
        for name, frame in tables.items():
            frame.to_csv(out / f"toy_sweep_{name}.csv", index=False)
        (out / "toy_run.json").write_text(json.dumps(toy_run(), indent=1, sort_keys=True) + "\n")
        (out / "llm_steps.json").write_text(json.dumps(llm_steps(Path(tmp)), indent=1, sort_keys=True) + "\n")
    (out / "machine.json").write_text(json.dumps(machine(), indent=1, sort_keys=True) + "\n")


def compute_in_child(out: Path, timeout: float = 900) -> None:
    """Run :func:`emit` in a fresh interpreter with :data:`PINNED_ENV` (torch reads the capability at import)."""
    subprocess.run([sys.executable, __file__, "--emit", str(out)], check=True, cwd=REPO, timeout=timeout,
                   env={**os.environ, **PINNED_ENV, "PYTHONPATH": str(REPO)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"recompute the golden outputs into {GOLDEN}")
    group.add_argument("--emit", metavar="DIR", help="(internal) compute them here, in the pinned environment")
    args = parser.parse_args(argv)
    if args.emit:
        emit(Path(args.emit))
    else:
        compute_in_child(GOLDEN)
        print(f"golden outputs written to {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
