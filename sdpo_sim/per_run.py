"""Settings that differ between the runs of one tensor program (:func:`sdpo_sim.train.run_group`).

A setting such as the judge's noise σ, the teacher's β or its self-knowledge ρ is either one float for
every run or a ``[runs]`` tensor, one value per run. :func:`per_run` turns it into what an equation
multiplies with: the float itself, or a column ``[runs, 1, …]`` that broadcasts against ``[runs, …]``.
Derived constants (``√(1 − ρ²)·s``, ``σ² + (c·s)²``) are computed *per run in Python arithmetic*, so a
run inside a group gets bit for bit the numbers it gets alone.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

Setting = Union[float, torch.Tensor]  # one value for all runs, or [runs]


def per_run(value: Setting, fn: Callable[[float], float] = float, *, dims: int = 0, dtype: torch.dtype = torch.float64) -> Setting:
    """``fn(value)`` for a float; for a ``[runs]`` tensor, ``fn`` of each run's value as a tensor
    ``[runs, 1 × dims]`` of ``dtype`` (broadcasts against ``[runs, d_1, …, d_dims]``)."""
    if not isinstance(value, torch.Tensor):
        return fn(value)
    return torch.tensor([fn(float(v)) for v in value.tolist()], dtype=dtype).view(-1, *([1] * dims))
