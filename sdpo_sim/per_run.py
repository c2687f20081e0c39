"""Settings that differ between the runs of one tensor program (:func:`sdpo_sim.train.run_group`).

A setting such as the judge's noise σ, the teacher's β or its self-knowledge ρ is either one float for
every run or a ``[runs]`` tensor, one value per run. :func:`per_run` turns it into what an equation
multiplies with: the float itself, or a column ``[runs, 1, …]`` that broadcasts against ``[runs, …]``.
Derived constants (``√(1 − ρ²)·s``, ``σ² + (c·s)²``) are computed *per run in Python arithmetic*, so a
run inside a group gets bit for bit the numbers it gets alone. :class:`RunTasks` is the same for the
task: each run of a program may train on its own task (its reward table, credit scale and quality table).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from .exact import credit_scale
from .world import Task, sequence_index

Setting = Union[float, torch.Tensor]  # one value for all runs, or [runs]


def per_run(value: Union[Setting, tuple[Setting, ...]], fn: Callable[..., float] = float, *, dims: int = 0,
            dtype: torch.dtype = torch.float64) -> Setting:
    """``fn(value)`` for a float; for a ``[runs]`` tensor, ``fn`` of each run's value as a tensor
    ``[runs, 1 × dims]`` of ``dtype`` (broadcasts against ``[runs, d_1, …, d_dims]``). A tuple of settings
    ``(ρ, s)`` gives ``fn(ρ_r, s_r)`` per run (a float among them counts for every run)."""
    values = value if isinstance(value, tuple) else (value,)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return fn(*values)
    runs = len(tensors[0])
    columns = [v.tolist() if isinstance(v, torch.Tensor) else [v] * runs for v in values]
    return torch.tensor([fn(*map(float, row)) for row in zip(*columns)], dtype=dtype).view(-1, *([1] * dims))


class RunTasks:
    """The task of every run of a tensor program ``[runs]``: run ``r`` trains on ``tasks[owner[r]]``.

    Reads the judge and the teachers make of a :class:`~sdpo_sim.world.Task` (``lookup``, ``reward``, the credit
    scale ``s``, the quality table ``q``), one per run; gathers are exact, so a run gets the bits it gets alone.
    """

    def __init__(self, per_run_tasks: Sequence[Task]) -> None:
        if not per_run_tasks:
            raise ValueError("RunTasks needs the task of at least one run")
        distinct: dict[int, Task] = {}
        for task in per_run_tasks:
            distinct.setdefault(id(task), task)
        self.tasks = tuple(distinct.values())
        position = {key: i for i, key in enumerate(distinct)}
        self.owner = torch.tensor([position[id(task)] for task in per_run_tasks])  # [runs]
        first = self.tasks[0]
        if any((t.vocab_size, t.seq_len) != (first.vocab_size, first.seq_len) for t in self.tasks):
            raise ValueError("the tasks of one program must share vocab_size and seq_len")
        self.vocab_size, self.seq_len, self.num_sequences = first.vocab_size, first.seq_len, first.num_sequences
        self.table = torch.stack([t.rewards for t in self.tasks])  # [tasks, V**T]
        self.seeds = torch.tensor([t.seed for t in per_run_tasks])  # [runs]: each run's task seed
        scales = [credit_scale(t.rewards, t.seq_len) for t in self.tasks]
        self.scale = torch.tensor([scales[i] for i in self.owner.tolist()], dtype=torch.float64)  # [runs]: s of each run's task
        self.q = torch.stack([t.q for t in self.tasks])[self.owner].unsqueeze(1)  # [runs, 1, T, V]

    def __len__(self) -> int:
        return len(self.owner)

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """``R_r(index)``: each run's reward at flat sequence indices ``[runs, ...]`` → ``[runs, ...]`` float64."""
        offset = (self.owner * self.num_sequences).view(-1, *([1] * (index.dim() - 1)))
        return self.table.view(-1).take(index + offset)

    def reward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Exact reward of each run's sequences ``[runs, ..., T]`` → ``[runs, ...]``."""
        return self.lookup(sequence_index(seqs, self.vocab_size))

    def rewards(self, lo: int, hi: int) -> torch.Tensor:
        """The reward tables of runs ``lo..hi−1``, ``[hi − lo, V**T]`` (a view when they share one task)."""
        owners = self.owner[lo:hi]
        if bool((owners == owners[0]).all()):
            return self.table[int(owners[0])].unsqueeze(0).expand(len(owners), -1)
        return self.table.index_select(0, owners)
