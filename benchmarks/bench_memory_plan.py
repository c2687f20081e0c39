"""The memory plan (``llm/memory_plan.py``) against measured peaks of real training steps on CPU.

Each configuration builds a randomly initialised Qwen3-architecture model locally
(``llm.memory_measure.build_real_vocab_model``: Qwen3's real 151,936-token vocabulary or a smaller one, tied or
untied embeddings), creates AdamW's moments with a zero-gradient update (as after any first step) and then measures one
``Trainer.step`` with :class:`llm.memory_measure.PeakMemory` (live tensor storage, deterministic), by phase:
generation (``Trainer.rollout``), teacher forward, loss (``Trainer.compute_loss``), backward, optimizer step. The plan is
``memory_plan(recipe, device="cpu", strategy="single")``: one process on CPU, no CUDA allowance. Prompts and teacher
contexts are longer than ``training.max_prompt_length`` / ``context.max_context_tokens``, so they are cut to exactly
those widths, and a random model almost never samples its end-of-sequence token, so completions have
``max_new_tokens`` tokens: the shapes the plan assumes (its upper bounds) are the shapes that ran.

Figure per configuration: plan ÷ measured peak, target within ±15 %. The resident-set growth over the measured step
(``VmHWM`` after ``clear_refs``) is shown beside the tracked growth: it adds what the tracker cannot see (kernels'
workspaces, allocator slack) and is machine-dependent.

    python benchmarks/bench_memory_plan.py            # every configuration (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, figure, finish, load_average, parse_or_work, spawn_worker  # noqa: E402

import llm.credit  # noqa: E402
import llm.trainer  # noqa: E402
from llm.memory_measure import PeakMemory, build_real_vocab_model  # noqa: E402
from llm.memory_plan import memory_plan  # noqa: E402
from llm.recipe import load_recipe, resolve_recipe_path  # noqa: E402
from llm.trainer import Trainer  # noqa: E402

NAME = "memory_plan"
MIB = 1024 ** 2
TARGET = 0.15  # |plan / measured − 1| ≤ 15 %
# name → (model sizes, recipe overrides); every one on the tiny-cpu recipe (float32 unless said otherwise)
BASE = {"training.steps": 2, "training.save_every": 0, "training.heatmap_every": 0, "training.max_prompt_length": 32,
        "context.max_context_tokens": 64, "training.feedback_credit_every": 0, "training.share_prompt_prefix": False}
CONFIGS = {
    "real-vocab-fused": (dict(vocab_size=151936, hidden_size=64, num_layers=1),
                         {"training.prompts_per_step": 2, "method.num_generations": 4, "training.max_new_tokens": 16}),
    "real-vocab-untied-credit": (dict(vocab_size=151936, hidden_size=128, num_layers=4, tie_word_embeddings=False),
                                 {"training.prompts_per_step": 2, "method.num_generations": 3, "training.max_new_tokens": 12,
                                  "training.feedback_credit_every": 1}),
    "unfused-deep-batch": (dict(vocab_size=4096, hidden_size=128, num_layers=8, intermediate_size=384),
                           {"training.prompts_per_step": 4, "method.num_generations": 4, "training.max_new_tokens": 24}),
    "fused-microbatch-checkpointing": (dict(vocab_size=32768, hidden_size=128, num_layers=4),
                                       {"training.prompts_per_step": 8, "method.num_generations": 4,
                                        "training.max_new_tokens": 16, "training.micro_batch_size": 8,
                                        "model.gradient_checkpointing": True}),
    "lora-bf16-real-vocab": (dict(vocab_size=151936, hidden_size=64, num_layers=2),
                             {"model.dtype": "bfloat16", "training.prompts_per_step": 2, "method.num_generations": 3,
                              "training.max_new_tokens": 8,
                              "model.lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}),
    "bf16-autocast-fused": (dict(vocab_size=32768, hidden_size=128, num_layers=3),
                            {"model.dtype": "bfloat16", "training.prompts_per_step": 2, "method.num_generations": 4,
                             "training.max_new_tokens": 12}),
    "shared-prefix-grpo": (dict(vocab_size=8192, hidden_size=128, num_layers=4),
                           {"method.name": "grpo", "training.prompts_per_step": 4, "method.num_generations": 4,
                            "training.max_new_tokens": 16, "training.share_prompt_prefix": "auto"}),
}


def prime_optimizer(trainer) -> None:
    """Create AdamW's moments as the first update would, with a zero-gradient update (no step's cost; weight decay
    scales the weights by 1 − lr·wd once, which moves no memory)."""
    for p in trainer.unwrapped.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def measure(name: str, tmp: Path) -> dict:
    """One configuration: its plan, then ``Trainer.step`` measured by phase (after the optimizer is primed)."""
    sizes, overrides = CONFIGS[name]
    model_dir = build_real_vocab_model(tmp / name / "model", seed=0, **sizes)
    recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {**BASE, **overrides, "model.path": str(model_dir),
                                                           "training.output_dir": str(tmp / name / "out")})
    plan = memory_plan(recipe, device="cpu", strategy="single", gpu_memory_gb=64.0)
    trainer = Trainer(recipe)
    prime_optimizer(trainer)
    mem = PeakMemory(trainer.unwrapped, trainer.optimizer.optimizer, *trainer.teacher.weights.values())

    def phase(label, fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            with mem.phase(label):
                return fn(*a, **k)
        return wrapped

    # instrumentation only: each piece runs unchanged inside a named phase of the tracker
    trainer.rollout = phase("generation", trainer.rollout)
    trainer.compute_loss = phase("loss", trainer.compute_loss)
    trainer.acc.backward = phase("backward", trainer.acc.backward)
    trainer.optimizer.step = phase("optimizer", trainer.optimizer.step)
    originals = llm.trainer.teacher_outputs, llm.credit.teacher_outputs
    llm.trainer.teacher_outputs = phase("teacher_forward", originals[0])
    llm.credit.teacher_outputs = phase("teacher_forward", originals[1])
    try:
        rss = PeakRSS().start()
        t0 = time.perf_counter()
        with mem:
            trainer.step(1)
        seconds, growth = time.perf_counter() - t0, rss.growth_mib()
    finally:
        llm.trainer.teacher_outputs, llm.credit.teacher_outputs = originals
    held = mem.start_bytes
    measured_phases = {k: (v - held) / MIB for k, v in mem.phases.items()}
    return {
        "plan_mib": plan["total_gb"] * 1024, "measured_mib": mem.peak_bytes / MIB, "held_measured_mib": held / MIB,
        "held_plan_mib": plan["held_gb"] * 1024, "peak_phase_plan": plan["peak_phase"],
        "peak_phase_measured": max(measured_phases, key=measured_phases.get),
        "phases_measured_mib": measured_phases,
        "phases_plan_mib": {k: v["total_gb"] * 1024 for k, v in plan["phases"].items()},
        "rss_growth_mib": growth, "tracked_growth_mib": (mem.peak_bytes - held) / MIB, "step_s": seconds,
        "fused": plan["fused_loss"], "parameters": plan["parameters"], "trainable": plan["trainable"],
    }


def run_worker(args) -> dict:
    """The configurations named in ``--worker`` (comma-separated), one after the other in this process."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-memory-plan-") as tmp:
        return {name: measure(name, Path(tmp)) for name in args.worker.split(",")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, choices=sorted(CONFIGS), help="configurations (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: memory does not depend on it, and 2 threads on a loaded 2-core machine thrash)")
    args = parse_or_work(p, argv, run_worker)
    if args is None:
        return 0
    t0, load_before = time.perf_counter(), load_average()
    passthrough = ["--threads", str(args.threads)]
    raw, figures, lines = {}, [], []
    for name in args.only or CONFIGS:  # each in its own fresh process, so that its resident-set growth is its own
        r = spawn_worker(__file__, name, passthrough)[name]
        ratio = r["plan_mib"] / r["measured_mib"]
        sizes, overrides = CONFIGS[name]
        raw[name] = {"plan MiB": r["plan_mib"], "measured MiB": r["measured_mib"], "plan/measured": ratio,
                     "peak phase (plan)": r["peak_phase_plan"], "peak phase (measured)": r["peak_phase_measured"],
                     "held plan MiB": r["held_plan_mib"], "held measured MiB": r["held_measured_mib"],
                     "tracked growth MiB": r["tracked_growth_mib"], "RSS growth MiB": r["rss_growth_mib"],
                     "step s": r["step_s"]}
        fig = figure(f"memory plan vs measured peak: {name}", r["plan_mib"], r["measured_mib"], "MiB")
        fig["target"], fig["met"] = f"within 1 ± {TARGET:g}", abs(ratio - 1) <= TARGET
        fig["note"] = (f"model {json.dumps(sizes)}, recipe {json.dumps(overrides)}; per phase on top of what is held "
                       f"(plan / measured MiB): " + ", ".join(
                           f"{k} {r['phases_plan_mib'].get(k, 0):.0f}/{v:.0f}" for k, v in r["phases_measured_mib"].items()))
        figures.append(fig)
        lines.append(f"{name:<32} plan {r['plan_mib']:9.1f} MiB  measured {r['measured_mib']:9.1f} MiB  ratio {ratio:.3f}  "
                     f"peak {r['peak_phase_plan']}/{r['peak_phase_measured']}  RSS growth {r['rss_growth_mib']:.0f} MiB "
                     f"(tracked {r['tracked_growth_mib']:.0f})")
    settings = {"threads": args.threads, "device": "cpu (plan: device=cpu, strategy=single, no CUDA allowance)",
                "recipe": "tiny-cpu + " + json.dumps(BASE), "measured": "one Trainer.step after a zero-gradient AdamW update (moments exist, as in every step after the first)",
                "load_average_start": load_before, "load_average_end": load_average()}
    return finish(NAME, "Memory plan vs measured peak memory of a training step (CPU)", figures, settings, raw,
                  time.perf_counter() - t0, Path(args.out_dir), lines)


if __name__ == "__main__":
    raise SystemExit(main())
