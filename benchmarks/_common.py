"""Shared by every ``benchmarks/bench_*.py``: the results-file format, peak-RSS measurement, timing.

Results file ``benchmarks/results/<name>.json`` (read by ``benchmarks/run_all.py``)::

    {
      "name": "fused_loss",                      # file stem
      "title": "SDPO loss: fused vs full-logit", # one line for RESULTS.md
      "settings": {...},                         # sizes, dtype, threads, repeats: whatever defines the run
      "figures": [                               # one row per headline figure
        {"figure": "peak memory: ours fused vs TRL full-logit",
         "value": 210.0, "baseline": 4100.0, "unit": "MiB",   # ours and the peer/baseline, same run
         "ratio": 0.051,                                       # value / baseline
         "target": "<= 0.125", "met": true,                    # target on the ratio (null if none)
         "note": "why a target is missed, or anything a reader must know"}
      ],
      "raw": {...},                              # per-variant measurements
      "created": "2026-11-22T04:00:00Z", "wall_time_s": 95.1
    }

``value``/``baseline``/``ratio``/``target``/``met`` may be null for purely informative figures
(e.g. a wall time with no peer). Other helpers' files only need ``title`` and ``figures``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # so that `sdpo_sim` imports even when run from a plain checkout

from sdpo_sim.core.io import atomic_write_text  # noqa: E402


def figure(
    figure: str, value: Optional[float], baseline: Optional[float], unit: str, *,
    target_ratio: Optional[float] = None, higher_is_better: bool = False, note: str = "",
) -> dict[str, Any]:
    """One results row; ``ratio = value / baseline``, ``met`` compares it with ``target_ratio``.

    ``higher_is_better=False``: target is ``ratio <= target_ratio`` (memory, time);
    ``True``: ``ratio >= target_ratio`` (throughput).
    """
    ratio = None if value is None or not baseline else value / baseline
    met, target = None, None
    if target_ratio is not None:
        target = f"{'>=' if higher_is_better else '<='} {target_ratio:g}"
        if ratio is not None:
            met = ratio >= target_ratio if higher_is_better else ratio <= target_ratio
    return {"figure": figure, "value": value, "baseline": baseline, "unit": unit, "ratio": ratio,
            "target": target, "met": met, "note": note}


def write_results(name: str, title: str, figures: list[dict], settings: dict, raw: Any, wall_time_s: float,
                  results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results_dir/<name>.json`` atomically; returns its path."""
    payload = {
        "name": name, "title": title, "settings": settings, "figures": figures, "raw": raw,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_time_s": round(wall_time_s, 2),
    }
    path = Path(results_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory growth of *this process* above a baseline taken at :meth:`start`.

    Linux: writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark (VmHWM) to
    the current RSS, so ``VmHWM − VmRSS(at start)`` is the exact peak growth of the measured work,
    whatever was allocated (torch, glibc, Python). Elsewhere it falls back to ``ru_maxrss`` growth,
    which is only right when the measured work exceeds every earlier peak (``method`` says which).
    """

    def start(self) -> "PeakRSS":
        self.method = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base_kib = _status_kib("VmRSS")
            if self.base_kib is None or _status_kib("VmHWM") is None:
                raise OSError("no /proc/self/status")
        except OSError:
            self.method = "ru_maxrss growth (upper bound unknown)"
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def growth_mib(self) -> float:
        peak = _status_kib("VmHWM") if self.method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.base_kib) / 1024.0


# ------------------------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Wall-clock and process-CPU seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    ``min_s`` (the least-disturbed call) is the figure to compare on a shared machine; CPU time counts
    every thread of this process and is insensitive to time spent descheduled.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"min_s": min(wall), "median_s": statistics.median(wall), "cpu_min_s": min(cpu),
            "times_s": [round(t, 4) for t in wall]}


def spawn_worker(script: str, worker: str, args: list[str]) -> dict[str, Any]:
    """Run ``python SCRIPT --worker WORKER ARGS`` in a fresh process (clean memory and allocator state);
    the last line it prints is its JSON result."""
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--worker", worker, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --worker {worker} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_or_work(parser, argv, work: Callable[[Any], dict]):
    """Add the ``--out-dir`` and (internal) ``--worker`` flags every fresh-process benchmark has, and parse ``argv``.
    In a worker process (``--worker NAME``, see :func:`spawn_worker`) print ``work(args)`` as JSON and return
    ``None``; otherwise return the parsed arguments for the benchmark's own main."""
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args)))
        return None
    return args


def trl_installed() -> bool:
    """Whether TRL (the ``peers`` extra) can be imported; says so on stderr when it cannot."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed (peers extra): nothing to compare against", file=sys.stderr)
        return False
    return True


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def finish(name: str, title: str, figures: list[dict], settings: dict, raw: Any, wall_time_s: float, results_dir: Path,
           lines: Sequence[str] = ()) -> int:
    """The end of a benchmark: write its results file, print ``lines`` (a per-variant table), the figures and the
    path written; returns the exit code 0."""
    path = write_results(name, title, figures, settings, raw, wall_time_s, results_dir=Path(results_dir))
    for line in lines:
        print(line)
    print_figures(figures)
    print(f"wrote {path}")
    return 0


def print_figures(figures: list[dict]) -> None:
    """One line per figure: its ratio against the same-run baseline and whether the target is met."""
    for f in figures:
        status = "no target" if f["met"] is None else "met" if f["met"] else "MISSED"
        print(f"{f['figure']:<60} ratio {f['ratio']:.3f} ({f['target'] or ''} {status})")


# ------------------------------------------------------------------------------------------- the TRL peer
def trl_sdpo_loss_fn(model, inputs: dict) -> Callable[[], Any]:
    """``() -> loss``: TRL ``SDPOTrainer``'s own teacher/student forwards and self-distillation loss (full logits, reverse
    KL, the model as its own teacher) on ``inputs`` (its batch keys: prompt/completion/teacher ids and masks,
    ``self_distillation_mask``), called on a minimal host object instead of a built trainer. TRL is imported here, not
    at the top: it is the optional peer (the ``peers`` extra) only two benchmarks compare against."""
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer

    host = SimpleNamespace(
        args=SimpleNamespace(distillation_mode="full_logits", distillation_alpha=1.0, distillation_topk=None,
                             distillation_add_tail=False, distillation_is_clip=None),
        temperature=1.0, model_kwarg_keys=inspect.signature(model.forward).parameters.keys(),
        accelerator=SimpleNamespace(gather=lambda x: x),
        _get_teacher_context_for_self_distillation=contextlib.nullcontext,
        _log_self_distillation_metric=lambda mode, value: None,
    )
    host._forward_logits = lambda *a, **k: SDPOTrainer._forward_logits(host, *a, **k)

    def loss() -> Any:
        logits = SDPOTrainer._compute_teacher_student_logits(host, model, model, inputs)
        return SDPOTrainer._compute_self_distillation_loss(host, model, inputs, logits)

    return loss
