"""``sdpo-llm`` / ``python -m llm``: train, plan, make-tiny, proof.

- ``sdpo-llm train --recipe R [--resume] [--set section.field=value ...]`` (also under ``accelerate launch``);
- ``sdpo-llm plan --recipe R --gpus-per-node N --nodes M --gpu-memory-gb G``: per-GPU memory plan, no weights loaded;
- ``sdpo-llm make-tiny [--out DIR]``: build (and pretrain) the tiny CPU model (``llm.tiny``);
- ``sdpo-llm proof``: the proof-that-it-learns script (``llm.proof``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

DISPATCH = {"make-tiny": "llm.tiny", "proof": "llm.proof"}  # subcommands owned by other modules: main(argv) -> int


def _recipe(args):
    from .recipe import load_recipe, parse_override, resolve_recipe_path

    return load_recipe(resolve_recipe_path(args.recipe), dict(parse_override(s) for s in args.set))


def cmd_train(args) -> int:
    from .trainer import NonFiniteLossError, Trainer

    recipe = _recipe(args)  # validated before any model loads
    try:
        rows = Trainer(recipe).train(resume=args.resume)
    except NonFiniteLossError as err:
        print(f"sdpo-llm train: stopped: {err}", file=sys.stderr)
        return 3
    if rows and int(os.environ.get("RANK", "0")) == 0:
        last = rows[-1]
        print(f"done: step {last['step']}  reward {last['reward']:.3f}  entropy {last['entropy']:.3f}  "
              f"metrics in {recipe.training.output_dir}/metrics.jsonl")
    return 0


def cmd_plan(args) -> int:
    from .memory_plan import format_plan, memory_plan

    recipe = _recipe(args)
    plan = memory_plan(recipe, gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_memory_gb=args.gpu_memory_gb,
                       strategy=args.strategy, micro_batch=args.micro_batch)
    print(format_plan(plan))
    return 0 if plan["fits"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo-llm", description="sdpo-lab LLM path: SDPO, GRPO, REINFORCE and hybrid on transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, fn, help_ in (("train", cmd_train, "train a recipe (works under accelerate launch)"),
                            ("plan", cmd_plan, "print the per-GPU memory plan of a recipe without loading weights")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--recipe", required=True, help="recipe YAML path or shipped name (tiny-cpu, qwen3-8b)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a recipe field")
        p.set_defaults(func=fn)
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in training.output_dir")
        else:
            p.add_argument("--gpus-per-node", type=int, required=True)
            p.add_argument("--nodes", type=int, default=1)
            p.add_argument("--gpu-memory-gb", type=float, required=True)
            p.add_argument("--strategy", default="fsdp2", help="fsdp2 | zero3 | ddp")
            p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per forward (default: the recipe's share)")
    for name in DISPATCH:
        sub.add_parser(name, help=f"see `sdpo-llm {name} --help`", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DISPATCH:
        return int(importlib.import_module(DISPATCH[argv[0]]).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"sdpo-llm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
