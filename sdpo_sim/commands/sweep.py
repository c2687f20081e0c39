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
    ray = parser.add_argument_group("Ray (with --backend ray; docs/cluster.md)")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="cluster to run on: 'auto' (the one `ray start` runs on this machine) or HOST:PORT of its head; default: start a local one of --workers CPUs")
    ray.add_argument("--ray-cpus-per-run", type=float, default=1.0, metavar="N", help="CPUs each task (one program of runs) asks for (default 1)")
    ray.add_argument("--ray-max-retries", type=int, default=1, metavar="N", help="times a task whose worker or node died is run again before its runs are recorded failed (default 1)")


def backend_of(args: argparse.Namespace):
    """The backend the flags of :func:`add_workers` ask for: a name, or an ``execution.RayBackend`` with its settings.
    Ray settings without ``--backend ray`` are refused (``ValueError``: one line, exit 2)."""
    from ..execution import RayBackend

    if args.backend != "ray":
        given = [flag for flag, value, default in (("--ray-address", args.ray_address, None), ("--ray-cpus-per-run", args.ray_cpus_per_run, 1.0),
                                                   ("--ray-max-retries", args.ray_max_retries, 1)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --backend ray only (the backend is {args.backend!r})")
        return args.backend
    return RayBackend(address=args.ray_address, cpus_per_run=args.ray_cpus_per_run, max_retries=args.ray_max_retries)


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

    result = run_sweep(resolve_spec(args.spec), args.out, workers=args.workers, backend=backend_of(args), progress=args.progress)
    print(result.report())
    return 1 if result.failed else 0
