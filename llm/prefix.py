"""Shared-prefix forwards: rows that begin with the same tokens run those tokens once.

A batch row is ``[left padding | context | completion | right padding]``. Rows whose contexts start
alike — the ``G`` completions of one prompt (the student), or teacher contexts that share the chat
template, the prompt and often the demonstration — share a prefix. Each shared prefix is computed once
(``U`` rows) and its key/value cache indexed out to the rows that begin with it; each row then runs only
the rest of its context and its completion. Gradients flow back through the indexed cache and sum over
those rows, so outputs and gradients equal the plain forward's up to float rounding.
Both forwards are padded batches, so the cost is ``U·S + B·(R + T)`` positions (``S`` the longest shared
prefix, ``R`` the longest rest of a context) instead of ``B·(C + T)``; the prefixes are chosen to minimise
it, and a batch where sharing would not pay runs the plain forward.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PrefixPlan:
    """How a ``[B, C+T]`` batch splits into ``U`` shared prefixes and ``B`` per-row suffixes."""

    run: torch.Tensor  # [B] each row's prefix row (in 0..U-1)
    prefix_ids: torch.Tensor  # [U, S] left-padded shared prefixes (one may be empty: rows that need none)
    prefix_mask: torch.Tensor  # [U, S]
    suffix_ids: torch.Tensor  # [B, R+T] left-padded rest of each context, then the row's T completion columns
    suffix_mask: torch.Tensor  # [B, R+T]


def _common_lengths(ctx: list[list[int]]) -> list[list[int]]:
    """Pairwise common-prefix lengths of the contexts, ``[B][B]``: adjacent rows in lexicographic order are
    compared token by token, and any other pair's common prefix is the least one between them in that order."""
    B = len(ctx)
    order = sorted(range(B), key=lambda i: ctx[i])
    adjacent = []
    for a, b in zip(order, order[1:]):
        n = 0
        for x, y in zip(ctx[a], ctx[b]):
            if x != y:
                break
            n += 1
        adjacent.append(n)
    common = [[len(c) if i == j else 0 for j in range(B)] for i, c in enumerate(ctx)]
    for k in range(B):
        least = None
        for m in range(k + 1, B):
            least = adjacent[m - 1] if least is None else min(least, adjacent[m - 1])
            common[order[k]][order[m]] = common[order[m]][order[k]] = least
    return common


def _prefix_nodes(lengths: list[int], common: list[list[int]], rest: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The fewest shared prefixes leaving every row at most ``rest`` context tokens for its suffix.

    Row ``i`` (context length ``L_i``) can use any prefix of its own context of depth ``d`` with
    ``L_i − rest ≤ d ≤ L_i − 1`` (it keeps its last context token); depth 0 is the empty prefix. That is a
    vertical path in the trie of contexts, and the fewest trie nodes hitting every path are found greedily:
    take rows by decreasing lowest usable depth, and give a row no chosen node hits a new node at that depth
    (any path through a node below it passes through it too). Returns nodes ``(depth, row whose context
    it is a prefix of)`` and each row's node.
    """
    top = [max(n - rest, 0) for n in lengths]
    nodes: list[tuple[int, int]] = []
    node_of = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -top[i]):
        u = next((u for u, (d, r) in enumerate(nodes) if top[i] <= d < lengths[i] and common[i][r] >= d), None)
        if u is None:
            nodes.append((top[i], i))
            u = len(nodes) - 1
        node_of[i] = u
    return nodes, node_of


MAX_RESTS = 64  # rests tried per batch: every candidate when there are no more, else an even grid, refined


def _best_prefixes(ctx: list[list[int]], width: int, num_tokens: int) -> Optional[tuple[list[tuple[int, int]], list[int]]]:
    """Shared prefixes minimising the positions the two forwards compute, padding included: ``U·S`` for ``U``
    prefix rows of width ``S`` (the deepest prefix) plus ``B·(R + T)`` for the suffixes (``R`` the longest
    rest of a context). Only at some rests ``R`` can :func:`_prefix_nodes` change — a context length minus a
    common-prefix length, a context length minus one, or zero — so those are the candidates; all are tried
    when there are at most ``MAX_RESTS`` (then the plan is optimal), else an even grid of them, and the best
    grid point is moved to the first rest needing no more prefixes (``U(R)`` never grows with ``R``, and at a
    fixed ``U`` the cost ``U·(L_max − R) + B·(R + T)`` grows with ``R``). None unless the best beats the
    plain forward's ``B·(width + T)``."""
    B, lengths = len(ctx), [len(c) for c in ctx]
    common = _common_lengths(ctx)
    cuts = {c for row in common for c in row} | {n - 1 for n in lengths} | {0}
    longest = max(lengths)
    rests = sorted({n - a for n in lengths for a in cuts if 1 <= n - a < longest})
    grid = sorted({k * len(rests) // MAX_RESTS for k in range(MAX_RESTS)}) if len(rests) > MAX_RESTS else range(len(rests))
    best, best_cost, best_at = None, B * (width + num_tokens), None

    def improves(k: int) -> bool:
        nonlocal best, best_cost, best_at
        nodes, node_of = _prefix_nodes(lengths, common, rests[k])
        cost = len(nodes) * max(d for d, _ in nodes) + B * (rests[k] + num_tokens)
        if cost >= best_cost:
            return False
        best, best_cost, best_at = (nodes, node_of), cost, k
        return True

    previous = -1
    for k in grid:
        if B * (rests[k] + num_tokens) >= best_cost:
            break  # from here on the suffixes alone cost more
        if improves(k):
            start = previous + 1  # the grid point before the new best: its level starts after it
        previous = k
    if best_at is not None and len(rests) > MAX_RESTS:  # the first rest since the grid point before with as few prefixes
        u, lo, hi = len(best[0]), start, best_at
        while lo < hi:
            mid = (lo + hi) // 2
            if len(_prefix_nodes(lengths, common, rests[mid])[0]) <= u:
                hi = mid
            else:
                lo = mid + 1
        if lo < best_at:
            improves(lo)
    return best


def plan_shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int) -> Optional[PrefixPlan]:
    """Split ``input_ids [B, C+T]`` (contexts left-padded in the first ``C`` columns, completions in the last
    ``T = num_tokens``) into shared prefixes and per-row suffixes (see :func:`_best_prefixes`). Each row
    keeps at least its last context token in its suffix (its output predicts the first completion token).
    Returns None when sharing would not compute fewer positions than the plain forward, or the context
    padding is not on the left.
    """
    B, L = input_ids.shape
    C = L - num_tokens
    ctx_mask = attention_mask[:, :C]
    lengths = ctx_mask.sum(-1)
    if C < 2 or not torch.equal(ctx_mask, (torch.arange(C, device=ctx_mask.device) >= C - lengths.unsqueeze(-1)).to(ctx_mask.dtype)):
        return None
    rows_ctx = input_ids[:, :C].tolist()
    ctx = [row[C - n:] for row, n in zip(rows_ctx, lengths.tolist())]
    best = _best_prefixes(ctx, C, num_tokens)
    if best is None:
        return None
    nodes, node_of = best
    S = max(d for d, _ in nodes)
    R = max(len(ctx[i]) - nodes[u][0] for i, u in enumerate(node_of))
    prefix_ids = input_ids.new_zeros((len(nodes), S))  # padding is masked: its id does not matter
    prefix_mask = torch.zeros_like(prefix_ids, dtype=attention_mask.dtype)
    suffix_ids = input_ids.new_zeros((B, R + num_tokens))
    suffix_mask = torch.zeros_like(suffix_ids, dtype=attention_mask.dtype)
    for u, (d, r) in enumerate(nodes):
        if d:
            prefix_ids[u, S - d:] = torch.tensor(ctx[r][:d])
            prefix_mask[u, S - d:] = 1
    for i, u in enumerate(node_of):
        rest = ctx[i][nodes[u][0]:]
        suffix_ids[i, R - len(rest):R] = torch.tensor(rest)
        suffix_mask[i, R - len(rest):R] = 1
    suffix_ids[:, R:] = input_ids[:, C:]
    suffix_mask[:, R:] = attention_mask[:, C:]
    return PrefixPlan(torch.tensor(node_of, device=input_ids.device), prefix_ids, prefix_mask, suffix_ids, suffix_mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch: each row counts its real tokens from 0 (``[B, L]``)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The forward keyword that takes a key/value cache: ``cache`` (transformers ≥ 5.24, which deprecates the
    old name for removal in 5.40, where it would be silently swallowed by ``**kwargs``) or ``past_key_values``.
    Read off the transformers model class, under a DDP (``.module``) or PEFT (``get_base_model``) wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return _cache_keyword_of(type(model))


def shared_prefix_outputs(model, plan: PrefixPlan, num_tokens: int, *, hidden: bool) -> torch.Tensor:
    """Logits ``[B, T, V]`` (or final hidden states ``[B, T, H]``) at the positions predicting the last
    ``T = num_tokens`` tokens, from one forward over the ``U`` shared prefixes and one over the suffixes."""
    prefix = model(input_ids=plan.prefix_ids, attention_mask=plan.prefix_mask, position_ids=positions(plan.prefix_mask),
                   use_cache=True, logits_to_keep=1)
    cache = getattr(prefix, "cache", None)  # the output's field took the same new name
    if cache is None:
        cache = prefix.past_key_values
    cache.batch_select_indices(plan.run)  # [U, ...] → [B, ...]; differentiable indexing
    mask = torch.cat([plan.prefix_mask[plan.run], plan.suffix_mask], 1)[:, :-1]
    S = plan.prefix_ids.shape[1]
    out = model(input_ids=plan.suffix_ids[:, :-1], attention_mask=mask, position_ids=positions(mask)[:, S:],
                use_cache=False, logits_to_keep=1 if hidden else num_tokens, output_hidden_states=hidden,
                **{cache_keyword(model): cache})
    return out.hidden_states[-1][:, -num_tokens:] if hidden else out.logits
