"""Checkpoints: trainable weights, optimiser, teacher, controller, RNG and step — atomic, ``weights_only``.

Layout: ``<output_dir>/checkpoints/step-000010/{rank-0.pt, state.pt}`` and a ``latest`` file naming
the newest complete checkpoint. The directory is written under a temporary name and renamed when
complete, so a crash never leaves a half checkpoint behind as ``latest``. Weights are stored as each
process's local pieces (one file when the model is replicated, one per rank when it is sharded), so
resuming needs the same number of processes for a sharded run. Everything loads with
``torch.load(weights_only=True)``. Under DeepSpeed the engine's own ``save_state`` holds model and optimiser.

Rotation (``save_total_limit``, TRL/HF's name): after a new checkpoint is complete and ``latest`` names it, only
the newest ``save_total_limit`` complete checkpoints are kept (``None`` keeps all); the one ``latest`` names is
never deleted. An old checkpoint is first renamed to a hidden ``.step-*.deleting`` and then removed, so a crash
mid-deletion never leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from sdpo_sim.core.io import atomic_write, atomic_write_text

from .teacher_weights import local_tensor, trainable_named_parameters


def _local(value: Any) -> Any:
    """Recursively replace (D)Tensors by plain local tensors on CPU."""
    if isinstance(value, torch.Tensor):
        return local_tensor(value).detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def is_sharded(model: torch.nn.Module) -> bool:
    """True when parameters are split across processes (FSDP2 DTensors or DeepSpeed ZeRO-3)."""
    return any(hasattr(p, "ds_tensor") or hasattr(p.data, "placements") for p in model.parameters())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher,
    trainer_state: dict,
    rank: int = 0,
    barrier=lambda: None,
    accelerator=None,
    save_total_limit: Optional[int] = None,
) -> Path:
    """Write checkpoint ``step`` (call on every process; ``barrier`` synchronises them). Returns its directory.

    With ``save_total_limit`` (≥ 1), rank 0 then deletes all but the newest ``save_total_limit`` complete
    checkpoints (:func:`rotate_checkpoints`) while the other processes wait at the last barrier."""
    check_save_total_limit(save_total_limit)
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    deepspeed = accelerator is not None and accelerator.distributed_type.name == "DEEPSPEED"
    if deepspeed:
        accelerator.save_state(str(tmp / "engine"))
    sharded = is_sharded(model)
    if sharded or rank == 0:
        payload = {
            "teacher": _local(teacher.state_dict()),
            "rng": rng_state(),
        }
        if not deepspeed:
            payload["model"] = {n: _local(p) for n, p in trainable_named_parameters(model)}
            payload["optimizer"] = _local(optimizer.state_dict())
        _save(tmp / f"rank-{rank if sharded else 0}.pt", payload)
    if rank == 0:
        _save(tmp / "state.pt", {"step": step, "sharded": sharded, **trainer_state})
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
        if save_total_limit is not None:
            rotate_checkpoints(output_dir, save_total_limit)
    barrier()
    return final


_STEP_DIR = re.compile(r"step-(\d+)")


def check_save_total_limit(limit: Optional[int], field_name: str = "save_total_limit") -> None:
    """Refuse (one-line ``ValueError``) a limit that is neither None (keep all) nor an integer ≥ 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{field_name}={limit!r} must be an integer >= 1 (keep that many checkpoints) or null (keep all)")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoint directories (``step-N`` holding ``state.pt``) of ``output_dir``, oldest step first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def rotate_checkpoints(output_dir: str | Path, limit: int) -> list[Path]:
    """Delete all but the newest ``limit`` complete checkpoints of ``output_dir`` (never the one ``latest`` names;
    incomplete or temporary directories are left alone). Call on one process only. Returns the deleted paths."""
    check_save_total_limit(limit, "rotate_checkpoints(limit)")
    keep = latest_checkpoint(output_dir)
    deleted = []
    for path in complete_checkpoints(output_dir)[:-limit]:
        if keep is not None and path.resolve() == keep.resolve():
            continue
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)  # from here on it is no longer a complete checkpoint, even if the removal stops
        shutil.rmtree(doomed)
        deleted.append(path)
    return deleted


def _redistribute_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Turn loaded local optimiser states back into DTensors shaped like their (FSDP2-sharded) parameters."""
    for param, state in optimizer.state.items():
        if not hasattr(param.data, "placements"):
            continue
        from torch.distributed.tensor import DTensor

        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
                state[key] = DTensor.from_local(value.to(local_tensor(param).device), param.device_mesh, param.placements,
                                                run_check=False, shape=param.shape, stride=param.stride())


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint directory, or None."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher,
    rank: int = 0,
    accelerator=None,
) -> dict:
    """Restore everything saved by :func:`save_checkpoint` into live objects; returns the trainer state."""
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=True)
    payload = torch.load(path / f"rank-{rank if state['sharded'] else 0}.pt", weights_only=True)
    if accelerator is not None and accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.load_state(str(path / "engine"))
    else:
        params = dict(trainable_named_parameters(model))
        if set(params) != set(payload["model"]):
            raise ValueError(f"{path}: checkpoint parameters do not match the model's trainable parameters")
        with torch.no_grad():
            for n, t in payload["model"].items():
                local_tensor(params[n]).copy_(t)
        optimizer.load_state_dict(payload["optimizer"])
        _redistribute_optimizer_state(optimizer)
    teacher.load_state_dict(payload["teacher"])
    set_rng_state(payload["rng"])
    return state
