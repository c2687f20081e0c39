"""The shared loss on transformer outputs: logits ``[B, T, V]``, or final hidden states ``[B, T, H]`` with the LM head
(the fused path, chunk by chunk). Every loss itself comes from :mod:`sdpo_sim.core.losses`."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from sdpo_sim.core.losses import (
    aggregate,
    default_chunk_size,
    fused_linear_sdpo_loss,
    reference_anchor,
    reference_kl,
    sdpo_token_loss,
)
from sdpo_sim.core.method import MethodConfig
from sdpo_sim.core.statistics import token_statistics


def per_token_sdpo_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, completion_ids: torch.Tensor, method: MethodConfig) -> torch.Tensor:
    """SDPO's per-token loss ``D(student_t, stopgrad(teacher_t))`` of a batch, ``[B, T]``, from ``[B, T, V]`` logits
    (already divided by the temperature); ``D`` is ``method.distill_loss``'s (the alpha divergence, or the forward
    cross-entropy). Unreduced and unmasked: the function to compare with peers."""
    return sdpo_token_loss(student_logits, teacher_logits, alpha=method.alpha, support=method.support, topk=method.topk,
                           add_tail=method.add_tail, tokens=completion_ids, objective=method.distill_loss)


def fused_token_weights(mask: torch.Tensor, loss_type: str, max_len: int) -> torch.Tensor:
    """Weights ``w [B, T]`` with ``Σ loss·mask·w / Σ mask == aggregate(loss, mask, loss_type, max_len)``."""
    n_sel = mask.sum().clamp(min=1.0)
    if loss_type == "token_mean":
        return torch.ones_like(mask)
    if loss_type == "sequence_mean":
        return (n_sel / (mask.sum(-1, keepdim=True).clamp(min=1.0) * mask.shape[0])).expand_as(mask)
    return torch.full_like(mask, float(n_sel) / (mask.shape[0] * max_len))  # dr_grpo


def sdpo_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    method: MethodConfig,
    *,
    max_len: int,
    weight: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The SDPO term, reduced by ``method.loss_type`` over ``mask [B, T]``.

    Unfused: ``student``/``teacher`` are logits ``[B, T, V]``. Fused (``weight`` given): they are final
    hidden states ``[B, T, H]`` (already divided by the temperature) and ``weight [V, H]`` the LM head;
    ``fused_linear_sdpo_loss`` computes the same value chunk by chunk, never holding ``[B·T, V]``.
    ``token_weights [B, T]`` (detached), e.g. truncated importance ratios or the variants' distillation weights,
    multiply the per-token loss; the normaliser stays ``mask``'s (a weight-0 token still counts, as in the toy world).
    ``method.distill_loss`` picks the per-token loss on both paths.
    """
    if weight is None:
        per_tok = per_token_sdpo_loss(student, teacher, completion_ids, method)
        if token_weights is not None:
            per_tok = per_tok * token_weights
        return aggregate(per_tok, mask, method.loss_type, max_len)
    w = fused_token_weights(mask, method.loss_type, max_len)
    if token_weights is not None:
        w = w * token_weights
    h = student.shape[-1]
    return fused_linear_sdpo_loss(
        student.reshape(-1, h), teacher.reshape(-1, h), weight, mask.reshape(-1), teacher_weight=teacher_weight,
        alpha=method.alpha, support=method.support, topk=method.topk, add_tail=method.add_tail, chunk_size=chunk_size,
        tokens=completion_ids.reshape(-1), token_weights=w.reshape(-1).detach(), objective=method.distill_loss,
    )


def reference_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, method: MethodConfig, *, max_len: int,
                   old_logp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference-policy terms of any method, each aggregated by ``method.loss_type`` over ``mask [B, T]`` as the toy
    world adds them (``sdpo_sim/train.py``): ``ref_beta·aggregate(k_t) + ref_anchor·aggregate(a_t)``, with ``k_t`` TRL's
    k3 KL (times ``ρ_t`` with ``use_bias_correction_kl``; :func:`~sdpo_sim.core.losses.reference_kl`) and ``a_t`` SDPG's
    anchor (:func:`~sdpo_sim.core.losses.reference_anchor`); a term whose coefficient is 0 is not computed.

    Args:
        logp: ``[B, T]`` ``log π_θ(y_t)`` (with gradient).
        ref_logp: ``[B, T]`` ``log π_ref(y_t)`` (detached inside the core functions).
        old_logp: ``[B, T]`` the sampling policy's log-probabilities when rollouts are reused (else on-policy).
    Returns:
        ``[]`` the loss.
    """
    loss = logp.new_zeros(())
    if method.ref_beta > 0:
        kl = reference_kl(logp, ref_logp, old_logp, bias_correction=method.use_bias_correction_kl)
        loss = loss + method.ref_beta * aggregate(kl, mask, method.loss_type, max_len)
    if method.ref_anchor > 0:
        loss = loss + method.ref_anchor * aggregate(reference_anchor(logp, ref_logp), mask, method.loss_type, max_len)
    return loss


def _chunk_token_logp(h: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((h @ weight.T).float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def chunk_rows(vocab_size: int, chunk_size: Optional[int] = None) -> int:
    """Token rows per ``[rows, V]`` block of logits: ``chunk_size``, or the fused loss's
    :func:`~sdpo_sim.core.losses.default_chunk_size` (about 32 MiB of float32 per block), so that the statistics, the
    log-probabilities and the loss never hold a larger block than the loss's own."""
    if chunk_size is None:
        return default_chunk_size(vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (training.chunk_size), or None for the default")
    return chunk_size


def token_logprobs(student: torch.Tensor, completion_ids: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """``log π(y_t)`` ``[B, T]`` from logits ``[B, T, V]``, or from hidden states ``[B, T, H]`` and the LM head
    ``weight [V, H]`` chunk by chunk (:func:`chunk_rows` tokens per chunk; recomputed in backward, so no block larger
    than ``[chunk, V]`` exists)."""
    if weight is None:
        return torch.log_softmax(student.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    b, t, h = student.shape
    rows = chunk_rows(weight.shape[0], chunk_size)
    flat, toks = student.reshape(-1, h), completion_ids.reshape(-1)
    parts = [checkpoint(_chunk_token_logp, flat[s:s + rows], weight, toks[s:s + rows], use_reentrant=False)
             for s in range(0, flat.shape[0], rows)]
    return torch.cat(parts).reshape(b, t)


@torch.no_grad()
def token_stats(student: torch.Tensor, teacher: Optional[torch.Tensor], completion_ids: torch.Tensor, alpha: float,
                weight: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``entropy``, teacher–student ``divergence`` (full vocabulary, the method's alpha) and the credit
    ``log p_T(y_t) − log p_θ(y_t)``, each ``[B, T]`` (float32, on CPU); divergence and credit are 0 without a teacher.

    From logits ``[B, T, V]``, or from hidden states ``[B, T, H]`` and the LM heads ``weight`` / ``teacher_weight``
    ``[V, H]`` (default: ``weight``). Either way one ``[chunk, V]`` block of logits at a time, ``chunk``
    = :func:`chunk_rows` (the fused loss's chunk size), so the statistics hold no more than the loss does
    (:mod:`sdpo_sim.core.statistics` defines each statistic).
    """
    b, t = completion_ids.shape
    s_rows = student.reshape(b * t, -1)
    t_rows = None if teacher is None else teacher.reshape(b * t, -1)
    vocab = s_rows.shape[1] if weight is None else weight.shape[0]
    rows = chunk_rows(vocab, chunk_size)
    toks = completion_ids.reshape(-1)
    ent, div, ratio = (torch.zeros(b * t) for _ in range(3))
    tw = weight if teacher_weight is None else teacher_weight
    for s in range(0, b * t, rows):
        sl = slice(s, s + rows)
        s_logits = s_rows[sl] if weight is None else s_rows[sl] @ weight.T
        t_logits = None if t_rows is None else (t_rows[sl] if weight is None else t_rows[sl] @ tw.T)
        e, d, r = token_statistics(s_logits, t_logits, toks[sl], alpha)
        del s_logits, t_logits  # the next chunk's logits must not meet this chunk's
        ent[sl] = e.cpu()
        if d is not None:
            div[sl], ratio[sl] = d.cpu(), r.cpu()
    return ent.reshape(b, t), div.reshape(b, t), ratio.reshape(b, t)
