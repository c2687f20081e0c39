"""Exact quantities of any autoregressive policy over an enumerable sequence space (docs/design.md §3).

A policy is given by ``seq_logprobs [..., V**T]``, the log-probability of every sequence in
``itertools.product`` order (leading axes, e.g. ``[runs]``, are carried through). Everything is
computed by enumeration, never by sampling. Prefix tables are built level by level: the prefix
``y_≤k`` of length ``k`` has flat index ``idx(y) // V^(T−k)``, and its mass is a logsumexp over the
next token's axis, so each level costs one pass over ``V**k`` entries.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .world import sequence_index


def _sizes(num_sequences: int, seq_len: int) -> int:
    """Vocabulary size ``V`` from ``V**T`` and ``T``; refuse inconsistent tables."""
    vocab = round(num_sequences ** (1.0 / seq_len))
    if vocab**seq_len != num_sequences:
        raise ValueError(f"a table of {num_sequences} sequences is not V**T for seq_len={seq_len}")
    return vocab


def prefix_logprobs(seq_logprobs: torch.Tensor, vocab_size: int, seq_len: int) -> list[torch.Tensor]:
    """``log P(y_≤k)`` for k = 0..T: a list of ``[..., V**k]`` tables (k=0 is ``[..., 1]`` of zeros up to rounding)."""
    levels = [seq_logprobs]
    for _ in range(seq_len):
        last = levels[-1]
        levels.append(last.view(*last.shape[:-1], -1, vocab_size).logsumexp(-1))
    return levels[::-1]


def _conditionals(levels: list[torch.Tensor], vocab_size: int) -> list[torch.Tensor]:
    """``π(v | y_<t)`` for t = 0..T−1 as ``[..., V**t, V]`` tables (uniform on zero-mass prefixes)."""
    out = []
    for k in range(len(levels) - 1):
        child = levels[k + 1].view(*levels[k].shape, vocab_size)
        out.append(torch.softmax(child, dim=-1).nan_to_num(1.0 / vocab_size))
    return out


def prefix_tables(rewards: torch.Tensor, seq_logprobs: torch.Tensor, seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefix masses ``P(y_≤k)`` and values ``Q(y_≤k) = E_π[R | y_≤k]`` for k = 0..T, each ``[..., V**k]``.

    ``Q(y_≤k) = Σ_{y ⊒ y_≤k} π(y)R(y) / Σ_{y ⊒ y_≤k} π(y)``, summed one level at a time; a prefix of
    zero mass (unreachable) gets the plain mean of its children. ``Q_0 = J``, ``Q_T = R``.
    """
    vocab = _sizes(seq_logprobs.shape[-1], seq_len)
    if rewards.shape[-1] != seq_logprobs.shape[-1]:
        raise ValueError(f"rewards has {rewards.shape[-1]} entries but seq_logprobs has {seq_logprobs.shape[-1]}")
    rewards = rewards.to(seq_logprobs.dtype)
    masses = [seq_logprobs.exp()]
    weighted = masses[0] * rewards
    values = [rewards.expand_as(seq_logprobs)]
    for _ in range(seq_len):
        shape = (*masses[-1].shape[:-1], -1, vocab)
        mass, weighted = masses[-1].view(shape).sum(-1), weighted.view(shape).sum(-1)
        fallback = values[-1].reshape(shape).mean(-1)
        values.append(torch.where(mass > 0, weighted / mass.clamp(min=torch.finfo(mass.dtype).tiny), fallback))
        masses.append(mass)
    return masses[::-1], values[::-1]


def prefix_values(rewards: torch.Tensor, seq_logprobs: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """``Q(y_≤k)`` for k = 0..T as ``[..., V**k]`` tables (see :func:`prefix_tables`)."""
    return prefix_tables(rewards, seq_logprobs, seq_len)[1]


def action_values_from_tables(values: list[torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    """``A*_t(v; y) = Q(y_<t, v) − Q(y_<t)`` from prefix values; ``sequences [..., N, T]`` → ``[..., N, T, V]``."""
    seq_len = sequences.shape[-1]
    vocab = values[1].shape[-1]
    index = sequence_index(sequences, vocab)  # [..., N]
    out = []
    for t in range(seq_len):
        prefix = index // vocab ** (seq_len - t)  # flat index of y_<t, [..., N]
        q_next = values[t + 1].view(*values[t].shape, vocab)  # [..., V**t, V]
        q_here = q_next.gather(-2, prefix.unsqueeze(-1).expand(*prefix.shape, vocab))  # [..., N, V]
        v_here = values[t].gather(-1, prefix)  # [..., N]
        out.append(q_here - v_here.unsqueeze(-1))
    return torch.stack(out, dim=-2)


def action_values(rewards: torch.Tensor, seq_logprobs: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Exact advantage of every alternative at every prefix of the given sequences.

    ``A*_t(v; y) = Q(y_<t, v) − V(y_<t)`` with ``V(y_<t) = Q(y_<t)``.

    Args:
        rewards: ``[V**T]`` reward table.
        seq_logprobs: ``[..., V**T]`` log-probability of every sequence.
        sequences: ``[..., N, T]`` LongTensor.
    Returns:
        ``[..., N, T, V]``.
    """
    return action_values_from_tables(prefix_values(rewards, seq_logprobs, sequences.shape[-1]), sequences)


def advantages(rewards: torch.Tensor, seq_logprobs: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Exact per-token advantage ``A*_t(y) = Q(y_≤t) − V(y_<t)`` of sequences ``[..., N, T]`` → ``[..., N, T]``.

    Telescopes: ``Σ_t A*_t(y) = R(y) − J``; ``E_π[A*_t] = 0``. Works for any autoregressive policy.
    """
    return action_values(rewards, seq_logprobs, sequences).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)


def expected_reward(rewards: torch.Tensor, seq_logprobs: torch.Tensor) -> torch.Tensor:
    """``J = Σ_y π(y)·R(y)``, ``[...]``."""
    return (seq_logprobs.exp() * rewards.to(seq_logprobs.dtype)).sum(-1)


def sequence_entropy(seq_logprobs: torch.Tensor) -> torch.Tensor:
    """``H(Y) = −Σ_y π(y) log π(y)`` in nats, ``[...]``."""
    p = seq_logprobs.exp()
    return -(torch.where(p > 0, p * seq_logprobs, torch.zeros_like(p))).sum(-1)


def position_entropies(seq_logprobs: torch.Tensor, vocab_size: int, seq_len: int) -> torch.Tensor:
    """``E_{y_<t}[H(π(· | y_<t))]`` for each position t, ``[..., T]`` (nats)."""
    levels = prefix_logprobs(seq_logprobs, vocab_size, seq_len)
    cond = _conditionals(levels, vocab_size)
    out = []
    for t in range(seq_len):
        h = -(torch.where(cond[t] > 0, cond[t] * cond[t].log(), torch.zeros_like(cond[t]))).sum(-1)
        out.append((levels[t].exp() * h).sum(-1))
    return torch.stack(out, dim=-1)


def token_entropy(seq_logprobs: torch.Tensor, vocab_size: int, seq_len: int) -> torch.Tensor:
    """Mean per-position conditional entropy ``(1/T)·Σ_t E[H(π(·|y_<t))]`` in nats (max ln V), ``[...]``.

    By the chain rule this equals ``H(Y)/T``; it is computed from the conditionals all the same.
    """
    return position_entropies(seq_logprobs, vocab_size, seq_len).mean(-1)


def kl_divergence(seq_logprobs_p: torch.Tensor, seq_logprobs_q: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q) = Σ_y p(y)(log p(y) − log q(y))`` in nats, ``[...]``."""
    p = seq_logprobs_p.exp()
    return torch.where(p > 0, p * (seq_logprobs_p - seq_logprobs_q), torch.zeros_like(p)).sum(-1)


def reward_and_gradient(
    rewards: torch.Tensor, params: torch.Tensor, seq_logprobs_fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(J [...], ∇_θ J, seq_logprobs [..., V**T])`` by differentiating ``J = Σ_y exp(log π_θ(y))·R(y)``
    through the enumeration (runs stay independent: their ``J`` values are summed)."""
    theta = params.detach().requires_grad_(True)
    with torch.enable_grad():
        logp = seq_logprobs_fn(theta)
        J = expected_reward(rewards, logp)
        (grad,) = torch.autograd.grad(J.sum(), theta)
    return J.detach(), grad, logp.detach()


def reward_gradient(
    rewards: torch.Tensor, params: torch.Tensor, seq_logprobs_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Exact ``∇_θ J(θ)``, shaped like ``params``; ``seq_logprobs_fn(params)`` returns ``[..., V**T]``."""
    return reward_and_gradient(rewards, params, seq_logprobs_fn)[1]


def credit_scale(rewards: torch.Tensor, seq_len: int) -> float:
    """RMS of the counterfactual contributions ``c_t(v; y) = R(y|y_t:=v) − mean_v' R(y|y_t:=v')`` over all y, t, v."""
    vocab = _sizes(rewards.shape[-1], seq_len)
    table = rewards.double().view(*(vocab,) * seq_len)
    var = sum(table.var(dim=t, unbiased=False).mean() for t in range(seq_len)) / seq_len
    return math.sqrt(float(var))


# ----------------------------------------------------------------------------- chain policies (the tabular ones)
def chain_tables(rewards: torch.Tensor, conditionals: torch.Tensor, markov: bool, *, full_masses: bool = True
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefix masses ``P(y_≤k)`` and values ``Q(y_≤k)`` for k = 0..T (``[runs, V**k]`` each), as :func:`prefix_tables`
    gives them, for a policy whose next-token distribution depends only on the position and the previous token
    (``full_masses=False``: masses for k = 0..T−1 only, all that :func:`chain_gradient` needs; it saves the largest table).
    ``rewards`` is one table ``[V**T]`` for every run, or each run's own ``[runs, V**T]``.

    ``conditionals [runs, T, C, V]`` is ``π_t(v | c)`` with context ``c = y_{t−1}`` (``markov``, t ≥ 1; C = V) or
    ``c = 0`` (position 0, or a factored policy; C = 1). Two passes, each ``≈ V**T·V/(V−1)`` products:

    - backward: ``Q_T = R``, ``Q_k(p) = Σ_v π_k(v | ctx(p))·Q_{k+1}(p·v)``;
    - forward: ``P_0 = 1``, ``P_{k+1}(p·v) = P_k(p)·π_k(v | ctx(p))``,

    with ``ctx(p)`` the last token of prefix ``p`` (flat index ``p mod V``). No sequence log-probability is built or
    exponentiated; a prefix of zero mass still gets its value under the policy.
    """
    runs, T, _, V = conditionals.shape
    rewards = rewards.to(conditionals.dtype)
    if rewards.shape[-1] != V**T:
        raise ValueError(f"rewards has {rewards.shape[-1]} entries but V**T = {V**T} for the conditionals' V={V}, T={T}")
    if rewards.dim() == 2 and rewards.shape[0] != runs:
        raise ValueError(f"rewards has tables for {rewards.shape[0]} runs but the conditionals have {runs}")
    per_run = rewards if rewards.dim() == 2 else rewards.unsqueeze(0).expand(runs, -1)  # [runs, V**T]
    shared = runs == 1 or per_run.stride(0) == 0  # one table for every run: lay it out once

    def step(table: torch.Tensor, k: int) -> torch.Tensor:  # [runs or 1, V**(k+1)] viewed with its last token split off
        if markov and k >= 1:
            return table.reshape(table.shape[0], -1, V, V), conditionals[:, k].unsqueeze(1)  # [., V**(k-1), c, v], [R, 1, c, v]
        return table.reshape(table.shape[0], -1, V), conditionals[:, k, :1]  # [., V**k, v], [R, 1, v]

    # The last position first: Q_{T−1}(p) = Σ_v π(v | ctx(p))·R(p·v) is a matrix product per run with its reward table,
    # never a [runs, V**T] table of products; the calls have the same shapes for every run, so a run's bits do not depend
    # on how many runs share the tensor (a product over the runs axis would). Shallower levels are V× smaller.
    if markov and T >= 2:
        layout = lambda r: r.view(-1, V, V).transpose(0, 1).contiguous()  # noqa: E731 — [c, V**(T−2), v]
        tables = [layout(per_run[0])] * runs if shared else [layout(r) for r in per_run]
        last = torch.stack([torch.bmm(table, pi.unsqueeze(-1)).squeeze(-1).T for table, pi in zip(tables, conditionals[:, T - 1])])  # [R, a, c]
    else:
        last = torch.stack([r.view(-1, V) @ pi for r, pi in zip(per_run, conditionals[:, T - 1, 0])])  # [R, V**(T−1)]
    values = [last.reshape(runs, -1)]
    for k in range(T - 2, -1, -1):
        q, pi = step(values[0], k)
        values.insert(0, (q * pi).sum(-1).reshape(runs, -1))
    values.append(per_run)
    masses = [torch.ones(runs, 1, dtype=conditionals.dtype)]
    for k in range(T if full_masses else T - 1):
        last = masses[-1]
        if markov and k >= 1:
            nxt = last.view(runs, -1, V, 1) * conditionals[:, k].unsqueeze(1)  # [R, V**(k-1), c, v]
        else:
            nxt = last.view(runs, -1, 1) * conditionals[:, k, :1]  # [R, V**k, v]
        masses.append(nxt.reshape(runs, -1))
    return masses, values


def chain_marginals(conditionals: torch.Tensor, markov: bool) -> torch.Tensor:
    """``P(ctx_t = c)`` ``[runs, T, C]``: the distribution of each position's context (a ``C``-state Markov chain)."""
    runs, T, C, V = conditionals.shape
    out = [torch.zeros(runs, C, dtype=conditionals.dtype).index_fill_(1, torch.tensor([0]), 1.0)]
    for t in range(T - 1):
        out.append(torch.einsum("rc,rcv->rv", out[-1], conditionals[:, t]) if markov else out[-1])
    return torch.stack(out, 1)


def chain_gradient(masses: list[torch.Tensor], values: list[torch.Tensor], conditionals: torch.Tensor, markov: bool) -> torch.Tensor:
    """Exact ``∂J/∂ℓ_t(v | c)`` ``[runs, T, C, V]`` of a chain policy with logits ``ℓ`` (softmax per position and context):

    ``Σ_{y_<t with ctx c} P(y_<t)·π_t(v|c)·(Q(y_<t v) − Q(y_<t))`` = ``π_t(v|c)·(Σ_p P_t(p)·Q_{t+1}(p·v) − Σ_p P_t(p)·Q_t(p))``
    summed over the prefixes ``p`` of context ``c``, from :func:`chain_tables` (masses for k ≤ T−1 suffice). Divide by the
    temperature for ``∂J/∂θ``.
    """
    runs, T, C, V = conditionals.shape
    grad = conditionals.new_zeros(runs, T, C, V)
    for t in range(T):
        if markov and t >= 1:
            P = masses[t].view(runs, -1, V)  # [R, V**(t−1), c]
            q_here = values[t].view(runs, -1, V)
            if t == T - 1:  # Q_T = R, each run's table: a product per run (see chain_tables)
                tables = values[T].view(runs, -1, V, V).transpose(1, 2)  # [R, c, V**(t−1), v]
                weighted = torch.stack([torch.bmm(p.T.unsqueeze(1), table).squeeze(1) for p, table in zip(P, tables)])  # [R, c, v]
            else:
                weighted = torch.einsum("rac,racv->rcv", P, values[t + 1].view(runs, -1, V, V))
            grad[:, t] = conditionals[:, t] * (weighted - (P * q_here).sum(1).unsqueeze(-1))
        else:
            P, q_next, q_here = masses[t].view(runs, -1), values[t + 1].view(runs, -1, V), values[t].view(runs, -1)
            grad[:, t, 0] = conditionals[:, t, 0] * (torch.einsum("ra,rav->rv", P, q_next) - (P * q_here).sum(1, keepdim=True))
    return grad
