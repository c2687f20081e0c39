"""Per-run settings and tasks of one tensor program (sdpo_sim/per_run.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_sim.exact import credit_scale
from sdpo_sim.per_run import RunTasks, per_run
from sdpo_sim.world import Task, sequence_index


def test_per_run_is_the_float_for_floats_and_a_column_per_run_for_tensors():
    assert per_run(0.5, lambda r: r * 2) == 1.0
    assert per_run((0.5, 3.0), lambda r, s: r * s) == 1.5
    col = per_run((torch.tensor([0.0, 0.6], dtype=torch.float64), 2.0), lambda r, s: math.sqrt(1 - r**2) * s, dims=2)
    assert col.shape == (2, 1, 1) and col.dtype == torch.float64
    assert col.flatten().tolist() == [2.0, math.sqrt(1 - 0.6**2) * 2.0]  # Python arithmetic per run, bit for bit
    both = per_run((torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)), lambda a, b: a + b)
    assert both.tolist() == [0.1 + 3.0, 0.2 + 4.0]


def test_run_tasks_read_each_runs_own_task():
    a, b = Task(0, 4, 3), Task(5, 4, 3)
    tasks = RunTasks([a, a, b, a])
    assert len(tasks) == 4 and tasks.owner.tolist() == [0, 0, 1, 0] and tasks.seeds.tolist() == [0, 0, 5, 0]
    seqs = torch.randint(4, (4, 6, 3), generator=torch.Generator().manual_seed(0))
    want = torch.stack([t.reward(s) for t, s in zip([a, a, b, a], seqs)])
    assert torch.equal(tasks.reward(seqs), want)
    assert torch.equal(tasks.lookup(sequence_index(seqs, 4)), want)
    assert tasks.scale.tolist() == [credit_scale(t.rewards, 3) for t in (a, a, b, a)]
    assert torch.equal(tasks.q[2, 0], b.q) and torch.equal(tasks.q[3, 0], a.q)
    shared = tasks.rewards(0, 2)  # runs of one task: a view of its table, no copy
    assert shared.shape == (2, 64) and shared.stride(0) == 0 and torch.equal(shared[1], a.rewards)
    mixed = tasks.rewards(1, 4)
    assert torch.equal(mixed, torch.stack([a.rewards, b.rewards, a.rewards]))


def test_run_tasks_refuse_what_one_program_cannot_hold():
    with pytest.raises(ValueError, match="at least one run"):
        RunTasks([])
    with pytest.raises(ValueError, match="share vocab_size and seq_len"):
        RunTasks([Task(0, 4, 3), Task(1, 4, 4)])
