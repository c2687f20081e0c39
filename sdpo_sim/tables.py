"""Tidy tables of a sweep: stored run records → ``history``/``summary`` frames with one column per config field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import pandas as pd

from .core.io import atomic_write
from .execution import load_record, record_paths
from .sweep_spec import Planned


def _with_config(frame: pd.DataFrame, config: Mapping[str, Any], meta: Mapping[str, Any]) -> pd.DataFrame:
    """Prepend meta columns and one column per config field; a field named like a metric becomes ``config.<name>``."""
    frame = frame.copy()
    cols = {}
    for k, v in meta.items():
        cols[k] = v
    for k, v in config.items():
        name = f"config.{k}" if k in frame.columns or k in meta else k
        cols[name] = v
    cols["config"] = json.dumps(dict(config), sort_keys=True, default=str)
    extra = pd.DataFrame({k: [v] * len(frame) for k, v in cols.items()}, index=frame.index)
    return pd.concat([extra, frame], axis=1)


def collect(planned: Sequence[Planned], runs_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the stored runs of a plan into ``(history, summary)`` tidy frames (one row set per block)."""
    histories, summaries = [], []
    for p in planned:
        rec = load_record(runs_dir, p.run_id)
        if rec is None:
            continue
        for block in p.blocks:
            meta = {"block": block, "run_id": p.run_id, "status": rec["status"], "package_version": rec.get("package_version"), "git_commit": rec.get("git_commit"),
                    "code_hash": rec.get("code_hash")}
            summ = {k: v for k, v in (rec.get("summary") or {}).items() if k != "per_seed"}
            if isinstance(summ.get("final_reward_ci95"), (list, tuple)) and len(summ["final_reward_ci95"]) == 2:
                lo, hi = summ.pop("final_reward_ci95")
                summ["final_reward_ci_lo"], summ["final_reward_ci_hi"] = lo, hi
            row = pd.DataFrame([{**summ, "error": rec.get("error"), "wall_time_s": rec.get("wall_time_s")}])
            summaries.append(_with_config(row, p.config, meta))
            if rec["status"] == "ok":
                hist = pd.read_parquet(record_paths(runs_dir, p.run_id)[1])
                histories.append(_with_config(hist, p.config, meta))
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    return history, summary


def write_table(frame: pd.DataFrame, path_stem: Path) -> None:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically."""
    atomic_write(path_stem.with_suffix(".parquet"), lambda tmp: frame.to_parquet(tmp, index=False))
    atomic_write(path_stem.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))


def load_tables(out: Union[str, Path]) -> dict[str, pd.DataFrame]:
    """Read a finished sweep's tables (``history``, ``summary``, ``seeds``) from Parquet."""
    out = Path(out)
    if not out.exists():
        raise ValueError(f"sweep directory {str(out)!r} does not exist; give a directory written by `sdpo-sim sweep SPEC --out DIR`")
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file, not a sweep directory; give a directory written by `sdpo-sim sweep SPEC --out DIR`")
    if not (out / "summary.parquet").is_file():
        raise ValueError(f"{out} holds no sweep results (no summary.parquet); run `sdpo-sim sweep SPEC --out {out}` first")
    tables = {}
    for name in ("history", "summary", "seeds"):
        path = out / f"{name}.parquet"
        tables[name] = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    return tables

