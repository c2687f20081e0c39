"""Run observability: JSONL metrics (the toy world's names), optional trackers (TensorBoard, W&B), credit heat-maps.

Metric names shared with the toy world: ``reward``, ``entropy``, ``divergence``, ``alpha_mix``,
``response_length``; plus ``loss``, ``nonfinite_steps`` and a few LLM-only diagnostics.

Trackers (``training.report_to``, TRL's name; :data:`REPORT_TO`):

- ``jsonl``: ``<output_dir>/metrics.jsonl``, one JSON object per logged step. It is the run's own record
  (:func:`read_metrics`, the summaries and the tests read it), so it is **always** written; naming it in
  ``report_to`` only says so. The other names add trackers beside it.
- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter(<output_dir>/tensorboard)``; a resumed run purges
  the events after the resume step, so TensorBoard shows one curve.
- ``wandb``: a W&B run, **offline** unless the environment sets ``WANDB_MODE``; everything it writes stays under
  ``<output_dir>``: the run directory ``<output_dir>/wandb/offline-run-*`` (``wandb sync`` uploads it later), and
  the service's cache/config/data directories under ``<output_dir>/wandb/{cache,config,data}`` unless the
  environment names its own ``WANDB_CACHE_DIR``/``WANDB_CONFIG_DIR``/``WANDB_DATA_DIR``. The run id is kept in
  ``<output_dir>/wandb_id``, so a resumed run continues the same W&B run (``resume="allow"``).

Only finite real numbers go to TensorBoard and W&B (strings, booleans, NaN and ±inf are skipped there;
``metrics.jsonl`` keeps every value, non-finite ones as ``null``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import numbers
import os
import secrets
import string
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from sdpo_sim.core.io import atomic_write_text

REPORT_TO = ("jsonl", "tensorboard", "wandb")
# The import name each tracker needs (``None``: nothing beyond the core dependencies).
_PACKAGE = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}
INSTALL_HINT = "pip install 'sdpo-lab[tracking]'"
WANDB_PROJECT = "sdpo-lab"
WANDB_ID_FILE = "wandb_id"


def check_report_to(report_to: Sequence[str], field_name: str = "training.report_to") -> None:
    """Refuse (one-line ``ValueError``) a tracker list that is not a non-empty list of distinct names from
    :data:`REPORT_TO` whose packages are installed. Imports nothing (``importlib.util.find_spec`` only)."""
    allowed = ", ".join(REPORT_TO)
    if isinstance(report_to, (str, bytes)) or not isinstance(report_to, Sequence):
        raise ValueError(f"{field_name}={report_to!r} must be a list of tracker names from {allowed}, e.g. [jsonl, wandb]")
    if not report_to:
        raise ValueError(f"{field_name} is empty; list one or more of {allowed} (jsonl, the default, is always written)")
    seen = set()
    for name in report_to:
        if not isinstance(name, str) or name not in REPORT_TO:
            raise ValueError(f"{field_name}: unknown tracker {name!r}; allowed: {allowed}")
        if name in seen:
            raise ValueError(f"{field_name}: tracker {name!r} is listed twice; list each of {allowed} at most once")
        seen.add(name)
        package = _PACKAGE[name]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"{field_name}: tracker {name!r} needs the {package} package, which is not installed: {INSTALL_HINT}")


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite real-number metrics (booleans, strings, None, NaN and ±inf left out), as floats or ints."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}


def _new_run_id() -> str:
    """A fresh W&B run id: 8 random characters from ``[a-z0-9]`` (W&B's own id alphabet)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Within the block, set the environment variables of ``values`` that are not set already; restore after."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class MetricsLogger:
    """Logs metrics of the main process: ``<output_dir>/metrics.jsonl`` always, plus the trackers of ``report_to``.

    ``resume_step``: a resumed run keeps the rows (and TensorBoard events) of steps ``<= resume_step`` and drops
    the later ones, and continues the W&B run whose id is in ``<output_dir>/wandb_id``; a fresh run
    (``resume_step == 0``) starts a new W&B run. ``run_name`` and ``config`` (a JSON-able mapping, e.g. the recipe)
    name and describe the W&B run. With ``enabled=False`` (the other processes) nothing is written or started.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool = True,
        report_to: Sequence[str] = ("jsonl",),
        resume_step: int = 0,
        run_name: Optional[str] = None,
        config: Optional[Mapping] = None,
    ):
        check_report_to(report_to)
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.report_to = tuple(report_to)
        self.path = self.dir / "metrics.jsonl"
        self.writer = None  # TensorBoard SummaryWriter
        self.wandb_run = None
        self.wandb_id: Optional[str] = None  # the W&B run id (kept after close; None without W&B)
        self._wandb = None  # the wandb module, once a run is started
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the rows of steps already done (a resumed run continues the file)
            rows = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(r + "\n" for r in rows))
        if "tensorboard" in self.report_to:
            # tensorboard is an optional package (the `tracking` extra), imported only when asked for;
            # check_report_to has already refused a missing one with the install command.
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the resume point (logged before a crash) are hidden.
            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step > 0 else None)
        if "wandb" in self.report_to:
            self._start_wandb(resume_step, run_name, config)

    # -- W&B ------------------------------------------------------------------------------------------
    def _wandb_environment(self) -> dict[str, str]:
        """Where W&B may write (used unless the environment already says): all under ``<output_dir>/wandb``.

        ``wandb-core`` (the service process W&B starts) reads these when it starts, so they are set around
        ``wandb.init``; its debug log would otherwise go to ``~/.cache/wandb/logs``. When we choose offline
        mode (no ``WANDB_MODE`` set), error reporting to W&B's servers is turned off too.
        """
        root = (self.dir / "wandb").resolve()
        env = {"WANDB_CACHE_DIR": str(root / "cache"), "WANDB_CONFIG_DIR": str(root / "config"),
               "WANDB_DATA_DIR": str(root / "data"), "WANDB_ARTIFACT_DIR": str(root / "artifacts")}
        if "WANDB_MODE" not in os.environ:
            env["WANDB_ERROR_REPORTING"] = "false"
        return env

    def _start_wandb(self, resume_step: int, run_name: Optional[str], config: Optional[Mapping]) -> None:
        # wandb is an optional package (the `tracking` extra) and costs ~0.6 s to import, so it is imported
        # only when a run asks for it; check_report_to has already refused a missing one with the install command.
        import wandb

        id_file = self.dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step > 0 and id_file.is_file() else ""
        if not run_id:
            run_id = _new_run_id()
            atomic_write_text(id_file, run_id + "\n")
        self.wandb_id = run_id
        with _environment(self._wandb_environment()):
            self.wandb_run = wandb.init(
                dir=str(self.dir.resolve()),
                project=WANDB_PROJECT,
                name=run_name,
                config=dict(config) if config is not None else None,
                mode=None if "WANDB_MODE" in os.environ else "offline",  # None: wandb reads WANDB_MODE itself
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )
        self._wandb = wandb

    # -- logging --------------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl; send the finite numbers to the trackers."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = _scalars(metrics)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def heatmap(self, step: int, tokens: Sequence[str], log_ratio: Sequence[float], title: str) -> Optional[Path]:
        """Write the per-token credit heat-map (teacher − student log-ratio) of one completion as HTML."""
        if not self.enabled:
            return None
        from .heatmap import credit_heatmap_html

        path = self.dir / "heatmaps" / f"step-{step:06d}.html"
        atomic_write_text(path, credit_heatmap_html(list(tokens), list(log_ratio), title=title))
        return path

    def close(self) -> None:
        """Flush and close the trackers. Ends the W&B run and, when no other W&B run of this process is still
        active, the W&B service process too (``wandb.teardown``), so no child process outlives the run."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            wandb, run = self._wandb, self.wandb_run
            self.wandb_run = None
            with _environment(self._wandb_environment()):
                run.finish()
                if wandb.run is None:  # leave a run the user started in this process (and its service) alone
                    wandb.teardown()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
