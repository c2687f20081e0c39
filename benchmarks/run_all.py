"""Run every benchmark in ``benchmarks/`` and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py                 # run every bench_*.py, then write RESULTS.md
    python benchmarks/run_all.py --only fused_loss
    python benchmarks/run_all.py --no-run        # only re-render RESULTS.md from benchmarks/results/*.json

Each ``bench_<name>.py`` writes ``benchmarks/results/<name>.json`` (format in ``_common.py``).
RESULTS.md also picks up every other ``*.json`` in ``benchmarks/results/`` (files written by other
tools, e.g. the toy-world throughput or the claims report's wall time), marked with their own date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, ROOT  # noqa: E402

from sdpo_sim.core.io import atomic_write_text  # noqa: E402

BENCH_DIR = ROOT / "benchmarks"


# ------------------------------------------------------------------------------------------- facts
def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, RAM (GiB), OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "os": platform.platform()}


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("sdpo-lab", "torch", "transformers", "trl", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        out["git commit"] = commit + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["git commit"] = None
    return out


# ------------------------------------------------------------------------------------------- running
def discover(only: Optional[list[str]] = None) -> list[Path]:
    """``benchmarks/bench_*.py``, optionally only the named ones (``fused_loss`` or ``bench_fused_loss``)."""
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if only:
        names = {n.removeprefix("bench_").removesuffix(".py") for n in only}
        unknown = names - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise ValueError(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}; "
                             f"available: {', '.join(s.stem.removeprefix('bench_') for s in scripts)}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    return scripts


def run_scripts(scripts: list[Path]) -> dict[str, dict[str, Any]]:
    """Run each script in its own process (output streamed); returns name → {returncode, seconds}."""
    log = {}
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script)], cwd=ROOT).returncode
        log[name] = {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[bench] {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {log[name]['seconds']} s", flush=True)
    return log


# ------------------------------------------------------------------------------------------- rendering
def collect(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every ``*.json`` results file, sorted by name; unreadable files become an ``error`` entry."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
        except (OSError, ValueError) as err:
            data = {"error": f"unreadable: {err}"}
        data.setdefault("name", path.stem)
        out.append(data)
    return out


def _num(x: Any, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    s = f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{s} {unit}".strip()


def verdict(fig: dict[str, Any]) -> str:
    """'met', 'missed by …' (how far the ratio is from its target), or '–' without a target."""
    target, ratio, met = fig.get("target"), fig.get("ratio"), fig.get("met")
    if not target:
        return "–"
    if ratio is None or met is None:
        return "not measured"
    if met:
        return "met"
    try:
        op, bound = target.split()
        bound = float(bound)
        factor = ratio / bound if op == "<=" else bound / ratio
        return f"**missed** by {factor:.2f}×"
    except (ValueError, ZeroDivisionError):
        return "**missed**"


def render(results: list[dict[str, Any]], machine: dict, vers: dict, run_log: dict, started: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python benchmarks/run_all.py` (or `./lab bench`) on {started}. Every ratio compares "
        "our figure with the baseline/peer **measured in the same run** (value ÷ baseline: lower is better for "
        "memory and time, higher for throughput).",
        "",
        "## Machine and versions",
        "",
        "| | |", "|---|---|",
        f"| CPU | {machine.get('cpu')} |",
        f"| logical cores | {machine.get('cores')} |",
        f"| RAM | {machine.get('ram_gib')} GiB |",
        f"| OS | {machine.get('os')} |",
    ]
    lines += [f"| {k} | {v if v is not None else 'not installed'} |" for k, v in vers.items()]
    lines += ["", "Other jobs may share this machine; the load average at the start and end of each benchmark "
              "is in its settings.", "", "## Summary", "",
              "| benchmark | figure | ours | baseline | ratio | target | verdict |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for fig in res.get("figures") or []:
            unit = fig.get("unit", "")
            lines.append(
                f"| {res['name']} | {fig.get('figure', '?')} | {_num(fig.get('value'), unit)} | "
                f"{_num(fig.get('baseline'), unit)} | {_num(fig.get('ratio'))} | {fig.get('target') or '–'} | "
                f"{verdict(fig)} |"
            )
    missed = [(r, f) for r in results for f in r.get("figures") or [] if f.get("met") is False]
    if missed:
        lines += ["", "### Missed targets", ""]
        for res, fig in missed:
            why = fig.get("note") or "no explanation recorded by the benchmark"
            lines.append(f"- **{res['name']} / {fig['figure']}**: ratio {_num(fig.get('ratio'))} vs target "
                         f"{fig['target']} ({verdict(fig).replace('**', '')}). Why: {why}")
    lines += ["", "## Details", ""]
    for res in results:
        name = res["name"]
        lines += [f"### {name}: {res.get('title', '')}".rstrip(": "), ""]
        if "error" in res:
            lines += [f"Results file {res['error']}.", ""]
            continue
        run = run_log.get(name)
        if run:
            status = "ok" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']}): the figures below are from an earlier run"
            lines.append(f"Ran in this run: {status}, {run['seconds']} s.")
        else:
            lines.append(f"Not run by this invocation; results file from {res.get('created', 'an unknown date')}.")
        if res.get("wall_time_s") is not None:
            lines.append(f"Wall time of the benchmark: {res['wall_time_s']} s.")
        lines.append("")
        if not res.get("figures"):
            keys = [k for k in res if k not in ("name", "title", "created", "wall_time_s")]
            lines += [f"No figures in this file (it holds: {', '.join(keys) or 'nothing'}).", ""]
        for fig in res.get("figures") or []:
            if fig.get("note"):
                lines.append(f"- {fig.get('figure')}: {fig['note']}")
        settings = res.get("settings") or {}
        if settings:
            lines += ["", "Settings:", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in settings.items()]
        raw = res.get("raw")
        if isinstance(raw, dict) and raw and all(isinstance(v, dict) for v in raw.values()):
            cols = [c for c in dict.fromkeys(k for v in raw.values() for k in v) if c not in ("variant", "times_s")]
            lines += ["", "Measurements:", "", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for variant, row in raw.items():
                lines.append(f"| {variant} | " + " | ".join(_num(row.get(c)) for c in cols) + " |")
        lines.append("")
    failed = [n for n, r in run_log.items() if r["returncode"] != 0]
    if failed:
        lines += ["## Failures in this run", ""] + [f"- {n}: exit {run_log[n]['returncode']}" for n in failed] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Run every benchmark and write benchmarks/RESULTS.md.")
    p.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all)")
    p.add_argument("--no-run", action="store_true", help="do not run anything; re-render RESULTS.md")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"))
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        scripts = [] if args.no_run else discover(args.only)
    except ValueError as err:
        p.error(str(err))
    run_log = run_scripts(scripts)
    text = render(collect(Path(args.results_dir)), machine_info(), versions(), run_log, started)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 1 if any(r["returncode"] for r in run_log.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
