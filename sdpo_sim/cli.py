"""``sdpo-sim`` / ``python -m sdpo_sim``: one entry point, one module per subcommand.

Each module in :mod:`sdpo_sim.commands` exposes ``add_parser(subparsers)``, which registers its
subcommand and sets ``func`` (called with the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__

# subcommand -> module; the order is the order of `sdpo-sim --help`
COMMANDS = {
    "main": "sdpo_sim.commands.main",
    "run": "sdpo_sim.commands.run",
    "sweep": "sdpo_sim.commands.sweep",
    "figures": "sdpo_sim.commands.figures",
    "claims": "sdpo_sim.commands.claims",
    "promote": "sdpo_sim.commands.promote",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo-sim", description="sdpo-lab toy world: exact SDPO vs REINFORCE/GRPO experiments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"sdpo-sim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
