"""``sdpo-sim main`` (what ``./lab run`` runs): a small sweep, its figures and the claims report on defaults."""

from __future__ import annotations

import argparse

from .sweep import add_workers, backend_of


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("main", help="the main job: small claims sweep + figures + claims report under outputs/main/ (≤ 5 min)")
    p.add_argument("--out", default="outputs/main", help="output directory (default outputs/main)")
    add_workers(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..claims.job import run_claims
    from ..core.io import check_output_dir

    out = check_output_dir(args.out, "output directory")  # before the banner: a refused run prints only its error
    print(f"sdpo-sim main: the claims experiments at small scale (spec sdpo_sim/specs/main.yaml) into {out}/ ...", flush=True)
    res = run_claims("main", out=out, workers=args.workers, progress=args.progress, command="sdpo-sim main", sweep_kwargs={"backend": backend_of(args)})
    print()
    for c in res["claims"]:
        print(f"  {c.id:4s} {c.verdict:36s} {c.statement}")
    print(f"\nDone in {res['wall_time_s']:.0f} s. Outputs:")
    print(f"  claims report   {res['markdown']}  (and {res['json'].name})")
    print(f"  figures         {out / 'figures'}/  ({', '.join(sorted(res['figures']))})")
    print(f"  tables          {out}/history.parquet|csv (run × seed × step), summary.parquet|csv (run), seeds.parquet|csv (run × seed)")
    print(f"  learning rates  {out}/tuning.json")
    print("  canonical numbers (10 seeds × 8 tasks, 300 steps): CLAIMS.md; how to read all this: docs/experiments.md")
    if res["sweep"].failed:
        print(res["sweep"].report())
        return 1
    return 0
