"""``sdpo-sim variants``: the variants study (issue 16) — VARIANTS.md / VARIANTS.json and its figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from .claims import print_outcome
from .sweep import add_workers, backend_of


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("variants", help="which SDPO variant keeps SDPO's early speed without its entropy collapse: VARIANTS.md + VARIANTS.json (+ figures)",
                              description="Runs the variants sweep (resumable: the same command again reuses finished runs), draws the figures "
                                          "and writes the variants report. Canonical scale: ≤ 15 min on 2 cores; --quick: a tiny world in seconds.")
    p.add_argument("--quick", dest="scale", action="store_const", const="quick", default="canonical", help="tiny smoke scale (numbers are not evidence)")
    p.add_argument("--spec", help="use this spec file instead of the packaged one (block main with the arms of sdpo_sim.variants_study.ARMS)")
    p.add_argument("--out", default=None, help="sweep directory (default outputs/variants[-quick])")
    p.add_argument("--report", default=None, help="where VARIANTS.md/.json go (default: --out); the committed report uses `.`")
    p.add_argument("--figures", default=None, help="where figures go (default: OUT/figures); the committed figures use `figures`")
    p.add_argument("--no-figures", dest="draw_figures", action="store_false", help="skip the figures (report only)")
    add_workers(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..variants_job import run_variants

    out = Path(args.out or ("outputs/variants" if args.scale == "canonical" else f"outputs/variants-{args.scale}"))
    res = run_variants(args.scale, out=out, report_dir=args.report and Path(args.report), figures_dir=args.figures and Path(args.figures),
                       workers=args.workers, progress=args.progress, spec=args.spec, sweep_kwargs={"backend": backend_of(args)},
                       figures=args.draw_figures)
    for v in res["study"].verdicts:
        print(f"{v.arm:11s} {v.verdict:36s} {v.robustness}")
    print_outcome(res, args.workers)
    return 1 if res["sweep"].failed else 0
