"""The feedback credit on a transformer: what the feedback context tells the teacher about each completion token.

``feedback_credit_t = log p_T(y_t | context) − log p_T(y_t | prompt)``: the teacher weights reading the completion
after its teacher context (feedback and/or a demonstration) against the same weights reading it after the plain
prompt. It has no teacher lag, unlike the distillation signal the update uses,
``log p_T(y_t | context) − log p_θ(y_t | prompt) = feedback credit + teacher lag`` with
``teacher lag = log p_T(y_t | prompt) − log p_θ(y_t | prompt)`` (zero for a live teacher); the toy world measures the
same two quantities (docs/design.md §3). Measuring it costs one more teacher forward, every
``training.feedback_credit_every`` steps.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .batch import Batch, select_rows
from .losses import token_stats
from .models import teacher_outputs


def feedback_credit(trainer, batch: Batch, rows: torch.Tensor, teacher_out: torch.Tensor, T: int) -> torch.Tensor:
    """Per-token feedback credit ``[len(rows), T]`` of the distilled ``rows`` (``trainer``: a :class:`~llm.trainer.Trainer`;
    ``teacher_out``: the teacher's outputs with its contexts, ``[B, T, V]`` logits or ``[B, T, H]`` hidden states)."""
    plain, teacher_head = teacher_outputs(trainer, *select_rows(batch.input_ids, batch.attention_mask, rows), T)
    weight = teacher_head if teacher_head is not None else (trainer.unwrapped.get_output_embeddings().weight if trainer.fused else None)
    _, _, credit = token_stats(plain.detach(), teacher_out[rows].detach(), batch.completion_ids[rows], trainer.method.alpha,
                               weight=weight, teacher_weight=weight, chunk_size=trainer.training.chunk_size)
    return credit


def credit_metrics(total: Callable[[float], float], stats: dict) -> dict:
    """Means per distilled token over all processes (``total`` sums a number over them): ``feedback_credit``,
    ``distillation_signal`` and ``teacher_lag`` (their difference); NaN where not measured this step."""
    tokens = total(stats.get("distilled_tokens", 0.0))
    signal = total(stats["signal_sum"]) / tokens if "signal_sum" in stats and tokens else math.nan
    credit = total(stats["feedback_credit_sum"]) / tokens if "feedback_credit_sum" in stats and tokens else math.nan
    return {"feedback_credit": credit, "distillation_signal": signal, "teacher_lag": signal - credit}
