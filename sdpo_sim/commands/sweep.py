"""``sdpo-sim sweep SPEC.yaml --out DIR``: run a grid of toy-world configurations (resumable)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type of a count flag (``--workers``, ``--top``): an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_workers(parser: argparse.ArgumentParser) -> None:
    """``--workers`` and ``--backend``, shared by every command that runs a sweep."""
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2; 1 runs in this process)")
    parser.add_argument("--backend", default="process", choices=["process", "serial", "ray"], help="where runs execute (ray needs the `ray` extra)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a sweep spec (grid over config fields) into tidy Parquet/CSV tables",
                              description="Run every configuration of a YAML sweep spec (docs/experiments.md). Restarting the same "
                                          "command skips finished runs; failed runs are recorded and retried on restart.")
    p.add_argument("spec", help="sweep spec (YAML), or the name of a packaged spec: claims | main | quick")
    p.add_argument("--out", required=True, help="output directory (created; resumed if it holds this spec's runs)")
    add_workers(p)
    p.set_defaults(func=main)


def resolve_spec(name: str):
    """A spec path, or a packaged spec name (``claims``, ``main``, ``quick``)."""
    from pathlib import Path

    from ..claims import spec_path
    from ..sweep_spec import PACKAGED_SPECS

    if not Path(name).exists() and name in PACKAGED_SPECS:
        return spec_path("canonical" if name == "claims" else name)
    return Path(name)


def main(args: argparse.Namespace) -> int:
    from ..sweep import run_sweep

    result = run_sweep(resolve_spec(args.spec), args.out, workers=args.workers, backend=args.backend, progress=args.progress)
    print(result.report())
    return 1 if result.failed else 0
