"""One SDPO update on the tiny CPU recipe's model: ours (llm.trainer) vs TRL's SDPOTrainer.

Both sides get the same locally built tiny Qwen3 model (the tiny-cpu recipe's size), the same fixed
batch (prompts_per_step prompts, each repeated num_generations times as in any GRPO/SDPO batch; per row
one completion and a teacher context laid out as llm.context builds it: the prompt, a demonstration
shared by the group, then the row's own feedback) and settings (full-vocabulary
reverse KL, temperature 1, AdamW lr 3e-3, weight decay 0.01, grad-clip 1.0). One update = teacher
forward (no grad) + student forward + SDPO loss + backward + clip + AdamW step.

- ours: ``llm.trainer.completion_outputs`` (with ``share_prompt_prefix``, the trainer's default: each prompt
  runs once per group) + ``sdpo_loss`` (what ``Trainer.compute_loss`` runs);
- TRL: ``SDPOTrainer._compute_teacher_student_logits`` + ``_compute_self_distillation_loss``, TRL's own
  methods bound to a minimal host (as in tests/test_peers_trl_trainer.py).

Generation, judging and teacher-context building are excluded from both (they are not comparable:
different generation back-ends and prompt templates). Throughput = completion tokens per second of the
median update, both sides timed alternately in one process; memory = peak RSS growth, each side in a
fresh process per round.

    python benchmarks/bench_train_step.py
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, figure, load_average, parse_or_work, print_figures, trl_installed, spawn_worker, time_calls, trl_sdpo_loss_fn, write_results  # noqa: E402

NAME = "train_step"
VARIANTS = ("ours", "trl")
INTERLEAVED = ("ours", "ours_unshared", "trl")  # ours_unshared: training.share_prompt_prefix false, to show its part


def _batch(args):
    import torch

    from llm.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, seed=0)
    g = torch.Generator().manual_seed(0)
    b, vocab = args.prompts * args.generations, len(tok)
    prompt = torch.randint(4, vocab, (args.prompts, args.prompt_len), generator=g).repeat_interleave(args.generations, 0)
    # teacher context = the prompt, a demonstration shared by the group, per-row feedback (llm.context's layout)
    demo_len = (args.context_len - args.prompt_len) // 2
    demo = torch.randint(4, vocab, (args.prompts, demo_len), generator=g).repeat_interleave(args.generations, 0)
    feedback = torch.randint(4, vocab, (b, args.context_len - args.prompt_len - demo_len), generator=g)
    context = torch.cat([prompt, demo, feedback], 1)
    completion = torch.randint(4, vocab, (b, args.completion_len), generator=g)
    mask = torch.ones(b, args.completion_len)
    inputs = {
        "prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion, "completion_mask": mask,
        "teacher_input_ids": torch.cat([context, completion], 1),
        "teacher_attention_mask": torch.ones(b, args.context_len + args.completion_len, dtype=torch.long),
        "self_distillation_mask": torch.ones(b),
    }
    return model, inputs


def _update_fn(variant: str, model, inputs, args):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    T = inputs["completion_ids"].shape[1]

    if variant in ("ours", "ours_unshared"):
        from llm.losses import sdpo_loss
        from llm.models import completion_outputs
        from sdpo_sim.core.method import MethodConfig

        method = MethodConfig(name="sdpo", alpha=1.0, support="full", loss_type="sequence_mean")
        share = args.share_prefix and variant == "ours"
        s_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        s_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"].long()], 1)
        d_mask = inputs["completion_mask"] * inputs["self_distillation_mask"].unsqueeze(-1)

        def loss_fn():
            with torch.no_grad():
                teacher = completion_outputs(model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], T,
                                             hidden=False, share_prefix=share)
            student = completion_outputs(model, s_ids, s_mask, T, hidden=False, share_prefix=share)
            return sdpo_loss(student, teacher, inputs["completion_ids"], d_mask, method, max_len=T)
    else:
        loss_fn = trl_sdpo_loss_fn(model, inputs)

    def update():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    return update


def run_worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = _batch(args)
    model.train()
    first_loss = None
    update = _update_fn(args.worker, model, inputs, args)
    gc.collect()
    mem = PeakRSS().start()
    first_loss = update()  # also the warm-up
    timing = time_calls(update, repeats=args.repeats, warmup=0)
    tokens = inputs["completion_mask"].sum().item()
    return {"variant": args.worker, "peak_growth_mib": round(mem.growth_mib(), 1), "first_loss": first_loss,
            "tokens_per_update": tokens, "tokens_per_s": tokens / timing["min_s"], **timing}


def run_interleaved(args) -> dict:
    """Both updates in one process, on their own copies of the model, timed alternately (ours, TRL, ours, ...):
    drift in machine speed hits both sides alike, which separate processes cannot guarantee."""
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    updates, tokens = {}, None
    for v in INTERLEAVED:
        model, inputs = _batch(args)
        model.train()
        updates[v], tokens = _update_fn(v, model, inputs, args), inputs["completion_mask"].sum().item()
        updates[v]()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in INTERLEAVED}
    for _ in range(args.repeats * 2):
        for v in INTERLEAVED:
            t0 = time.perf_counter()
            updates[v]()
            times[v].append(time.perf_counter() - t0)
    return {v: {"min_s": min(ts), "median_s": sorted(ts)[len(ts) // 2], "tokens_per_s": tokens / min(ts),
                "tokens_per_s_median": tokens / sorted(ts)[len(ts) // 2]} for v, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128, help="tiny model hidden size (tiny-cpu: 128)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (tiny-cpu: 4)")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (tiny-cpu: 4)")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--context-len", type=int, default=160, help="teacher context tokens: prompt + demo + feedback (half each of the rest)")
    p.add_argument("--completion-len", type=int, default=10, help="tiny-cpu: max_new_tokens 10")
    p.add_argument("--repeats", type=int, default=20, help="timed updates per run (min taken); few repeats let load spikes decide the figure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="ours without the shared prompt prefix (training.share_prompt_prefix: false)")
    args = parse_or_work(p, argv, lambda a: run_interleaved(a) if a.worker == "interleaved" else run_worker(a))
    if args is None:
        return 0
    if not trl_installed():
        return 1

    from tqdm import tqdm

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    t0, load_before = time.perf_counter(), load_average()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _, variant in tqdm([(r, v) for r in range(args.rounds) for v in VARIANTS], desc="train-step runs", unit="run"):
        runs[variant].append(spawn_worker(__file__, variant, passthrough))
    inter = spawn_worker(__file__, "interleaved", passthrough)
    raw = {f"{v} (interleaved)": r for v, r in inter.items()}  # one table row per side, like the per-process rows
    for v, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        raw[v] = {**best, "peak_growth_mib": max(r["peak_growth_mib"] for r in rs),
                  "tokens_per_s_by_round": [round(r["tokens_per_s"], 1) for r in rs]}
    wall = time.perf_counter() - t0
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "prompts", "generations", "prompt_len", "context_len",
                                               "completion_len", "repeats", "rounds", "threads", "share_prefix")}
    settings.update({"model": "tiny Qwen3 (llm.tiny), char vocabulary, float32", "loss": "full-vocabulary reverse KL",
                     "optimizer": "AdamW lr 3e-3 wd 0.01, grad-clip 1.0", "excluded": "generation, judging, teacher-context building",
                     "batch": "each prompt repeated num_generations times; teacher context = prompt + a demonstration shared by the group + the row's feedback",
                     "load_average_before": load_before, "load_average_after": load_average()})
    o, t = raw["ours"], raw["trl"]
    io, it = inter["ours"], inter["trl"]
    tput = figure("training update throughput (completion tokens/s, median update): ours vs TRL SDPOTrainer",
                  io["tokens_per_s_median"], it["tokens_per_s_median"], "tok/s", target_ratio=1.2, higher_is_better=True)
    by_round = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(runs["ours"], runs["trl"])]
    unshared = figure("training update throughput (median update): ours without shared prefixes vs TRL SDPOTrainer",
                      inter["ours_unshared"]["tokens_per_s_median"], it["tokens_per_s_median"], "tok/s", higher_is_better=True)
    unshared["note"] = ("informative: training.share_prompt_prefix false, i.e. every row runs its whole prompt and teacher "
                        "context; the difference from the row above is what the shared prefixes (llm/prefix.py) win")
    tput["note"] = (f"median of {2 * args.repeats} updates per side, timed alternately in one process (the fastest single "
                    f"updates' ratio: {io['tokens_per_s'] / it['tokens_per_s']:.3f}); separate fresh processes per round "
                    f"(used for memory) give per-round ratios {by_round}, spread by machine drift between processes. "
                    "Where ours gains: the student runs each prompt once per group and the teacher each shared prompt + "
                    "demonstration once (llm/prefix.py; see the row without it), and the no-grad teacher forward runs "
                    "before the student's, so its activations are freed before the student graph is built (TRL: student "
                    "first), which also gives the lower peak memory. The model forwards/backward and AdamW are the same "
                    "HF/torch ops on both sides")
    if tput["met"] is False:
        tput["note"] += ("; missed: with a ~100-token vocabulary the matmuls, attention and AdamW are ~95% of an update "
                         "on both sides (torch.profiler), so beyond the positions saved there is little to win")
    mem = figure("training update peak memory: ours vs TRL SDPOTrainer", o["peak_growth_mib"], t["peak_growth_mib"],
                 "MiB", target_ratio=1.0)
    if mem["met"] is False:
        mem["note"] = "peak RSS growth of a few MiB on a tiny model: allocator noise of the same order as the difference"
    path = write_results(NAME, "One SDPO update on the tiny CPU recipe's model: ours vs TRL SDPOTrainer",
                         [tput, unshared, mem], settings, raw, wall, results_dir=Path(args.out_dir))
    for v in VARIANTS:
        r = raw[v]
        print(f"{v:<6} {inter[v]['tokens_per_s']:>9.1f} tok/s (fastest, interleaved)  peak {r['peak_growth_mib']:>7.1f} MiB  first loss {r['first_loss']:.6f}")
    print_figures([tput, unshared, mem])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
