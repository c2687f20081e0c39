"""``sdpo-sim figures DIR [DIR ...]``: seaborn figures (PNG + SVG) from one or more sweep directories."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ..plots import FIGURES

    p = subparsers.add_parser("figures", help="draw the figures of finished sweeps into figures/ (PNG + SVG)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep output directories (tables are concatenated)")
    p.add_argument("--out", default="figures", help="where to write (default: figures/)")
    p.add_argument("--only", nargs="+", choices=list(FIGURES), help="draw only these figures")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..plots import FIGURES, write_figures
    from ..tables import load_tables

    written = write_figures([load_tables(d) for d in args.dirs], args.out, names=args.only)
    for name in args.only or FIGURES:
        print(f"{name:20s} {' '.join(str(p) for p in written[name]) if name in written else 'skipped: the sweep lacks the variation it shows'}")
    return 0
