"""Run observability: JSONL metrics (the toy world's names), optional TensorBoard, credit heat-maps.

Metric names shared with the toy world: ``reward``, ``entropy``, ``divergence``, ``alpha_mix``,
``response_length``; plus ``loss``, ``nonfinite_steps`` and a few LLM-only diagnostics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from sdpo_sim.core.io import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per logged step to ``<output_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False, resume_step: int = 0):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the rows of steps already done (a resumed run continues the file)
            rows = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(r + "\n" for r in rows))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("training.tensorboard=true needs the tensorboard package: pip install 'sdpo-lab[tensorboard]'") from None
            self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def heatmap(self, step: int, tokens: Sequence[str], log_ratio: Sequence[float], title: str) -> Optional[Path]:
        """Write the per-token credit heat-map (teacher − student log-ratio) of one completion as HTML."""
        if not self.enabled:
            return None
        from .heatmap import credit_heatmap_html

        path = self.dir / "heatmaps" / f"step-{step:06d}.html"
        atomic_write_text(path, credit_heatmap_html(list(tokens), list(log_ratio), title=title))
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
