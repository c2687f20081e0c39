"""Per-run metrics of the toy world: correlations of credit with ``A*`` and exact policy quantities.

All correlation helpers reduce the last axes of ``[runs, ...]`` tensors to ``[runs]``; a constant
input gives NaN (the correlation is undefined), never a made-up number.
"""

from __future__ import annotations

from typing import Union

import torch

from . import exact
from .core.threads import one_thread
from .per_run import RunTasks
from .policies import TabularPolicy
from .world import Task


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pooled Pearson correlation per run: ``[runs, ...]`` × ``[runs, ...]`` → ``[runs]``."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    denom = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(denom > 1e-12, (x * y).sum(1) / denom.clamp(min=1e-300), torch.full_like(denom, float("nan")))


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) along the last axis of ``[runs, N]``."""
    sorted_x, order = x.sort(-1)
    new_group = torch.ones_like(sorted_x, dtype=torch.long)
    new_group[:, 1:] = (sorted_x[:, 1:] != sorted_x[:, :-1]).long()
    group = new_group.cumsum(-1) - 1  # tie-group id in sorted order
    position = torch.arange(x.shape[-1], dtype=torch.float64).expand_as(sorted_x)
    total = torch.zeros_like(position).scatter_add_(-1, group, position)
    count = torch.zeros_like(position).scatter_add_(-1, group, torch.ones_like(position))
    mean_rank = (total / count.clamp(min=1)).gather(-1, group)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pooled Spearman rank correlation per run, ``[runs]``."""
    return pearson(ranks(x.flatten(1).double()), ranks(y.flatten(1).double()))


def pearson_within(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson after removing each completion's mean (``[runs, B, T]`` → ``[runs]``): does the credit
    rank the tokens *of one completion* correctly? NaN for credit that is constant within completions."""
    return pearson(x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per run of two ``[runs, ...]`` tensors, ``[runs]``."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp(min=1e-300), torch.full_like(denom, float("nan")))


def exact_state(
    task: Union[Task, RunTasks], policy: TabularPolicy, theta: torch.Tensor, theta_init: torch.Tensor, sequences: torch.Tensor,
    *, chunk: int = 8,
) -> dict[str, torch.Tensor]:
    """Exact quantities of the current policies (float64), ``chunk`` runs at a time, from the chain tables of
    :func:`exact.chain_tables`. Computed on one thread: a multi-threaded reduction splits a row between threads
    when there are fewer rows than threads, so its rounding would depend on how many runs share the tensor; on
    one thread every run's row is reduced alone, bit for bit whatever the chunk (tested through ``run_group``).

    ``task``: one task for every run, or each run's own (:class:`~sdpo_sim.per_run.RunTasks`).
    Returns ``reward, entropy (per token), seq_entropy, kl_init`` as ``[runs]``, ``grad_J`` shaped like ``theta``
    and ``advantages`` ``[runs, B, T]`` (``A*`` of the given sampled sequences). With ``m_t(c) = P(ctx_t = c)``:
    ``H(Y) = Σ_t Σ_c m_t(c)·H(π_t(·|c))`` and ``KL(π‖π_init) = Σ_t Σ_c m_t(c)·KL(π_t(·|c) ‖ π_init,t(·|c))``
    (the chain rule; both checked against the enumeration in the tests).
    """
    with one_thread():
        return _exact_state(task, policy, theta, theta_init, sequences, chunk)


def _exact_state(task: Union[Task, RunTasks], policy: TabularPolicy, theta: torch.Tensor, theta_init: torch.Tensor, sequences: torch.Tensor,
                 chunk: int) -> dict[str, torch.Tensor]:
    T, markov = task.seq_len, policy.kind == "markov"
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("reward", "entropy", "seq_entropy", "kl_init", "grad_J", "advantages")}
    for lo in range(0, theta.shape[0], chunk):
        cond = policy.conditionals(theta[lo : lo + chunk].detach().double())  # [r, T, C, V]
        log_cond = torch.log_softmax(theta[lo : lo + chunk].detach().double() / policy.temperature, -1)
        log_init = torch.log_softmax(theta_init[lo : lo + chunk].double() / policy.temperature, -1)
        rewards = task.rewards(lo, lo + len(cond)) if isinstance(task, RunTasks) else task.rewards  # [r, V**T] or [V**T]
        masses, values = exact.chain_tables(rewards, cond, markov, full_masses=False)
        m = exact.chain_marginals(cond, markov)  # [r, T, C]
        h_seq = (m * -(cond * log_cond).sum(-1)).sum((1, 2))
        seqs = sequences[lo : lo + chunk]
        parts["reward"].append(values[0][..., 0])  # Q of the empty prefix = J
        parts["seq_entropy"].append(h_seq)
        parts["entropy"].append(h_seq / T)  # chain rule: mean conditional entropy = H(Y)/T
        parts["kl_init"].append((m * (cond * (log_cond - log_init)).sum(-1)).sum((1, 2)))
        parts["grad_J"].append(exact.chain_gradient(masses, values, cond, markov) / policy.temperature)
        parts["advantages"].append(exact.action_values_from_tables(values, seqs).gather(-1, seqs.unsqueeze(-1)).squeeze(-1))
    return {k: torch.cat(v) for k, v in parts.items()}
