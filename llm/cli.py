"""``sdpo-llm`` / ``python -m llm``: train, plan, make-tiny, proof.

- ``sdpo-llm train --recipe R [--resume] [--set section.field=value ...] [--section.field value ...]`` (also under
  ``accelerate launch``);
- ``sdpo-llm plan --recipe R --gpus-per-node N --nodes M --gpu-memory-gb G``: per-GPU memory plan, no weights loaded;
- ``sdpo-llm make-tiny [--out DIR]``: build (and pretrain) the tiny CPU model (``llm.make_tiny``);
- ``sdpo-llm proof``: the proof-that-it-learns script (``llm.proof``);
- ``sdpo-llm credit-truth --recipe R --out DIR``: feedback credit per channel vs ground-truth credit (``llm.credit_truth``);
- ``sdpo-llm testtime --out DIR``: test-time discovery on hard prompts, best-of-k vs SDPO (``llm.testtime``);
- ``sdpo-llm grid SPEC --out DIR [--backend ray]``: a grid of recipes, one run (Ray task) per point, resumable (``llm.grid``).

Every recipe field is reachable two ways, in ``train`` and ``plan`` alike: its own flag (``--training.steps 3``,
``--method.alpha 0.5``, ``--model.lora.r 8``; help from the field's metadata) and ``--set training.steps=3`` (YAML
value, repeatable). A field given twice (by both, or by two ``--set``) is refused.

Bad input exits 2 with one line on stderr (``sdpo-llm COMMAND: error: ...``) and no traceback; Ctrl-C
exits 130 with one line (for ``train``: the step reached and how to resume).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
from typing import Optional, Sequence

from sdpo_sim.core.cli_args import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    OneLineParser,
    one_line,
)
from sdpo_sim.core.config_fields import (
    add_field_flags,
    add_set_flag,
    given_fields,
    merge_overrides,
)

from .recipe import Recipe, load_recipe, resolve_recipe_path

# subcommands owned by other modules, imported when run (they import torch): main(argv) -> int
DISPATCH = {"make-tiny": "llm.make_tiny", "proof": "llm.proof", "testtime": "llm.testtime", "grid": "llm.grid"}


def _interrupted_train(trainer) -> str:
    """The one line printed when ``sdpo-llm train`` is interrupted: the step reached and how to resume."""
    from .checkpoint import latest_checkpoint

    out, done = trainer.training.output_dir, trainer.steps_done
    latest = latest_checkpoint(out)
    if latest is None:
        return (f"sdpo-llm train: interrupted at step {done} of {trainer.training.steps}; no checkpoint saved yet in {out} "
                "(training.save_every sets how often), so --resume would start from step 0")
    return (f"sdpo-llm train: interrupted at step {done} of {trainer.training.steps}; run the same command with --resume to "
            f"continue from the last checkpoint ({latest})")


def recipe_from_args(args) -> Recipe:
    """The recipe of ``--recipe`` with the fields given by their flags and by ``--set`` (each at most once)."""
    overrides = merge_overrides(given_fields(args, args.field_dests), args.set)
    return load_recipe(resolve_recipe_path(args.recipe), overrides)


def cmd_train(args) -> int:
    from .trainer import NonFiniteLossError, Trainer

    recipe = recipe_from_args(args)  # validated before any model loads
    trainer = Trainer(recipe)  # checks the output directory and the dtype before loading weights
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        rows = trainer.train(resume=args.resume)
    except NonFiniteLossError as err:
        print(f"sdpo-llm train: stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if main_process:
            print(_interrupted_train(trainer), file=sys.stderr)
        return EXIT_INTERRUPTED
    if rows and main_process:
        last = rows[-1]
        print(f"done: step {last['step']}  reward {last['reward']:.3f}  entropy {last['entropy']:.3f}  "
              f"metrics in {recipe.training.output_dir}/metrics.jsonl")
    return 0


def cmd_plan(args) -> int:
    from .memory_plan import format_plan, memory_plan

    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch={args.micro_batch} must be a positive integer (omit it for the recipe's share)")
    if not math.isfinite(args.gpu_memory_gb):
        raise ValueError(f"--gpu-memory-gb={args.gpu_memory_gb} must be a finite number of GiB > 0")
    recipe = recipe_from_args(args)
    plan = memory_plan(recipe, gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_memory_gb=args.gpu_memory_gb,
                       strategy=args.strategy, micro_batch=args.micro_batch, device=args.device)
    print(format_plan(plan))
    return 0 if plan["fits"] else 1


def cmd_credit_truth(args) -> int:
    from .credit_truth import credit_truth, format_rows, parse_channels, parse_steps

    channels, steps = parse_channels(args.channels), parse_steps(args.steps)  # validated before any model loads
    payload = credit_truth(recipe_from_args(args), args.out, channels=channels, steps=steps, n_continuations=args.n_continuations,
                           vocab_sample=args.vocab_sample, n_boot=args.bootstrap, seed=args.seed)
    print(format_rows(payload["rows"]))
    print(f"written: {args.out}/credit_truth.csv, credit_truth.json, tokens.csv, heatmap-<channel>.html")
    return 0


# the command's own flags in its usage line (the recipe fields' flags are summed up as --SECTION.FIELD VALUE)
USAGE = {"train": "[--resume]", "plan": "--gpus-per-node N [--nodes M] --gpu-memory-gb G [--strategy S] [--micro-batch B] [--device D]",
         "credit-truth": "--out DIR [--channels C,...] [--steps S,...] [--n-continuations N] [--vocab-sample K] [--bootstrap B] [--seed S]"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sdpo-llm", description="sdpo-lab LLM path: SDPO, GRPO, REINFORCE and hybrid on transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="what to do (each has its own --help)")
    for name, fn, help_ in (("train", cmd_train, "train a recipe (works under accelerate launch)"),
                            ("plan", cmd_plan, "print the per-GPU memory plan of a recipe without loading weights"),
                            ("credit-truth", cmd_credit_truth, "measure the self-teacher's feedback credit per channel against "
                             "ground-truth credit (counterfactual c_t, Monte Carlo A_t)")):
        p = sub.add_parser(name, help=help_, usage=f"%(prog)s [-h] --recipe RECIPE {USAGE[name]} [--set SECTION.FIELD=VALUE] "
                           "[--SECTION.FIELD VALUE ...]", description=f"{help_[0].upper()}{help_[1:]}. Any recipe field can be set by its "
                           "own flag (--training.steps 3) or by --set (--set training.steps=3); a field may be given once.")
        p.add_argument("--recipe", required=True, help="recipe YAML path or shipped name (tiny-cpu, qwen3-8b)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in training.output_dir")
        elif name == "credit-truth":  # llm/credit_truth.py
            p.add_argument("--out", required=True, help="output directory (credit_truth.csv/.json, tokens.csv, heat-maps)")
            p.add_argument("--channels", default="binary,ordinal,continuous,critique,demonstration",
                           help="comma-separated feedback channels (default: all five)")
            p.add_argument("--steps", default="0", help="training steps to measure at, comma-separated (default 0: the loaded weights)")
            p.add_argument("--n-continuations", type=int, default=16, metavar="N", help="Monte Carlo continuations per prefix (>= 2)")
            p.add_argument("--vocab-sample", type=int, default=None, metavar="K",
                           help="substitute ids per token for c_t, drawn uniformly (default: the whole vocabulary)")
            p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples of the completions")
            p.add_argument("--seed", type=int, default=0, help="seed of the continuations, the vocabulary sample and the bootstrap")
        else:
            p.add_argument("--gpus-per-node", type=int, required=True, metavar="N", help="GPUs on each node")
            p.add_argument("--nodes", type=int, default=1, metavar="M", help="number of nodes (default 1)")
            p.add_argument("--gpu-memory-gb", type=float, required=True, metavar="G", help="memory of one GPU, GiB")
            p.add_argument("--strategy", default="fsdp2", metavar="S", help="fsdp2 | zero3 | ddp | single (one process; default fsdp2)")
            p.add_argument("--micro-batch", type=int, default=None, metavar="B",
                           help="sequences per GPU per forward (default: the recipe's share)")
            p.add_argument("--device", default="cuda", metavar="D",
                           help="cuda | cpu (cpu: one process, --strategy single, no CUDA allowance; default cuda)")
        add_set_flag(p, key_form="section.field", example="training.steps=3")
        p.set_defaults(func=fn, field_dests=add_field_flags(p.add_argument_group("recipe fields (section.field)"), Recipe))
    for name in DISPATCH:
        sub.add_parser(name, help=f"see `sdpo-llm {name} --help`", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in DISPATCH:
        command, run = argv[0], lambda: importlib.import_module(DISPATCH[argv[0]]).main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        return int(run() or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"sdpo-llm {command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # train reports its own step; this is everything else
        print(f"sdpo-llm {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
