"""The claims job: sweep (resumable) → figures → measured claims → CLAIMS.md / CLAIMS.json, at a named scale."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from ..core.io import check_output_dir
from ..plots import write_figures
from ..provenance import code_hash
from ..sweep import Interrupted, Spec, kept_runs, run_sweep
from .measure import aggregates, default_choice, evaluate, replica, units
from .report import write_report

SCALES = {"canonical": "claims.yaml", "main": "main.yaml", "quick": "quick.yaml"}


def spec_path(scale: str) -> Path:
    """The packaged spec of a scale (canonical | main | quick)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not allowed; choose one of {', '.join(map(repr, SCALES))}")
    return Path(__file__).resolve().parent.parent / "specs" / SCALES[scale]


def run_claims(scale: str = "canonical", *, out: Path, report_dir: Optional[Path] = None, figures_dir: Optional[Path] = None, workers: int = 2,
               progress: bool = True, spec: Optional[Path] = None, command: str = "sdpo-sim claims", sweep_kwargs: Optional[dict] = None,
               figures: bool = True) -> dict:
    """Sweep (resumable) → figures (unless ``figures=False``) → claims. Returns paths and the wall time.
    Every output place is checked before the sweep runs; Ctrl-C raises :class:`~sdpo_sim.sweep.Interrupted`."""
    start = time.perf_counter()
    spec_file = Path(spec) if spec else spec_path(scale)
    for where, what in ((report_dir, "report directory"), (figures_dir if figures else None, "figures directory")):
        if where is not None:  # refused now, not after an 11-minute sweep
            check_output_dir(where, what)
    result = run_sweep(Spec.load(spec_file), out, workers=workers, progress=progress, **(sweep_kwargs or {}))
    try:
        tables = {"history": result.history, "seeds": result.seeds, "summary": result.summary}
        drawn = write_figures({k: default_choice(v) for k, v in tables.items()}, figures_dir or Path(out) / "figures") if figures and not result.history.empty else {}
        claims = evaluate(tables)
        wall = time.perf_counter() - start
        meta = {"command": command, "spec": spec_file.name if not spec else str(spec_file), "scale": scale, "runs": result.counts["total"], "failed": len(result.failed), "reused": result.counts["skipped"],
                "workers": workers, "wall_time_s": round(wall, 1), "package_version": _first(result.summary, "package_version"),
                "git_commit": _first(result.summary, "git_commit"), "code_hash": runs_code_hash(result.summary), "report_code_hash": code_hash(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "lr_rule": result.tuning["rule"] if result.tuning else "as given in the spec", "tuning": result.tuning,
                "aggregates": aggregates(units(result.seeds))}
        md, js = write_report(claims, replica(units(result.seeds)), meta, Path(report_dir or out))
    except KeyboardInterrupt:  # the sweep itself is complete: every run is kept
        raise Interrupted(kept_runs(out)) from None
    return {"claims": claims, "markdown": md, "json": js, "figures": drawn, "wall_time_s": wall, "sweep": result}


def _first(frame: pd.DataFrame, col: str) -> Any:
    """The first value of ``col``, or ``None`` when the frame lacks it or is empty."""
    return frame[col].iloc[0] if col in frame and len(frame) else None


def runs_code_hash(summary: pd.DataFrame) -> Optional[str]:
    """The code hash every run of the sweep was made with; ``"mixed: a, b"`` when runs come from different code
    (a resumed sweep whose code changed in between), ``None`` for records older than the hash."""
    hashes = sorted({h for h in summary.get("code_hash", pd.Series(dtype=object)).dropna()}) if len(summary) else []
    return hashes[0] if len(hashes) == 1 else ("mixed: " + ", ".join(hashes) if hashes else None)
