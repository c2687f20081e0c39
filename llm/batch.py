"""A step's rollouts as tensors: the :class:`Batch`, row packing, row selection and merging micro-batch statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    """One step's rollouts on this process. ``B`` completions, ``T`` = longest completion.

    Student rows are ``[left-padded prompt | completion | right padding]``; teacher rows the same
    with the teacher context in place of the prompt.
    """

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    teacher_input_ids: torch.Tensor  # [B, C+T]
    teacher_attention_mask: torch.Tensor  # [B, C+T]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] float, 1 on real completion tokens
    distill_mask: torch.Tensor  # [B] float, 1 when the completion has a teacher context
    judged: torch.Tensor  # [B] float, 1 when the judge returned a verdict
    advantages: torch.Tensor  # [B]
    old_logp: Optional[torch.Tensor] = None  # [B, T] behaviour log-probs (set when rollouts are reused)
    success: Optional[torch.Tensor] = None  # [B] bool, score ≥ context.success_threshold (srpo, success_std; else None)
    distill_weight: Optional[torch.Tensor] = None  # [B] detached per-completion distillation weight (gate, prompt weight, schedule)
    ref_logp: Optional[torch.Tensor] = None  # [B, T] log π_ref(y_t) of the reference (initial) policy (ref_beta, ref_anchor)

    def split(self, size: int) -> list["Batch"]:
        """Micro-batches of at most ``size`` completions (``size`` 0: the whole batch)."""
        n = self.completion_ids.shape[0]
        if not size or size >= n:
            return [self]
        return [Batch(**{f: (None if getattr(self, f) is None else getattr(self, f)[i:i + size]) for f in self.__dataclass_fields__})
                for i in range(0, n, size)]


def pack_rows(prefixes: list[list[int]], completions: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[left-padded prefix | right-padded completion]`` ids and attention mask, ``[B, P+T]``."""
    p_len = max(len(p) for p in prefixes)
    t_len = max(len(c) for c in completions)
    ids = torch.full((len(prefixes), p_len + t_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prefixes, completions)):
        ids[i, p_len - len(p):p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len:p_len + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, p_len - len(p):p_len + len(c)] = 1
    return ids.to(device), mask.to(device)


def select_rows(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows [b]`` of a left-padded batch ``ids``/``mask [B, L]``, without the leading columns none of them
    uses: ``[b, L']``. The whole batch as it is when ``rows`` are all of its rows."""
    if rows.numel() == ids.shape[0]:
        return ids, mask
    ids, mask = ids[rows], mask[rows]
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else 0
    return ids[:, start:], mask[:, start:]



def merge_stats(parts: list[dict]) -> dict:
    """Statistics of a batch from those of its micro-batches: sums add, per-row tensors concatenate."""
    out = dict(parts[0])
    for stats in parts[1:]:
        for k, v in stats.items():
            out[k] = torch.cat([out[k], v]) if isinstance(v, torch.Tensor) else out[k] + v if k != "alpha_mix" else v
    return out
