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
from .core.cli_args import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OneLineParser, one_line

# subcommand -> module; the order is the order of `sdpo-sim --help`
COMMANDS = {
    "main": "sdpo_sim.commands.main",
    "run": "sdpo_sim.commands.run",
    "sweep": "sdpo_sim.commands.sweep",
    "figures": "sdpo_sim.commands.figures",
    "claims": "sdpo_sim.commands.claims",
    "promote": "sdpo_sim.commands.promote",
    "testtime": "sdpo_sim.commands.testtime",
    "variants": "sdpo_sim.commands.variants",
    "calibrate": "sdpo_sim.commands.calibrate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sdpo-sim", description="sdpo-lab toy world: exact SDPO vs REINFORCE/GRPO experiments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="what to do (each has its own --help)")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand. Bad input: one line, exit 2. Ctrl-C: one line, exit 130 (a sweep says how many runs it
    kept). An operating-system failure (disk full, ...): one line, exit 1."""
    args = build_parser().parse_args(argv)
    prog = f"sdpo-sim {args.command}"
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        kept = getattr(err, "kept", None)  # sdpo_sim.sweep.Interrupted
        print("interrupted" + ("" if kept is None else f": {kept} runs kept; run the same command again to resume"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # not bad input (that was checked before anything was created): the machine refused
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
