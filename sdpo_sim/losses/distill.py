"""Self-distillation losses: the divergence family and SDPO's per-token loss.

Everything works on any leading batch shape ``[..., V]``; the teacher side never receives gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_same_shape, check_unit_interval

SUPPORTS = ("full", "topk", "sampled")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Compute dtype for losses: bf16/fp16 are upcast to fp32; fp32 and fp64 are kept (never downcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last axis; 0·log 0 taken as 0."""
    p = logp.exp()
    # The where sits inside the product so that masked (−inf) tokens give zero gradient, not NaN.
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(p))).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence between student and teacher, per position.

    ``alpha = 0``: forward KL(p_t‖p_s); ``alpha = 1``: reverse KL(p_s‖p_t); in between:
    ``(1−α)·KL(p_s‖m) + α·KL(p_t‖m)`` with ``m = (1−α)·p_s + α·p_t`` (official SDPO / TRL convention).

    Args:
        student_logp, teacher_logp: normalised log-probabilities ``[..., V]``.
        alpha: divergence index in [0, 1].
    Returns:
        ``[...]`` divergence values (nats).
    """
    check_unit_interval("alpha", alpha)
    check_same_shape("student_logp", student_logp, "teacher_logp", teacher_logp)
    if alpha == 0.0:
        return _kl(teacher_logp, student_logp)
    if alpha == 1.0:
        return _kl(student_logp, teacher_logp)
    # log m = log((1−α)·p_s + α·p_t); −inf (masked) entries are clamped so that m's gradient stays finite.
    lo = torch.finfo(student_logp.dtype).min
    log_m = torch.logsumexp(
        torch.stack([student_logp.clamp(min=lo) + math.log(1.0 - alpha), teacher_logp.clamp(min=lo) + math.log(alpha)]), dim=0
    )
    return (1.0 - alpha) * _kl(student_logp, log_m) + alpha * _kl(teacher_logp, log_m)


def _with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """Append the tail bucket log(1 − Σ_k p_k) to top-k log-probabilities ``[..., K] → [..., K+1]``."""
    log_mass = torch.logsumexp(topk_logp, dim=-1, keepdim=True)
    # log(1 − exp(x)) computed stably; clamp keeps it finite when the top-k holds all the mass.
    log_tail = torch.log(-torch.expm1(log_mass.clamp(max=-1e-7)))
    return torch.cat([topk_logp, log_tail], dim=-1)


def topk_logprobs(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, topk: int, add_tail: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both distributions to the student's top-k tokens.

    Indices come from the student; the teacher is gathered at the same indices. With ``add_tail``
    the remaining mass becomes one extra bucket (``[..., K+1]``); otherwise both are renormalised
    over the K tokens (``[..., K]``).
    """
    idx = student_logp.detach().topk(topk, dim=-1).indices
    s, t = student_logp.gather(-1, idx), teacher_logp.gather(-1, idx)
    if add_tail:
        return _with_tail(s), _with_tail(t)
    return s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)


def sdpo_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 1.0,
    support: str = "full",
    topk: Optional[int] = None,
    add_tail: bool = True,
    tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SDPO's per-token distillation loss ``D(student_t, stopgrad(teacher_t))``, unreduced.

    Args:
        student_logits, teacher_logits: ``[..., V]`` logits (teacher is detached here).
        alpha: divergence index (see :func:`divergence`).
        support: ``"full"`` vocabulary, ``"topk"`` (student's top-k, tail bucket or renormalised),
            or ``"sampled"``: ``stopgrad(log p_s(y) − log p_t(y)) · log p_s(y)``, whose gradient is
            an unbiased one-sample estimate of the reverse-KL gradient (needs ``tokens``, ``alpha=1``).
        topk: K for ``support="topk"`` (1 ≤ K ≤ V).
        add_tail: keep the remaining mass as a tail bucket (else renormalise the top-k).
        tokens: ``[...]`` LongTensor of sampled tokens, for ``support="sampled"``.
    Returns:
        ``[...]`` per-token loss.
    """
    check_choice("support", support, SUPPORTS)
    check_unit_interval("alpha", alpha)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    s_logp = F.log_softmax(upcast(student_logits), dim=-1)
    t_logp = F.log_softmax(upcast(teacher_logits.detach()), dim=-1)
    vocab = s_logp.shape[-1]
    if support == "full":
        return divergence(s_logp, t_logp, alpha)
    if support == "topk":
        if topk is None or not isinstance(topk, int) or not (1 <= topk <= vocab):
            raise ValueError(f"topk={topk!r} must be an integer in [1, V={vocab}] when support='topk'")
        return divergence(*topk_logprobs(s_logp, t_logp, topk, add_tail), alpha)
    # support == "sampled"
    if tokens is None:
        raise ValueError("support='sampled' needs tokens: the sampled token ids, shape [...] = logits.shape[:-1]")
    if alpha != 1.0:
        raise ValueError(f"support='sampled' estimates reverse KL only and needs alpha=1.0, got alpha={alpha!r}")
    if tokens.shape != s_logp.shape[:-1]:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}; it must be logits.shape[:-1] = {tuple(s_logp.shape[:-1])}")
    s_tok = s_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    t_tok = t_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (s_tok - t_tok).detach() * s_tok
