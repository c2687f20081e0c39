"""Shared-prefix forwards: rows that begin with the same tokens run those tokens once.

A batch row is ``[left padding | context | completion | right padding]``. Rows whose contexts start
alike — the ``G`` completions of one prompt (the student), or teacher contexts that share the chat
template, the prompt and often the demonstration — form a *run*. Each run's common prefix is computed
once (``U`` rows) and its key/value cache indexed out to the run's rows; each row then runs only the
rest of its context and its completion. Gradients flow back through the indexed
cache and sum over the run, so outputs and gradients equal the plain forward's up to float rounding,
for ``Σ_runs S + Σ_rows (C_i − S + T)`` instead of ``B·(C + T)`` token positions.
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
    prefix_ids: torch.Tensor  # [U, S] left-padded shared prefixes (rows alone all point at one empty row)
    prefix_mask: torch.Tensor  # [U, S]
    suffix_ids: torch.Tensor  # [B, R+T] left-padded rest of each context, then the row's T completion columns
    suffix_mask: torch.Tensor  # [B, R+T]


def _common_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _best_runs(ctx: list[list[int]], max_run: int) -> tuple[list[list[int]], list[int]]:
    """Rows in lexicographic order of their contexts, cut into runs maximising the saved positions
    ``Σ_runs (n_r − 1)·s_r``, ``s_r`` = the run's common prefix, capped so each row keeps its last context
    token (dynamic programme over cut points, runs of at most ``max_run`` rows). Returns runs and their ``s_r``."""
    order = sorted(range(len(ctx)), key=lambda i: ctx[i])
    common = [0] + [_common_length(ctx[order[k - 1]], ctx[order[k]]) for k in range(1, len(order))]
    best, cut = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):  # best[j]: the best saving over the first j rows (in sorted order)
        s = len(ctx[order[j - 1]]) - 1
        best[j], cut[j] = best[j - 1], j - 1  # row j-1 alone
        for i in range(j - 2, max(-1, j - 1 - max_run), -1):  # run = sorted rows i .. j-1
            s = min(s, common[i + 1], len(ctx[order[i]]) - 1)
            if s <= 0:
                break
            if best[i] + (j - 1 - i) * s > best[j]:
                best[j], cut[j] = best[i] + (j - 1 - i) * s, i
    runs, shared, j = [], [], len(order)
    while j > 0:
        i = cut[j]
        rows = order[i:j]
        runs.append(sorted(rows))
        shared.append(0 if len(rows) == 1 else min(min(common[i + 1:j]), min(len(ctx[r]) - 1 for r in rows)))
        j = i
    return runs[::-1], shared[::-1]


def plan_shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, max_run: int = 64) -> Optional[PrefixPlan]:
    """Split ``input_ids [B, C+T]`` (contexts left-padded in the first ``C`` columns, completions in the last
    ``T = num_tokens``) into runs of rows sharing leading context tokens (see :func:`_best_runs`). Each row
    keeps at least its last context token in its suffix (its output predicts the first completion token).
    Returns None when no two rows share a prefix or the context padding is not on the left.
    """
    B, L = input_ids.shape
    C = L - num_tokens
    ctx_mask = attention_mask[:, :C]
    lengths = ctx_mask.sum(-1)
    if C < 2 or not torch.equal(ctx_mask, (torch.arange(C, device=ctx_mask.device) >= C - lengths.unsqueeze(-1)).to(ctx_mask.dtype)):
        return None
    rows_ctx = input_ids[:, :C].tolist()
    lengths = lengths.tolist()
    ctx = [row[C - n:] for row, n in zip(rows_ctx, lengths)]
    runs, shared = _best_runs(ctx, max_run)
    if all(s == 0 for s in shared):
        return None
    kept = [k for k, sh in enumerate(shared) if sh]  # runs with a prefix; all rows alone share one empty prefix row
    prefix_row = {k: u for u, k in enumerate(kept)}
    empty = len(kept) if len(kept) < len(runs) else None
    S = max(shared)
    R = max(len(ctx[i]) - shared[k] for k, rows in enumerate(runs) for i in rows)
    prefix_ids = input_ids.new_zeros((len(kept) + (empty is not None), S))  # padding is masked: its id does not matter
    prefix_mask = torch.zeros_like(prefix_ids, dtype=attention_mask.dtype)
    suffix_ids = input_ids.new_zeros((B, R + num_tokens))
    suffix_mask = torch.zeros_like(suffix_ids, dtype=attention_mask.dtype)
    run = torch.empty(B, dtype=torch.long, device=input_ids.device)
    for k, (rows, s) in enumerate(zip(runs, shared)):
        u = prefix_row.get(k, empty)
        if s:
            prefix_ids[u, S - s:] = torch.tensor(ctx[rows[0]][:s])
            prefix_mask[u, S - s:] = 1
        for i in rows:
            rest = ctx[i][s:]
            suffix_ids[i, R - len(rest):R] = torch.tensor(rest)
            suffix_mask[i, R - len(rest):R] = 1
            run[i] = u
    suffix_ids[:, R:] = input_ids[:, C:]
    suffix_mask[:, R:] = attention_mask[:, C:]
    return PrefixPlan(run, prefix_ids, prefix_mask, suffix_ids, suffix_mask)


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
