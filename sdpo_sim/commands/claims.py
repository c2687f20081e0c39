"""``sdpo-sim claims``: run the canonical experiments and write CLAIMS.md / CLAIMS.json and the figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sweep import add_workers, backend_of


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("claims", help="measure every claim of the reference study: CLAIMS.md + CLAIMS.json (+ figures)",
                              description="Runs the canonical claims sweep (resumable), draws the figures and writes the claims report. "
                                          "Canonical scale: ~80 runs, ≤ 15 min on 2 cores; --quick: a tiny world in seconds.")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick", help="tiny smoke scale (numbers are not evidence)")
    scale.add_argument("--scale", choices=["canonical", "main", "quick"],
                       help="canonical (the committed report, default), main (the small sweep of `sdpo-sim main`) or quick")
    p.add_argument("--spec", help="use this spec file instead of the packaged one (same block names)")
    p.add_argument("--out", default=None, help="sweep directory (default outputs/claims[-SCALE])")
    p.add_argument("--report", default=None, help="where CLAIMS.md/.json go (default: --out); the committed report uses `.`")
    p.add_argument("--figures", default=None, help="where figures go (default: OUT/figures); the committed figures use `figures`")
    p.add_argument("--no-figures", dest="draw_figures", action="store_false", help="skip the figures (report only)")
    p.add_argument("--record-walltime", default=None, metavar="JSON", help="also write the wall time here (benchmarks/results/claims_walltime.json)")
    add_workers(p)
    p.set_defaults(func=main, scale="canonical")


def main(args: argparse.Namespace) -> int:
    from ..claims.job import run_claims
    from ..core.io import atomic_write_text, check_output_file

    if args.record_walltime:
        check_output_file(args.record_walltime, "--record-walltime file")
    out = Path(args.out or ("outputs/claims" if args.scale == "canonical" else f"outputs/claims-{args.scale}"))
    res = run_claims(args.scale, out=out, report_dir=args.report and Path(args.report), figures_dir=args.figures and Path(args.figures),
                     workers=args.workers, progress=args.progress, spec=args.spec, sweep_kwargs={"backend": backend_of(args)},
                     figures=args.draw_figures)
    for c in res["claims"]:
        print(f"{c.id:4s} {c.verdict:36s} {c.statement}")
    print_outcome(res, args.workers)
    if args.record_walltime:
        atomic_write_text(args.record_walltime, json.dumps(walltime_record(args, res), indent=1) + "\n")
    return 1 if res["sweep"].failed else 0


CANONICAL_BUDGET_S = 900.0  # the canonical claims report's budget: 15 minutes on 2 cores


def walltime_record(args: argparse.Namespace, res: dict) -> dict:
    """The wall time as a benchmark results file (``benchmarks/_common.py``'s format: one figure row against the
    canonical budget, which ``benchmarks/run_all.py`` puts in RESULTS.md; other scales have no target)."""
    import datetime as dt
    import os
    import platform

    wall, counts = round(res["wall_time_s"], 1), res["sweep"].counts
    budget = CANONICAL_BUDGET_S if args.scale == "canonical" else None
    tuned = (res["sweep"].tuning or {}).get("runs", 0)
    runs = f"{counts['total']} runs" + (f" + {tuned} tuning runs" if tuned else "")
    figure = {"figure": f"claims report wall time ({args.scale}: {runs})", "value": wall,
              "baseline": budget, "unit": "s", "ratio": None if budget is None else round(wall / budget, 3),
              "target": None if budget is None else "<= 1", "met": None if budget is None else wall <= budget,
              "note": f"{counts['ok']} runs ran in this invocation, {counts['skipped']} were already done (resumed); "
                      f"{args.workers} worker(s) on {os.cpu_count()} cores"}
    settings = {"command": "sdpo-sim claims" + ("" if args.scale == "canonical" else f" --scale {args.scale}") + f" --workers {args.workers}",
                "runs": counts["total"], "ran": counts["ok"], "skipped_already_done": counts["skipped"], "tuning_runs": tuned,
                "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    return {"name": Path(args.record_walltime).stem, "title": "The claims report: wall time of `sdpo-sim claims`", "settings": settings,
            "figures": [figure], "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "wall_time_s": wall}


def print_outcome(res: dict, workers: int) -> None:
    """The lines a report job (claims, variants) prints after its verdicts: where the report and figures went, the
    wall time, and the sweep's failures."""
    print(f"report: {res['markdown']}  {res['json']}")
    if res["figures"]:
        print(f"figures: {next(iter(res['figures'].values()))[0].parent}/ ({', '.join(sorted(res['figures']))})")
    print(f"wall time: {res['wall_time_s']:.0f} s with {workers} worker(s)")
    if res["sweep"].failed:
        print(res["sweep"].report())
