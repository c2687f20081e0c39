"""The LLM training step on a user's dataset (issue 14): a 100k-row JSONL vs the built-in prompt sampler.

Two trainers on the shipped ``tiny-cpu`` recipe and the same tiny random Qwen3 (``llm.tiny.build_tiny`` with
make-tiny's default sizes, built locally; a small model makes the step short, so any data-path cost shows the
most), in one process, same seed:

- **A**: the built-in word-constraints sampler and its rule-based judge (``task.dataset`` unset);
- **B**: ``task.dataset`` = a 100k-row JSONL of word-constraints prompts with four more columns (``length``,
  ``required``, ``forbidden``, ``ending``: the prompt's constraints) and ``task.reward_funcs`` =
  :func:`judge_words` of this file (``path/to/bench_llm_dataset.py:judge_words``), a batched reward function
  that takes two of the columns and scores each item with ``llm.tasks.judge_word``, as A's judge does.

The dataset's rows are placed so that B reads at every timed step exactly the prompts A's sampler draws there:
``llm.data`` documents the training order (epoch ``e`` is ``default_rng([seed, e]).permutation(N)``), so position
``k`` of epoch 0 gets A's ``k``-th prompt (``(step, index) = divmod(k, prompts_per_step)``) and every other row a
prompt of the same sampler with another seed. Generation is seeded per completion (``llm.generation``), so both
trainers then do the same work, completion for completion; the benchmark checks that their losses agree. What
differs is only the data path: reading the rows from the memory-mapped Arrow table, handing the columns to the
reward function, one batched call instead of the per-item judge wrapper.

1. Step time: ``Trainer.step`` (the full step: prompts, generation, reward, teacher contexts, forwards, loss,
   backward, AdamW, EMA teacher) of A and B alternately, the order flipping every step (A B, B A, ...), after
   ``--warmup`` steps each; figure = median(B) / median(A), target <= 1.05. Spread: the per-step paired
   ratios B_s / A_s (quartiles) and a bootstrap 95% interval of the ratio of medians (resampling step pairs).
2. Prompt reading alone: ``rows_for_step`` of each source at the timed steps (what the data path adds).
3. The one-off load (once per run, not per step): ``PromptDataset.load`` (JSON -> Arrow copy) and ``drop_long``
   (tokenises every prompt as the trainer does) of the 100k-row JSONL, and of the same rows as Parquet.
4. Memory: trainer B built and run ``--memory-steps`` steps in a fresh child process on a 10-row file, a
   1000-row one (``drop_long``'s batch: what a file pays once it fills a batch), the 100k-row file and a 1M-row
   file of the same kind (``--large-rows``; first prompts identical), alternately; peak RSS growth over
   construction + steps (VmHWM after clear_refs, ``_common.PeakRSS``) and the anonymous / file-backed resident
   memory at the end (``RssAnon`` / ``RssFile`` of ``/proc/self/status``). Figures, each
   target <= 1 (memory grows with the dataset by no more than the memory-mapped Arrow file):
   (100k growth - 10-row growth) / the 100k Arrow file's size, and the slope beyond it,
   (1M growth - 100k growth) / (1M Arrow size - 100k Arrow size).
5. Reward-function calls per step (counted by :func:`judge_words` itself): one per function and step.

    .venv/bin/python benchmarks/bench_llm_dataset.py                       # ~4 min on a shared 2-core machine
    .venv/bin/python benchmarks/bench_llm_dataset.py --large-rows 0          # without the 1M-row memory child (~2 min)
    .venv/bin/python benchmarks/bench_llm_dataset.py --quick --out-dir /tmp/x   # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow as pa
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, figure, finish, load_average, parse_or_work, spawn_worker  # noqa: E402

from llm.data import PromptDataset  # noqa: E402
from llm.feedback import Judgement  # noqa: E402
from llm.prompts import TaskPrompts, prompt_token_counter  # noqa: E402
from llm.recipe import Recipe, load_recipe, resolve_recipe_path  # noqa: E402
from llm.tasks import get_task, judge_word, parse_word_prompt, sample_word_prompts  # noqa: E402
from llm.tiny import build_tiny  # noqa: E402
from llm.trainer import Trainer  # noqa: E402

NAME = "llm_dataset"
TARGET_STEP_RATIO = 1.05  # issue 14: the step on a dataset within 5% of the built-in sampler's
TARGET_MEMORY_RATIO = 1.0  # issue 14: memory grows with the dataset by no more than the memory-mapped file
FILLER_SEED = 12345  # the sampler seed of the rows no timed step reads
SMALL_ROWS = 10
BATCH_ROWS = 1000  # PromptDataset.drop_long's default batch: a file this size already pays its per-batch buffers
BOOTSTRAP = 2000  # resamples of the step pairs for the interval of the ratio of medians
REWARD_SPEC = f"{Path(__file__).resolve()}:judge_words"


# ------------------------------------------------------------------------------------------- reward function
def judge_words(prompts: list[str], completions: list[str], length: list[int], ending: list[str], **_) -> list[Judgement]:
    """A batched reward function (called once per batch of ``N`` items): ``llm.tasks.judge_word`` of each item, the
    built-in task's judge (score in [0, 1] and a critique). ``length``/``ending``: the dataset's columns (``N``
    values each), taken to show columns reach the function; the judge reads the constraints from the prompt.
    Counts its calls and items in ``judge_words.calls`` / ``judge_words.items``."""
    judge_words.calls += 1
    judge_words.items += len(prompts)
    return [judge_word(p, c) for p, c in zip(prompts, completions)]


judge_words.calls = 0
judge_words.items = 0


# ------------------------------------------------------------------------------------------- data
def builtin_prompts(seed: int, steps: int, per_step: int) -> list[str]:
    """The built-in sampler's prompts of steps ``0..steps-1`` (``per_step`` each), concatenated in step order."""
    source = TaskPrompts(get_task("word-constraints"))
    return [r.prompt for s in range(steps) for r in source.rows_for_step(seed, s, per_step)]


def write_dataset(path: Path, rows: int, first: list[str], seed: int) -> Path:
    """A ``rows``-row word-constraints dataset (JSONL, or Parquet for a ``.parquet`` path) whose epoch-0 training
    position ``k`` (``default_rng([seed, 0]).permutation(rows)[k]``, llm.data's order) holds ``first[k]``; the other
    rows are sampler prompts with seed ``FILLER_SEED``. Columns: prompt, length, required, forbidden, ending."""
    if len(first) > rows:
        raise ValueError(f"write_dataset: {len(first)} placed prompts do not fit in {rows} rows")
    prompts = sample_word_prompts(random.Random(FILLER_SEED), rows)
    order = np.random.default_rng([seed, 0]).permutation(rows)
    for k, p in enumerate(first):
        prompts[int(order[k])] = p
    specs = [vars(parse_word_prompt(p)) for p in prompts]
    columns = {"prompt": prompts, **{c: [s[c] for s in specs] for c in ("length", "required", "forbidden", "ending")}}
    if path.suffix == ".parquet":
        datasets.Dataset.from_dict(columns).to_parquet(str(path))
    else:
        with open(path, "w") as f:
            for i in range(rows):
                f.write(json.dumps({c: v[i] for c, v in columns.items()}) + "\n")
    return path


def tree_mib(path: Path) -> float:
    """Total size of the files under ``path`` (MiB)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def time_load(path: Path, recipe: Recipe, tokenizer, cache_dir: Path, drop: bool = True) -> dict[str, Any]:
    """``PromptDataset.load`` of ``path`` (its Arrow copy written to ``cache_dir``) then, with ``drop``,
    ``drop_long`` with the trainer's token counter and limit: seconds of each, rows dropped (None without
    ``drop``), the file's and the Arrow copy's size (MiB)."""
    t0 = time.perf_counter()
    ds = PromptDataset.load(str(path), cache_dir=str(cache_dir))
    t1 = time.perf_counter()
    dropped = ds.drop_long(prompt_token_counter(tokenizer, recipe.generation.chat_template_kwargs),
                           recipe.training.max_prompt_length) if drop else None
    t2 = time.perf_counter()
    return {"rows": ds.num_file_rows, "dropped": dropped, "load_s": round(t1 - t0, 3), "drop_long_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3), "file_mib": round(path.stat().st_size / 2**20, 2),
            "arrow_mib": round(sum(p.stat().st_size for p in cache_dir.rglob("*.arrow")) / 2**20, 2)}


# ------------------------------------------------------------------------------------------- recipes
def make_recipe(model_dir: str, out_dir: str, steps: int, dataset: Optional[str] = None) -> Recipe:
    """The shipped tiny-cpu recipe on ``model_dir``, no checkpoints or heatmaps; with ``dataset``: that file as
    ``task.dataset`` and :func:`judge_words` as its one reward function."""
    overrides: dict[str, Any] = {"model.path": model_dir, "training.output_dir": out_dir, "training.steps": steps,
                                 "training.save_every": 0, "training.heatmap_every": 0}
    if dataset is not None:
        overrides.update({"task.dataset": dataset, "task.reward_funcs": [REWARD_SPEC]})
    return load_recipe(resolve_recipe_path("tiny-cpu"), overrides)


def _status_mib() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process (MiB), from ``/proc/self/status`` (empty elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def memory_worker(args) -> dict[str, Any]:
    """In a fresh process: build trainer B on ``--dataset`` and run ``--memory-steps`` steps; peak RSS growth over
    both and the resident memory (anonymous, file-backed) at the end, relative to just before the trainer (MiB);
    then what pyarrow's memory pool still holds live, and the anonymous growth once the pool has returned its
    unused pages to the system (``release_unused``)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-llm-dataset-mem-") as out:
        recipe = make_recipe(args.model_dir, f"{out}/run", args.memory_steps, args.dataset)
        before, mem = _status_mib(), PeakRSS().start()
        t0 = time.perf_counter()
        trainer = Trainer(recipe)
        for s in range(args.memory_steps):
            trainer.step(s)
        seconds = time.perf_counter() - t0
        growth, after = mem.growth_mib(), _status_mib()
        arrow_live = pa.total_allocated_bytes() / 2**20
        pa.default_memory_pool().release_unused()
        released = _status_mib()
        fn = trainer.rewards.funcs[0]

        def delta(now: dict, key: str) -> float:
            return round(now.get(key, float("nan")) - before.get(key, float("nan")), 2)

        return {"rows": trainer.prompts.num_file_rows, "peak_growth_mib": round(growth, 2),
                "anon_growth_mib": delta(after, "RssAnon"), "file_growth_mib": delta(after, "RssFile"),
                "arrow_pool_live_mib": round(arrow_live, 2), "anon_growth_after_pool_release_mib": delta(released, "RssAnon"),
                "seconds": round(seconds, 1), "reward_calls": fn.calls, "method": mem.method}


# ------------------------------------------------------------------------------------------- timing
def timed_steps(a: Trainer, b: Trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Steps ``0..warmup+steps-1`` of both trainers, alternating (A B at even steps, B A at odd ones); per timed step
    each trainer's wall seconds and metrics, and the reward-function calls of B's steps."""
    fn = b.rewards.funcs[0]
    out: dict[str, Any] = {"A": [], "B": [], "metrics_A": [], "metrics_B": [], "calls": [], "items": []}
    for s in range(warmup + steps):
        for name in ("AB" if s % 2 == 0 else "BA"):
            trainer = a if name == "A" else b
            calls, items = fn.calls, fn.items
            t0 = time.perf_counter()
            m = trainer.step(s)
            dt = time.perf_counter() - t0
            if s >= warmup:
                out[name].append(dt)
                out[f"metrics_{name}"].append({k: m[k] for k in ("loss", "reward", "response_length", "distill_fraction")})
                if name == "B":
                    out["calls"].append(fn.calls - calls)
                    out["items"].append(fn.items - items)
    return out


def time_reads(a: Trainer, b: Trainer, seed: int, first_step: int, steps: int, per_step: int, repeats: int) -> dict[str, Any]:
    """Median wall milliseconds per step of ``rows_for_step`` for each trainer's prompt source over the timed steps
    (each step's read ``repeats`` times), and whether the two sources give the same prompts there."""
    out: dict[str, Any] = {}
    for name, trainer in (("A", a), ("B", b)):
        times = []
        for s in range(first_step, first_step + steps):
            for _ in range(repeats):
                t0 = time.perf_counter()
                trainer.prompts.rows_for_step(seed, s, per_step)
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1000
    out["same_prompts"] = all(
        [r.prompt for r in a.prompts.rows_for_step(seed, s, per_step)] == [r.prompt for r in b.prompts.rows_for_step(seed, s, per_step)]
        for s in range(first_step + steps))
    return out


def ratio_spread(a: list[float], b: list[float], seed: int = 0) -> dict[str, Any]:
    """Paired per-step ratios ``b[s]/a[s]`` (quartiles, min, max) and a bootstrap 95% interval of
    ``median(b)/median(a)`` over resampled step pairs (``BOOTSTRAP`` resamples, numpy seed ``seed``)."""
    ta, tb = np.asarray(a), np.asarray(b)
    paired = tb / ta
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ta.size, size=(BOOTSTRAP, ta.size))
    boot = np.median(tb[idx], axis=1) / np.median(ta[idx], axis=1)
    q = np.quantile(paired, [0.25, 0.5, 0.75])
    return {"paired_q25": round(float(q[0]), 3), "paired_median": round(float(q[1]), 3), "paired_q75": round(float(q[2]), 3),
            "paired_min": round(float(paired.min()), 3), "paired_max": round(float(paired.max()), 3),
            "ci95": [round(float(x), 3) for x in np.quantile(boot, [0.025, 0.975])]}


# ------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows of the dataset trainer B is timed on")
    p.add_argument("--large-rows", type=int, default=1_000_000,
                   help="rows of a third dataset for the memory check only (the growth beyond --rows); 0: skip it")
    p.add_argument("--steps", type=int, default=30, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer first")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory child after building")
    p.add_argument("--memory-rounds", type=int, default=1, help="memory children per dataset size, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a machine shared with other jobs)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2000 rows, 4 timed steps, 1 warm-up (needs --out-dir)")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = parse_or_work(p, argv, memory_worker)
    if args is None:
        return 0
    if args.quick:
        if Path(args.out_dir).resolve() == Path(__file__).resolve().parent / "results":
            p.error("--quick needs --out-dir elsewhere than benchmarks/results (a smoke run must not replace the results)")
        args.rows, args.steps, args.warmup, args.large_rows = 2000, 4, 1, 20000 if args.large_rows else 0
    if min(args.steps, args.memory_steps, args.memory_rounds, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --memory-steps, --memory-rounds and --threads must be positive, --warmup non-negative")
    total_steps = args.warmup + args.steps
    per_step = make_recipe("unused", "unused", 1).training.prompts_per_step
    seed = make_recipe("unused", "unused", 1).training.seed
    if args.large_rows and args.large_rows <= args.rows:
        p.error(f"--large-rows={args.large_rows} must exceed --rows={args.rows} (or be 0 to skip it)")
    if args.rows < max(total_steps, args.memory_steps) * per_step or args.memory_steps * per_step > SMALL_ROWS:
        p.error(f"--rows must hold the {total_steps} timed and warm-up steps' prompts ({total_steps * per_step}), and "
                f"--memory-steps x {per_step} prompts must fit in the {SMALL_ROWS}-row file")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    t_start, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-llm-dataset-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = str(build_tiny(tmp / "model", seed=0))
        first = builtin_prompts(seed, total_steps, per_step)
        print(f"[llm_dataset] writing {args.rows}-row and {SMALL_ROWS}-row datasets ...", flush=True)
        big = write_dataset(tmp / "prompts.jsonl", args.rows, first, seed)
        big_parquet = write_dataset(tmp / "prompts.parquet", args.rows, first, seed)
        small = write_dataset(tmp / f"prompts-{SMALL_ROWS}.jsonl", SMALL_ROWS, first[:args.memory_steps * per_step], seed)
        batch = write_dataset(tmp / f"prompts-{BATCH_ROWS}.jsonl", BATCH_ROWS, first[:args.memory_steps * per_step], seed)
        large = write_dataset(tmp / "prompts-large.jsonl", args.large_rows, first, seed) if args.large_rows else None

        print("[llm_dataset] one-off load times ...", flush=True)
        recipe_b = make_recipe(model_dir, str(tmp / "out-b"), total_steps, str(big))
        tok = AutoTokenizer.from_pretrained(model_dir)
        time_load(small, recipe_b, tok, tmp / "cache-warm")  # imports and the builders' first use, not timed
        loads = {"jsonl": time_load(big, recipe_b, tok, tmp / "cache-jsonl"),
                 "parquet": time_load(big_parquet, recipe_b, tok, tmp / "cache-parquet")}
        if large is not None:  # only its Arrow copy's size (drop_long of 1M rows is in the memory child)
            loads["large jsonl (load only)"] = time_load(large, recipe_b, tok, tmp / "cache-large", drop=False)
            shutil.rmtree(tmp / "cache-large")

        print("[llm_dataset] building trainers A (built-in sampler) and B (dataset) ...", flush=True)
        t0 = time.perf_counter()
        trainer_a = Trainer(make_recipe(model_dir, str(tmp / "out-a"), total_steps))
        t1 = time.perf_counter()
        trainer_b = Trainer(recipe_b)
        t2 = time.perf_counter()
        build_s = {"A": round(t1 - t0, 2), "B": round(t2 - t1, 2)}
        reads = time_reads(trainer_a, trainer_b, seed, args.warmup, args.steps, per_step, repeats=20)

        print(f"[llm_dataset] {total_steps} steps each, alternating ...", flush=True)
        run = timed_steps(trainer_a, trainer_b, args.warmup, args.steps)
        del trainer_a, trainer_b

        sizes = {"small": (SMALL_ROWS, small), **({"batch": (BATCH_ROWS, batch)} if args.rows > BATCH_ROWS else {}),
                 "big": (args.rows, big), **({"large": (args.large_rows, large)} if large else {})}
        print(f"[llm_dataset] memory: trainer B in fresh processes on {', '.join(str(n) for n, _ in sizes.values())} "
              "rows, alternately ...", flush=True)
        passthrough = ["--model-dir", model_dir, "--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
        mem_rounds: dict[str, list[dict]] = {k: [] for k in sizes}
        for _ in range(args.memory_rounds):
            for key, (_, path) in sizes.items():
                mem_rounds[key].append(spawn_worker(__file__, "memory", [*passthrough, "--dataset", str(path)]))
    wall = time.perf_counter() - t_start

    load_after = load_average()
    med_a, med_b = statistics.median(run["A"]), statistics.median(run["B"])
    spread = ratio_spread(run["A"], run["B"])
    loss_diff = max(abs(ma["loss"] - mb["loss"]) for ma, mb in zip(run["metrics_A"], run["metrics_B"]))
    same_work = all(ma["response_length"] == mb["response_length"] and ma["reward"] == mb["reward"]
                    for ma, mb in zip(run["metrics_A"], run["metrics_B"]))
    step = figure(f"full training step time (median): {args.rows:,}-row dataset + batched reward function vs built-in sampler",
                  med_b, med_a, "s", target_ratio=TARGET_STEP_RATIO)
    step["note"] = (
        f"Trainer.step of A and B alternately in one process (order flipped every step), {args.steps} timed steps each "
        f"after {args.warmup} warm-up steps, {args.threads} torch thread(s). Per-step paired ratios B/A: quartiles "
        f"{spread['paired_q25']}/{spread['paired_median']}/{spread['paired_q75']} (min {spread['paired_min']}, max "
        f"{spread['paired_max']}); bootstrap 95% interval of the ratio of medians {spread['ci95']}. Same work on both "
        f"sides: B reads at every timed step the prompts A's sampler draws ({'checked' if reads['same_prompts'] else 'NOT the same: check failed'}); "
        f"completion lengths and rewards {'identical' if same_work else 'DIFFER'} at every step, largest loss "
        f"difference {loss_diff:.2g}. Reading a step's prompts takes {reads['B']:.2f} ms from the dataset vs {reads['A']:.2f} ms "
        f"from the sampler, against a {med_a * 1000:.0f} ms step: the rest of any difference is machine noise "
        f"(other jobs share this machine; load average {load_before} before, {load_after} after)")
    read = figure(f"prompt reading per step (rows_for_step, {per_step} prompts): {args.rows:,}-row dataset vs built-in sampler",
                  reads["B"], reads["A"], "ms",
                  note=f"informative: median over the timed steps, each read 20 times; the dataset's read is one Arrow gather "
                       f"of the step's rows plus each row's check, {reads['B'] / (med_b * 1000):.2%} of B's median step")
    lj, lp = loads["jsonl"], loads["parquet"]
    load_rows = [
        figure(f"one-off dataset load, {args.rows} rows JSONL: PromptDataset.load + drop_long, vs one built-in step",
               lj["total_s"], med_a, "s",
               note=f"informative, once per run (not per step; the ratio is the load in median steps of A): load (JSON -> Arrow copy) {lj['load_s']} s, drop_long "
                    f"(every prompt chat-formatted and tokenised, as the trainer does; {lj['dropped']} dropped) "
                    f"{lj['drop_long_s']} s; {lj['file_mib']} MiB file, {lj['arrow_mib']} MiB Arrow copy. Trainer "
                    f"construction: A {build_s['A']} s, B {build_s['B']} s (B includes this load)"),
        figure(f"one-off dataset load, {args.rows} rows Parquet: PromptDataset.load + drop_long, vs one built-in step",
               lp["total_s"], med_a, "s",
               note=f"informative: load {lp['load_s']} s, drop_long {lp['drop_long_s']} s; {lp['file_mib']} MiB file, "
                    f"{lp['arrow_mib']} MiB Arrow copy"),
    ]
    least = {k: min(rs, key=lambda r: r["peak_growth_mib"]) for k, rs in mem_rounds.items()}
    ms, mb_ = least["small"], least["big"]

    def grew(r: dict) -> str:
        return (f"peak {r['peak_growth_mib']} MiB (at the end: anonymous {r['anon_growth_mib']}, file-backed "
                f"{r['file_growth_mib']})")

    def index_mib(rows: int) -> float:  # the kept-row numbers and one epoch's order: int64 each (llm.data)
        return 2 * 8 * rows / 2**20

    how = (f"peak RSS growth (VmHWM after clear_refs) over building trainer B and {args.memory_steps} steps in a fresh "
           f"process per size ({args.memory_rounds} per size, sizes alternating; the least of each taken); the "
           "memory-mapped Arrow copy's pages count as file-backed memory once drop_long has read them")
    d_anon = mb_["anon_growth_mib"] - ms["anon_growth_mib"]
    d_released = mb_["anon_growth_after_pool_release_mib"] - ms["anon_growth_after_pool_release_mib"]
    memory = figure(f"peak memory growth with dataset size: trainer B on {args.rows:,} rows minus on {SMALL_ROWS} rows, "
                    "vs the memory-mapped Arrow file", mb_["peak_growth_mib"] - ms["peak_growth_mib"], lj["arrow_mib"], "MiB",
                    target_ratio=TARGET_MEMORY_RATIO)
    memory["note"] = (
        f"{how}. {SMALL_ROWS} rows: {grew(ms)}; {args.rows:,} rows: {grew(mb_)}. Baseline: the {args.rows:,}-row Arrow "
        f"copy ({lj['arrow_mib']} MiB; JSONL {lj['file_mib']} MiB). Anonymous memory grew by {d_anon:.1f} MiB with the "
        f"rows: {index_mib(args.rows):.1f} MiB are the kept-row index and one epoch's order (8 bytes per row each, by "
        "design), the rest is memory the allocators keep from the one-off JSON -> Arrow conversion (datasets' json "
        "builder) and drop_long's batches of 1000 rows: pyarrow's pool holds "
        f"{mb_['arrow_pool_live_mib']} MiB live at the end, and once it returns its unused pages "
        f"(pyarrow.default_memory_pool().release_unused(), called by the benchmark after the steps) the anonymous growth "
        f"with the rows is {d_released:.1f} MiB"
        + (f". Of the peak growth, {least['batch']['peak_growth_mib'] - ms['peak_growth_mib']:.1f} MiB are there already at "
           f"{BATCH_ROWS:,} rows ({grew(least['batch'])}; {BATCH_ROWS:,} is drop_long's batch): a fixed cost of reading "
           "in batches, not a per-row one" if "batch" in least else ""))
    memory_rows = [memory]
    if "large" in least:
        ml, arrow_large = least["large"], loads["large jsonl (load only)"]["arrow_mib"]
        extra = args.large_rows - args.rows
        l_anon = ml["anon_growth_mib"] - mb_["anon_growth_mib"]
        l_released = ml["anon_growth_after_pool_release_mib"] - mb_["anon_growth_after_pool_release_mib"]
        slope = figure(f"peak memory growth beyond {args.rows:,} rows: trainer B on {args.large_rows:,} minus on "
                       f"{args.rows:,} rows, vs the Arrow file's growth", ml["peak_growth_mib"] - mb_["peak_growth_mib"],
                       arrow_large - lj["arrow_mib"], "MiB", target_ratio=TARGET_MEMORY_RATIO)
        slope["note"] = (
            f"measured as in the row above. {args.large_rows:,} rows: {grew(ml)}, Arrow copy {arrow_large} MiB (JSONL "
            f"{loads['large jsonl (load only)']['file_mib']} MiB); {args.rows:,} rows as in the row above. File-backed "
            f"memory grew by {ml['file_growth_mib'] - mb_['file_growth_mib']:.1f} MiB (the larger mapped file), anonymous "
            f"memory by {l_anon:.1f} MiB ({l_anon * 2**20 / extra:.0f} bytes per extra row, 16 of them the row index and "
            f"epoch order: {index_mib(extra):.1f} MiB), {l_released:.1f} MiB after pyarrow's pool returned its unused "
            "pages: beyond the larger mapped file, the extra rows cost their row index and little else, so the "
            "one-off growth of the row above is bounded. Ratio <= 1 would mean no more than the larger mapped file")
        memory_rows.append(slope)
    calls_per_step = sum(run["calls"]) / len(run["calls"])
    calls = figure("reward-function calls per training step (one function)", calls_per_step, 1.0, "calls", target_ratio=1.0,
                   note=f"counted by judge_words itself over B's {args.steps} timed steps: {sum(run['calls'])} calls, "
                        f"{sum(run['items']) / max(1, sum(run['calls'])):.0f} items per call (prompts_per_step x "
                        "num_generations): one call per batch, not per item")
    figures = [step, read, *load_rows, *memory_rows, calls]
    raw = {
        "A: built-in sampler": {"median_step_s": round(med_a, 4), "min_step_s": round(min(run["A"]), 4),
                                "build_s": build_s["A"], "read_ms": round(reads["A"], 3),
                                "mean_response_length": round(statistics.mean(m["response_length"] for m in run["metrics_A"]), 3),
                                "times_s": [round(t, 4) for t in run["A"]]},
        f"B: {args.rows}-row dataset": {"median_step_s": round(med_b, 4), "min_step_s": round(min(run["B"]), 4),
                                        "build_s": build_s["B"], "read_ms": round(reads["B"], 3),
                                        "mean_response_length": round(statistics.mean(m["response_length"] for m in run["metrics_B"]), 3),
                                        "times_s": [round(t, 4) for t in run["B"]]},
        **{f"load: {k}": v for k, v in loads.items()},
        **{f"memory: {sizes[k][0]} rows, round {i}": {x: r[x] for x in r if x != "method"}
           for k, rs in mem_rounds.items() for i, r in enumerate(rs)},
    }
    settings = {"rows": args.rows, "small_rows": SMALL_ROWS, "large_rows": args.large_rows, "steps": args.steps, "warmup": args.warmup,
                "memory_steps": args.memory_steps, "memory_rounds": args.memory_rounds, "threads": args.threads,
                "quick": args.quick, "recipe": "tiny-cpu (save_every 0, heatmap_every 0), seed 0",
                "model": "llm.tiny.build_tiny defaults (make-tiny's sizes: hidden 64, 2 layers), random weights, seed 0",
                "A": "task.dataset unset: the built-in word-constraints sampler and its rule-based judge",
                "B": f"task.dataset = {args.rows}-row JSONL (prompt, length, required, forbidden, ending), "
                     "task.reward_funcs = [benchmarks/bench_llm_dataset.py:judge_words]",
                "memory method": mem_rounds["big"][0]["method"], "paired ratio spread": spread,
                "load_average_before": load_before, "load_average_after": load_after}
    lines = [f"A median step {med_a:.4f} s, B median step {med_b:.4f} s, paired B/A {spread}",
             *(f"load {k} {v}" for k, v in loads.items()), *(f"memory {sizes[k][0]} rows {v}" for k, v in least.items())]
    return finish(NAME, f"LLM training step on a {args.rows:,}-row user dataset vs the built-in prompt sampler (issue 14)",
                  figures, settings, raw, wall, Path(args.out_dir), lines)


if __name__ == "__main__":
    raise SystemExit(main())
