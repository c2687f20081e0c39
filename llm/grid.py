"""``sdpo-llm grid SPEC.yaml --out DIR``: a grid of LLM recipes, one run per point, serially or as Ray tasks
(each asking for ``--gpus-per-run`` GPUs), resumable, summarised into one tidy table and a figure.

A grid spec (YAML)::

    name: lr-x-alpha                 # optional
    base: tiny-cpu                   # a recipe file (relative to the spec) or a shipped name, or instead:
    recipes: [a.yaml, b.yaml]        #   several recipe files, e.g. ones `sdpo-sim promote --out` wrote
    set: {training.steps: 2}         # dotted overrides (as `sdpo-llm train --set`) applied to every point
    grid:                            # Cartesian product of dotted overrides
      training.learning_rate: [1.0e-3, 3.0e-3]
    points:                          # optional list of override mappings, each crossed with the grid
      - {method.name: sdpo}
      - {method.name: grpo}

Each point is one validated recipe; its run id is ``sha1(json(recipe without training.output_dir))[:12]``, so a
restarted grid skips what finished. Layout of ``DIR``::

    DIR/grid.yaml              the spec this directory belongs to
    DIR/runs/<run_id>/         the run's training.output_dir (recipe.yaml, metrics.jsonl, summary.json, final-model/)
    DIR/runs/<run_id>.log      its log (each attempt: where it ran, its output, how it ended)
    DIR/runs/<run_id>.json     its record (status ok|failed, recipe, overrides, metrics or error); written last, atomically
    DIR/grid.csv               one row per point: final reward, eval reward, entropy, wall time, the overrides
    DIR/grid.svg               final training reward and eval reward per point, one colour per method

On Ray a task whose worker dies is retried ``max_retries`` times and then recorded failed with Ray's reason; Ctrl-C
cancels the outstanding tasks (and stops a cluster this process started). ``llm`` imports only ``sdpo_sim.core``,
so this is a runner of its own, not ``sdpo_sim.execution``'s (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from sdpo_sim.core.cli_args import OneLineParser
from sdpo_sim.core.io import atomic_write, atomic_write_text, check_output_dir, read_yaml_file, remove_stale_temporaries

from .recipe import Recipe, load_recipe, resolve_recipe_path
from .trainer import Trainer

PROG = "sdpo-llm grid"
SPEC_KEYS = ("name", "description", "base", "recipes", "set", "grid", "points")
BACKENDS = ("serial", "ray")
METHOD_ORDER = ("reinforce", "grpo", "sdpo", "hybrid")  # seaborn "colorblind" colours in this order (as the toy figures)
STOP_GRACE_S = 3.0  # Ctrl-C on Ray: how long cancelled tasks may take to unwind before their workers are killed


@dataclass
class Point:
    """One run of the grid: its id, the recipe it trains (``training.output_dir`` set to ``DIR/runs/<run_id>``),
    where the recipe came from and the overrides that made it."""

    run_id: str
    recipe: dict
    source: str
    overrides: dict


def run_id(recipe: dict) -> str:
    """``sha1(json(recipe with training.output_dir removed, sorted keys))[:12]``: where a run writes is not what it is."""
    stripped = {**recipe, "training": {k: v for k, v in recipe["training"].items() if k != "output_dir"}}
    return hashlib.sha1(json.dumps(stripped, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _overrides(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and "." in k for k in value):
        raise ValueError(f"{where} must be a mapping of dotted recipe fields (section.field) to values, got {value!r}")
    return dict(value)


def plan(spec_path: Path, out: Path) -> list[Point]:
    """Every point of the spec, validated as recipes before anything is created; duplicates (equal recipes) once."""
    spec = read_yaml_file(spec_path, "grid spec", "give a grid spec file (YAML; see `sdpo-llm grid --help`)")
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_path}: a grid spec must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{spec_path}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SPEC_KEYS)}")
    if ("base" in spec) == ("recipes" in spec):
        raise ValueError(f"{spec_path}: give exactly one of base (a recipe) or recipes (a list of recipe files)")
    sources = [spec["base"]] if "base" in spec else spec["recipes"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise ValueError(f"{spec_path}: recipes must be a non-empty list of recipe file paths")
    common = _overrides(spec.get("set"), f"{spec_path}: set")
    grid = _overrides(spec.get("grid"), f"{spec_path}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{spec_path}: grid.{key} must be a non-empty list of values, got {values!r}")
    points = spec.get("points", [{}])
    if not isinstance(points, list) or not points:
        raise ValueError(f"{spec_path}: points must be a non-empty list of override mappings")
    points = [_overrides(p, f"{spec_path}: points[{i}]") for i, p in enumerate(points)]
    planned: dict[str, Point] = {}
    for source in sources:
        path = resolve_recipe_path(source if Path(source).is_absolute() or not (spec_path.parent / source).is_file() else spec_path.parent / source)
        for point in points:
            for values in itertools.product(*grid.values()):
                overrides = {**common, **point, **dict(zip(grid, values))}
                try:
                    recipe = load_recipe(path, {**overrides, "training.output_dir": "."}).to_dict()
                except ValueError as err:
                    raise ValueError(f"{spec_path}: point {overrides} of recipe {source}: {err}") from None
                if Path(recipe["model"]["path"]).exists():  # a local model: absolute, as Ray workers start elsewhere
                    recipe["model"]["path"] = str(Path(recipe["model"]["path"]).resolve())
                rid = run_id(recipe)
                recipe["training"]["output_dir"] = str(out / "runs" / rid)
                planned.setdefault(rid, Point(rid, recipe, str(source), overrides))
    return list(planned.values())


def record_path(out: Path, rid: str) -> Path:
    return out / "runs" / f"{rid}.json"


def is_done(out: Path, rid: str) -> bool:
    path = record_path(out, rid)
    return path.is_file() and json.loads(path.read_text()).get("status") == "ok"


class _Tee:
    """A text stream writing to one open log file (``print`` and ``logging`` of a run go to its log)."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, text: str) -> int:
        self.f.write(text)
        self.f.flush()
        return len(text)

    def flush(self) -> None:
        self.f.flush()


def _log_line(text: str) -> str:
    return f"[{datetime.now(timezone.utc).isoformat(timespec='seconds')}] {text}\n"


def run_point(point: Point, out: str, where: str = "this process") -> dict:
    """Train one point (a fresh start: what a killed attempt left in its run directory is removed) and write its
    record atomically; never raises for a failed run. Returns ``{"run_id", "status", "error"}``."""
    out_dir = Path(out)
    if is_done(out_dir, point.run_id):
        return {"run_id": point.run_id, "status": "ok", "error": None}
    run_dir = Path(point.recipe["training"]["output_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    record = {"run_id": point.run_id, "source": point.source, "overrides": point.overrides, "recipe": point.recipe}
    start = time.perf_counter()
    with open(out_dir / "runs" / f"{point.run_id}.log", "a", encoding="utf-8") as log:
        log.write(_log_line(f"attempt in {where} host {socket.gethostname()} pid {os.getpid()}"))
        log.flush()
        handler = logging.StreamHandler(_Tee(log))
        logging.getLogger().addHandler(handler)
        try:
            with contextlib.redirect_stdout(_Tee(log)), contextlib.redirect_stderr(_Tee(log)):
                rows = Trainer(Recipe.from_dict(point.recipe, source=f"grid point {point.run_id}")).train()
            summary = json.loads((run_dir / "summary.json").read_text())
            last, evaluation = rows[-1], summary.get("eval") or {}
            record.update(status="ok", error=None, steps=last["step"], final_reward=last["reward"], entropy=last["entropy"],
                          eval_reward=evaluation.get("eval_reward", math.nan))
        except Exception as err:  # a failed run is recorded, the grid goes on
            record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        finally:
            logging.getLogger().removeHandler(handler)
        record.update(wall_time_s=round(time.perf_counter() - start, 3), finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        log.write(_log_line(record["status"] + ("" if record["error"] is None else f": {record['error']}")))
    atomic_write_text(record_path(out_dir, point.run_id), json.dumps(record, indent=1, default=str))
    return {"run_id": point.run_id, "status": record["status"], "error": record["error"]}


def _ray_point(point: Point, out: str) -> dict:
    """Ray task body: :func:`run_point`, naming the node."""
    ray = importlib.import_module("ray")
    return run_point(point, out, where=f"Ray node {ray.get_runtime_context().get_node_id()[:8]}")


def _lost(point: Point, out: Path, error: str) -> dict:
    """Record a point whose Ray task failed for good (its worker or node died)."""
    if not is_done(out, point.run_id):
        rec = {"run_id": point.run_id, "source": point.source, "overrides": point.overrides, "recipe": point.recipe, "status": "failed", "error": error}
        atomic_write_text(record_path(out, point.run_id), json.dumps(rec, indent=1, default=str))
    return {"run_id": point.run_id, "status": "failed", "error": error}


def execute_ray(points: Sequence[Point], out: Path, record: Callable[[dict], None], *, address: Optional[str], workers: int,
                gpus_per_run: float, cpus_per_run: float, max_retries: int) -> None:
    """One Ray task per point (``num_gpus=gpus_per_run``, ``num_cpus=cpus_per_run``), on the cluster at ``address``
    (``None``: a local one of ``workers`` CPUs, started here and stopped on Ctrl-C)."""
    ray = importlib.import_module("ray")
    started = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        kwargs = dict(log_to_driver=False, include_dashboard=False, logging_level="warning")
        try:
            ray.init(address="local", num_cpus=workers, **kwargs) if address is None else ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError) as err:
            raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    task = ray.remote(_ray_point).options(num_gpus=gpus_per_run, num_cpus=cpus_per_run, max_retries=max_retries, retry_exceptions=False)
    owner = {task.remote(p, str(out)): p for p in points}
    pending = list(owner)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                res = ray.get(done[0])
            except ray.exceptions.RayError as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
                res = _lost(owner[done[0]], out, f"Ray task failed after {max_retries} retries: {type(err).__name__}: {reason}")
            record(res)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        _, left = ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S) if pending else ([], [])
        for ref in left:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
        raise


def summarise(points: Sequence[Point], out: Path) -> pd.DataFrame:
    """The tidy table: one row per point with a record (run id, source recipe, method, each override as a column,
    status, final reward, eval reward, entropy, wall time, error)."""
    rows = []
    for p in points:
        path = record_path(out, p.run_id)
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        rows.append({"run_id": p.run_id, "source": p.source, "method": p.recipe["method"]["name"], **p.overrides, "status": rec["status"],
                     "final_reward": rec.get("final_reward", math.nan), "eval_reward": rec.get("eval_reward", math.nan),
                     "entropy": rec.get("entropy", math.nan), "wall_time_s": rec.get("wall_time_s", math.nan), "error": rec.get("error")})
    return pd.DataFrame(rows)


def figure(table: pd.DataFrame, path: Path) -> None:
    """Final training reward and eval reward per point (bars, one colour per method), written atomically as SVG."""
    ok = table[table.status == "ok"]
    long = ok.melt(id_vars=["run_id", "method"], value_vars=["final_reward", "eval_reward"], var_name="metric", value_name="reward")
    long["metric"] = long["metric"].map({"final_reward": "final training reward", "eval_reward": "eval reward (held-out)"})
    methods = [m for m in METHOD_ORDER if m in set(long.method)] + sorted(set(long.method) - set(METHOD_ORDER))
    colours = dict(zip(METHOD_ORDER, sns.color_palette("colorblind", len(METHOD_ORDER))))
    grid = sns.catplot(data=long, kind="bar", x="run_id", y="reward", hue="method", hue_order=methods, col="metric",
                       palette={m: colours.get(m, "#949494") for m in methods}, height=3.2, aspect=1.3, errorbar=None)
    grid.set_axis_labels("run (id)", "reward (0–1, mean over the step's completions)")
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", rotation=45)
    atomic_write(path, lambda tmp: grid.savefig(tmp, format="svg", bbox_inches="tight"))
    plt.close(grid.figure)


def run_grid(spec: Path, out: Path, *, backend: str = "serial", workers: int = 1, address: Optional[str] = None, gpus_per_run: float = 0.0,
             cpus_per_run: float = 1.0, max_retries: int = 1, progress: bool = True) -> dict:
    """Validate everything (settings, every point as a recipe, the output directory), then run the points not yet
    done and write ``grid.csv`` and ``grid.svg``. Returns counts, the failures and the table."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
    for name, value, ok in (("workers", workers, isinstance(workers, int) and workers >= 1), ("max_retries", max_retries, isinstance(max_retries, int) and max_retries >= 0),
                            ("gpus_per_run", gpus_per_run, math.isfinite(gpus_per_run) and gpus_per_run >= 0),
                            ("cpus_per_run", cpus_per_run, math.isfinite(cpus_per_run) and cpus_per_run > 0)):
        if not ok:
            raise ValueError(f"{name}={value!r} is not allowed (workers ≥ 1, max_retries ≥ 0, gpus_per_run ≥ 0, cpus_per_run > 0)")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("backend 'ray' needs Ray, which is not installed; pip install 'sdpo-lab[ray]', or use --backend serial")
    out = Path(check_output_dir(out, "grid output directory")).resolve()
    points = plan(Path(spec), out)
    (out / "runs").mkdir(parents=True, exist_ok=True)  # everything is validated: from here on the grid creates its directory
    atomic_write_text(out / "grid.yaml", Path(spec).read_text())
    remove_stale_temporaries(out / "runs")
    pending = [p for p in points if not is_done(out, p.run_id)]
    counts = {"total": len(points), "skipped": len(points) - len(pending), "ok": 0, "failed": []}
    bar = tqdm(total=len(pending), desc="grid", unit="run", disable=not progress or not pending)

    def record(res: dict) -> None:
        if res["status"] == "ok":
            counts["ok"] += 1
        else:
            counts["failed"].append(res)
        bar.update(1)
        bar.set_postfix(failed=len(counts["failed"]))

    try:
        if backend == "ray" and pending:
            execute_ray(pending, out, record, address=address, workers=workers, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, max_retries=max_retries)
        else:
            for p in pending:
                record(run_point(p, str(out)))
    finally:
        bar.close()
    table = summarise(points, out)
    if not table.empty:
        atomic_write(out / "grid.csv", lambda tmp: table.to_csv(tmp, index=False))
        if (table.status == "ok").any():
            figure(table, out / "grid.svg")
    return {**counts, "table": table}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Run every point of a grid spec of LLM recipes (module doc of llm/grid.py, docs/cluster.md); "
                                             "restarting the same command skips finished runs.")
    p.add_argument("spec", help="grid spec (YAML): base or recipes, set, grid, points")
    p.add_argument("--out", required=True, help="output directory (created; resumed if it holds this grid's runs)")
    p.add_argument("--backend", default="serial", choices=BACKENDS, help="serial (one run after another here) or ray (one task per run)")
    p.add_argument("--workers", type=int, default=1, help="CPUs of the local Ray cluster started when no --ray-address is given (default 1)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join: 'auto' or HOST:PORT (default: start a local one)")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each run's Ray task asks for (default 0: CPU)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each run's Ray task asks for (default 1)")
    p.add_argument("--max-retries", type=int, default=1, help="times a run whose Ray worker died is run again (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 all ran ok, 1 some failed (named), 2 bad input (raised as ``ValueError`` to ``llm.cli``)."""
    args = build_parser().parse_args(argv)
    if args.backend != "ray" and (args.ray_address is not None or args.gpus_per_run != 0.0):
        raise ValueError("--ray-address and --gpus-per-run apply to --backend ray only")
    res = run_grid(Path(args.spec), Path(args.out), backend=args.backend, workers=args.workers, address=args.ray_address, gpus_per_run=args.gpus_per_run,
                   cpus_per_run=args.cpus_per_run, max_retries=args.max_retries, progress=args.progress)
    print(f"grid: {res['total']} runs ({res['skipped']} already done, {res['ok']} ran ok, {len(res['failed'])} failed)")
    print(f"table: {args.out}/grid.csv; figure: {args.out}/grid.svg; runs: {args.out}/runs/<run_id>/ (+ .json record, .log)")
    for f in res["failed"]:
        print(f"FAILED {f['run_id']}: {f['error']}  (see {args.out}/runs/{f['run_id']}.log)")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
