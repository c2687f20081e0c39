"""Monte Carlo advantage continuations (llm/ground_truth.py): continuation tokens per second, batched vs one prefix at a time.

The work of :func:`llm.ground_truth.mc_advantages` on the rollouts of one tiny-cpu step: every distinct unfinished prefix
``x, y_<t`` of ``--prompts`` prompts × ``--group`` sampled completions (``--max-new-tokens``) gets ``--n`` continuations
up to the remaining budget. Three ways to sample the same continuations (same Gumbel streams), in the same run:

- **shared-prefix batched** (ours, ``share_prefix=True``): all prefixes with the same budget in one ``model.generate``
  call, each prefix's key/value cache computed once and repeated to its ``n`` rows;
- **batched** (``share_prefix=False``): the same calls through ``TransformersGenerator``, every row running its own prefix;
- **naive** (the baseline): one ``TransformersGenerator`` call (``n`` rows) per prefix.

Model: ``llm.tiny.build_tiny`` at make-tiny's sizes (hidden 64, 2 layers), random weights, built locally; one torch thread.

    .venv/bin/python benchmarks/bench_mc_advantage.py      # writes benchmarks/results/mc_advantage.json
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
from _common import RESULTS_DIR, figure, finish, load_average, time_calls
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.context import prompt_ids
from llm.generation import TransformersGenerator, sample_seed
from llm.ground_truth import Sampling, judge_scorer, mc_advantages, sample_continuations
from llm.recipe import GenerationConfig
from llm.tasks import judge_word, sample_word_prompts
from llm.tiny import build_tiny


def prefix_groups(p_ids, completions, sampling: Sampling) -> dict[int, list[list[int]]]:
    """Remaining budget → the distinct unfinished prefixes (prompt + completion's first ``t`` tokens) with that budget,
    as :func:`llm.ground_truth.mc_advantages` forms them."""
    groups: dict[int, dict[tuple, None]] = {}
    for p, c in zip(p_ids, completions):
        for t in range(len(c) + 1):
            ended = t >= sampling.max_new_tokens or (t > 0 and c[t - 1] == sampling.eos_id)
            if not ended:
                groups.setdefault(sampling.max_new_tokens - t, {})[tuple(p) + tuple(c[:t])] = None
    return {b: [list(k) for k in g] for b, g in sorted(groups.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--n", type=int, default=16, help="continuations per prefix")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(tmp, hidden_size=64, num_layers=2, seed=0)
        model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = sample_word_prompts(random.Random(0), args.prompts)
    p_ids = [prompt_ids(tok, p, 128) for p in prompts]
    sampling = Sampling(temperature=1.0, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    groups = TransformersGenerator(GenerationConfig(), 1.0, args.max_new_tokens, tok)(model, p_ids, args.group, list(range(args.prompts)))
    rows = [i for i in range(args.prompts) for _ in range(args.group)]
    completions = [c for g in groups for c in g.completion_ids]
    row_prompts = [p_ids[i] for i in rows]
    budgets = prefix_groups(row_prompts, completions, sampling)
    seeds = {b: [sample_seed(0, *p) for p in ps] for b, ps in budgets.items()}
    n_prefixes = sum(len(ps) for ps in budgets.values())

    def batched(share: bool):
        return {b: sample_continuations(model, ps, args.n, seeds[b], b, sampling, share_prefix=share) for b, ps in budgets.items()}

    def naive():
        return {b: [sample_continuations(model, [p], args.n, [s], b, sampling, share_prefix=False)[0] for p, s in zip(ps, seeds[b])]
                for b, ps in budgets.items()}

    outs = {"shared": batched(True), "batched": batched(False), "naive": naive()}
    tokens = sum(len(x) for cs in outs["naive"].values() for c in cs for x in c)
    same = {k: sum(a == b for bud in budgets for a, b in zip(outs[k][bud], outs["naive"][bud])) / n_prefixes for k in ("shared", "batched")}
    times = {"shared": time_calls(lambda: batched(True), args.repeats, warmup=0),
             "batched": time_calls(lambda: batched(False), args.repeats, warmup=0),
             "naive": time_calls(naive, args.repeats, warmup=0)}
    rate = {k: tokens / v["min_s"] for k, v in times.items()}
    cpu_rate = {k: tokens / v["cpu_min_s"] for k, v in times.items()}
    score = judge_scorer(judge_word, prompts)
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    whole = time_calls(lambda: mc_advantages(model, row_prompts, completions, rows, score, decode, sampling, n_continuations=args.n),
                       1, warmup=0)
    note = (f"{n_prefixes} prefixes × {args.n} continuations, {tokens} continuation tokens, {len(budgets)} generate calls batched vs "
            f"{n_prefixes} naive; same tokens as naive on {same['shared']:.0%} (shared) / {same['batched']:.0%} (batched) of the "
            f"prefixes; min of {args.repeats} repeats, one thread, load average {load_average()} (machine shared)")
    figures = [
        figure("MC continuations: shared-prefix batched vs one prefix at a time (wall)", round(rate["shared"], 1),
               round(rate["naive"], 1), "tokens/s", target_ratio=1.0, higher_is_better=True, note=note),
        figure("MC continuations: shared-prefix batched vs one prefix at a time (CPU time)", round(cpu_rate["shared"], 1),
               round(cpu_rate["naive"], 1), "tokens/CPU-s", target_ratio=1.0, higher_is_better=True,
               note="process CPU time: insensitive to time descheduled on a shared machine"),
        figure("MC continuations: batched without prefix sharing vs one prefix at a time (wall)", round(rate["batched"], 1),
               round(rate["naive"], 1), "tokens/s", higher_is_better=True),
        figure("MC continuations: shared-prefix batched vs batched without sharing (wall)", round(rate["shared"], 1),
               round(rate["batched"], 1), "tokens/s", higher_is_better=True),
    ]
    settings = {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens, "n": args.n,
                "repeats": args.repeats, "threads": args.threads, "model": "build_tiny hidden 64, 2 layers, random, seed 0"}
    raw = {"times": times, "tokens": tokens, "prefixes": n_prefixes, "same_as_naive": same, "rate_tokens_per_s": rate,
           "cpu_rate_tokens_per_s": cpu_rate, "mc_advantages_whole_s": whole["min_s"], "load_average": load_average()}
    return finish("mc_advantage", "Monte Carlo advantage continuations: shared-prefix batching vs one prefix at a time",
                  figures, settings, raw, time.time() - start, args.out_dir or RESULTS_DIR)


if __name__ == "__main__":
    raise SystemExit(main())
