"""``sdpo-sim calibrate --credit-truth FILE [--llm-grid DIR] --out DIR``: the toy side of the calibration study
(docs/calibration.md): fit the self-knowledge ρ per feedback channel to the LLM's measured credit correlations and,
with an LLM grid, compare the two worlds' rankings of the grid."""

from __future__ import annotations

import argparse

from ..calibration_study import SCALES, run_study


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit the toy's self-knowledge ρ per channel to the LLM's credit correlations; predicted vs observed",
                              description="Reads sdpo-llm credit-truth's credit_truth.json (and an sdpo-llm grid directory) — files, the toy "
                                          "world never imports the LLM code — and writes calibration.json, the report page and figures.")
    p.add_argument("--credit-truth", required=True, metavar="FILE", help="credit_truth.json written by `sdpo-llm credit-truth`")
    p.add_argument("--llm-grid", default=None, metavar="DIR", help="an `sdpo-llm grid` output directory (studies/calibration/grid.yaml) to predict")
    p.add_argument("--out", required=True, help="output directory (calibration.json, curves.csv, transfer tables)")
    p.add_argument("--scale", default="canonical", choices=list(SCALES), help="toy sizes: canonical (CALIBRATION.md), medium, small (tests)")
    p.add_argument("--report", default=None, metavar="FILE.md", help="report page, its JSON twin beside it (default OUT/CALIBRATION.md)")
    p.add_argument("--figures", default=None, metavar="DIR", help="figure directory (default OUT/figures)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    res = run_study(args.credit_truth, args.out, llm_grid=args.llm_grid, scale=args.scale, report=args.report, figures=args.figures,
                    progress=args.progress, command="sdpo-sim calibrate " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in (("credit_truth", args.credit_truth), ("llm_grid", args.llm_grid),
                                                                   ("scale", args.scale)) if v is not None))
    for f in res["fit"]["per_channel"]:
        rho = f"{f['rho_hat']:.2f}" if f["status"] == "ok" else f["status"]
        print(f"  {f['channel']:<14} step {f['step']:<3} {f['truth']:<15} LLM r {f['llm_r'] if f['llm_r'] is None else round(f['llm_r'], 3)!s:>7}  ρ̂ {rho}")
    for k in res.get("transfer", {}).get("kendall", []):
        print(f"  Kendall τ {k['metric']:<13} {k['tau']:+.2f} [{k['ci_lo']:+.2f}, {k['ci_hi']:+.2f}] over {k['points']} points")
    print(f"wrote {args.out}/calibration.json and the report")
    return 0
