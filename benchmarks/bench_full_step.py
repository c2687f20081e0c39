"""One full SDPO training step on the tiny CPU recipe: our ``Trainer.step`` vs TRL's ``SDPOTrainer``.

A full step = generation + judging + teacher-context building + teacher/student forwards + loss + backward +
AdamW + EMA teacher update. Both sides train the same locally built tiny Qwen3 (``llm.tiny.build_tiny``,
hidden 128, 2 layers, briefly pretrained by ``llm.tiny_pretrain`` so that some completions succeed) offline
with the tiny-cpu settings: 4 prompts × 4 completions, 10 new tokens, weight decay 0.01, grad-clip 1.0, full-vocabulary reverse KL, EMA teacher (rate 0.05), temperature 1; the learning rate is tiny (1e-6, not the recipe's 3e-3) so that neither policy drifts during
the timed steps and both sides sample statistically the same completions (lengths, successes), which a
step's cost depends on.

Matched as far as TRL allows: both sides get the same word-constraints prompts (the same chat-formatted
text), the same reward (the task's rule-based judge) and demonstration-only teacher contexts (a
successful sibling, score ≥ 0.5, low enough that the tiny model has some; TRL's environment feedback is one text per prompt, not a critique of
each attempt, so ours runs with ``context.use_feedback: false`` here). Each side keeps its own re-prompt
wording and demo choice (TRL skips rows that succeeded themselves, ours shows them another success).
TRL's own defaults of bf16 mixed precision and gradient checkpointing are switched off, as in the tiny-cpu
recipe (float32, no checkpointing). A third variant, ``ours_unshared``, is ours with
``training.share_prompt_prefix: false``. Peak memory is the RSS growth over the training loop.

Each side runs in a fresh process, alternating over ``--rounds`` rounds (so machine drift hits both);
per-step wall times after warm-up steps, pooled over the rounds; figure = median step.

    python benchmarks/bench_full_step.py
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, figure, load_average, parse_or_work, print_figures, trl_installed, spawn_worker, write_results  # noqa: E402

NAME = "full_step"
SUCCESS = 0.5  # score at which a sibling is a demonstration (both sides; low, so the tiny model has some)
VARIANTS = ("ours", "ours_unshared", "trl")  # ours_unshared: training.share_prompt_prefix false, to show its part


def _prompts(tok, n: int) -> list[tuple[str, str]]:
    """The benchmark's ``n`` word-constraints prompts (the same on both sides): ``(task prompt, chat-formatted text)``."""
    from llm.context import format_prompt
    from llm.tasks import get_task

    return [(p, format_prompt(tok, p)) for p in get_task("word-constraints").sample_prompts(random.Random(0), n)]


def _mean_prompt_tokens(model_dir, n: int) -> float:
    """Mean length of the student prompts as the trainer tokenises them (``llm.context.prompt_ids``)."""
    from transformers import AutoTokenizer

    from llm.context import prompt_ids
    from llm.recipe import load_recipe, resolve_recipe_path

    tok, limit = AutoTokenizer.from_pretrained(model_dir), load_recipe(resolve_recipe_path("tiny-cpu")).training.max_prompt_length
    return statistics.mean(len(prompt_ids(tok, p, limit)) for p, _ in _prompts(tok, n))


def run_worker(args) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    os.environ["TRL_EXPERIMENTAL_SILENCE"], os.environ["HF_HUB_OFFLINE"] = "1", "1"
    torch.set_num_threads(args.threads)
    steps, batch = args.warmup + args.steps, args.prompts * args.generations
    model_dir = args.model_dir
    scratch = tempfile.TemporaryDirectory(prefix="bench-full-step-")  # output dirs; removed when the worker exits
    times: list[float] = []
    if args.worker in ("ours", "ours_unshared"):
        from llm.recipe import load_recipe, resolve_recipe_path
        from llm.trainer import Trainer

        recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {
            "model.path": str(model_dir), "training.output_dir": f"{scratch.name}/ours", "training.save_every": 0,
            "training.heatmap_every": 0, "training.steps": steps, "training.learning_rate": args.learning_rate, "training.prompts_per_step": args.prompts,
            "method.num_generations": args.generations, "training.max_new_tokens": args.max_new_tokens,
            "context.use_feedback": False, "context.success_threshold": SUCCESS,
            "training.share_prompt_prefix": "auto" if args.worker == "ours" else False})
        trainer, lengths, distilled = Trainer(recipe), [], []
        mem = PeakRSS().start()  # model, teacher copy and optimiser exist; Adam's state comes with the first step
        for s in range(steps):
            t0 = time.perf_counter()
            m = trainer.step(s)
            times.append(time.perf_counter() - t0)
            lengths.append(m["response_length"])
            distilled.append(m["distill_fraction"])
    else:
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        from llm.tasks import get_task

        tok, task = AutoTokenizer.from_pretrained(model_dir), get_task("word-constraints")
        data = Dataset.from_list([{"prompt": text, "task_prompt": p} for p, text in _prompts(tok, args.prompts * steps)])

        def reward(completions, task_prompt, **_):
            return [task.judge(p, c).score for p, c in zip(task_prompt, completions)]

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t0)

        config = SDPOConfig(
            output_dir=f"{scratch.name}/trl", per_device_train_batch_size=batch, num_generations=args.generations,
            max_completion_length=args.max_new_tokens, learning_rate=args.learning_rate, weight_decay=0.01, max_grad_norm=1.0,
            lr_scheduler_type="constant", max_steps=steps, logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", distillation_mode="full_logits", distillation_alpha=1.0, teacher_model_kind="ema",
            teacher_update_rate=0.05, success_reward_threshold=SUCCESS, disable_tqdm=True, seed=0,
            # TRL's defaults are bf16 mixed precision and gradient checkpointing; the tiny-cpu recipe (ours) is float32
            # without checkpointing, so both are switched off here (with them, TRL's step takes ~2x as long on this CPU)
            bf16=False, gradient_checkpointing=False)
        trainer = SDPOTrainer(model=str(model_dir), reward_funcs=[reward], args=config, train_dataset=data,
                              processing_class=tok, callbacks=[StepTimer()])
        mem = PeakRSS().start()  # model and teacher copy exist; train() builds the optimiser, its state the first step
        trainer.train()
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        distilled = [h.get("self_distillation/reprompt_sample_fraction", 0.0) for h in trainer.state.log_history
                     if "completions/mean_length" in h]
    times, lengths, distilled = times[args.warmup:], lengths[args.warmup:], distilled[args.warmup:]
    tokens = sum(lengths) * batch
    return {"variant": args.worker, "median_step_s": statistics.median(times), "min_step_s": min(times),
            "tokens_per_s": tokens / sum(times), "mean_completion_len": sum(lengths) / len(lengths),
            "distilled_fraction": sum(distilled) / len(distilled), "peak_growth_mib": round(mem.growth_mib(), 1),
            "times_s": [round(t, 4) for t in times]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per side, run alternately")
    p.add_argument("--learning-rate", type=float, default=1e-6, help="tiny: the policies must not drift apart while timed")
    p.add_argument("--pretrain-steps", type=int, default=200,
                   help="llm.tiny_pretrain steps before the run, so that some completions succeed and get demonstrations")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    args = parse_or_work(p, argv, run_worker)
    if args is None:
        return 0
    if not trl_installed():
        return 1
    from tqdm import tqdm

    from llm.tiny import build_tiny
    from llm.tiny_pretrain import pretrain_dir

    t0, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-full-step-model-") as tmp:
        model_dir = build_tiny(tmp, hidden_size=args.hidden, num_layers=args.layers, seed=0)
        if args.pretrain_steps:
            pretrain_dir(model_dir, "word-constraints", steps=args.pretrain_steps, seed=0)
        prompt_tokens = _mean_prompt_tokens(model_dir, args.prompts * (args.warmup + args.steps))
        passthrough = [*(argv if argv is not None else sys.argv[1:]), "--model-dir", str(model_dir)]
        rounds: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _, v in tqdm([(r, v) for r in range(args.rounds) for v in VARIANTS], desc="full-step runs", unit="run"):
            rounds[v].append(spawn_worker(__file__, v, passthrough))
    raw = {}
    for v, rs in rounds.items():
        times = [t for r in rs for t in r["times_s"]]
        length = statistics.mean(r["mean_completion_len"] for r in rs)
        raw[v] = {"variant": v, "median_step_s": statistics.median(times), "min_step_s": min(times),
                  "tokens_per_s": length * args.prompts * args.generations * len(times) / sum(times),
                  "mean_completion_len": length, "median_step_s_by_round": [r["median_step_s"] for r in rs],
                  "distilled_fraction": statistics.mean(r["distilled_fraction"] for r in rs),
                  "peak_growth_mib": max(r["peak_growth_mib"] for r in rs)}
    o, t = raw["ours"], raw["trl"]
    step = figure("full training step time (median): ours Trainer.step vs TRL SDPOTrainer", o["median_step_s"],
                  t["median_step_s"], "s", target_ratio=0.833)  # time ≤ 1/1.2 ⇔ throughput ≥ 1.2×
    by_round = [round(a / b, 3) for a, b in zip(o["median_step_s_by_round"], t["median_step_s_by_round"])]
    step["note"] = (f"per-round ratios {by_round} (fresh processes, run alternately; the spread is machine drift "
                    "between processes). Both sample the whole batch in one generate call (ours with a per-completion "
                    "Gumbel stream, so samples do not depend on the batch split) and run float32 without gradient "
                    "checkpointing. Ours runs each shared prompt / teacher-context prefix once (llm/prefix.py; see the "
                    "row without it), the teacher only on rows that have a context, and the no-grad teacher forward "
                    "before the student's. Same prompts, reward and demo-only contexts; re-prompt wording and demo choice "
                    "are each side's own, and each side samples its own completions; rows with a teacher context: ours "
                    f"{o['distilled_fraction']:.2f}, TRL {t['distilled_fraction']:.2f}. About 40% of our step is "
                    "model.generate, the same HF call on both sides.")
    tput = figure("full training step throughput (completion tokens/s): ours vs TRL SDPOTrainer", o["tokens_per_s"],
                  t["tokens_per_s"], "tok/s", higher_is_better=True,
                  note="completion lengths differ (each side samples its own completions)")
    unshared = figure("full training step time (median): ours without shared prefixes vs TRL SDPOTrainer",
                      raw["ours_unshared"]["median_step_s"], t["median_step_s"], "s")
    unshared["note"] = (f"informative: training.share_prompt_prefix false. The prompts average {prompt_tokens:.0f} tokens "
                        f"(character vocabulary) against ~{o['mean_completion_len']:.0f}-token completions, so most positions "
                        "of a step are prompt and teacher-context positions that the shared prefixes run once per group; "
                        "with completions much longer than prompts (typical of real LLM runs) that gain shrinks")
    mem = figure("full training step peak memory: ours vs TRL SDPOTrainer", o["peak_growth_mib"], t["peak_growth_mib"],
                 "MiB", target_ratio=1.0,
                 note="peak RSS growth over the whole training loop (warm-up included; the largest of the rounds), "
                      "from after the model and teacher copy are built: optimiser state, activations, generation caches")
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "prompts", "generations", "max_new_tokens", "steps",
                                               "warmup", "rounds", "threads", "pretrain_steps", "learning_rate")}
    settings["mean_prompt_tokens"] = round(prompt_tokens, 1)
    settings.update({"ours": "tiny-cpu recipe with context.use_feedback false: demonstration-only teacher contexts",
                     "trl": "SDPOTrainer full_logits alpha 1, EMA teacher, constant lr, success_reward_threshold 0.5, "
                            "float32 and no gradient checkpointing (bf16 false, gradient_checkpointing false: TRL's defaults are "
                            "true, the tiny-cpu recipe's are not)",
                     "both": "word-constraints prompts (same text), the task's judge as the reward, EMA rate 0.05",
                     "load_average_before": load_before, "load_average_after": load_average()})
    path = write_results(NAME, "One full SDPO training step on the tiny CPU recipe: ours vs TRL SDPOTrainer",
                         [step, tput, unshared, mem], settings, raw, time.perf_counter() - t0, results_dir=Path(args.out_dir))
    for v, r in raw.items():
        print(f"{v:<13} median step {r['median_step_s']:.4f} s  {r['tokens_per_s']:8.1f} tok/s  mean length "
              f"{r['mean_completion_len']:.2f}  distilled rows {r['distilled_fraction']:.2f}")
    print_figures([step, tput, unshared, mem])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
