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
OBJECTIVES = ("alpha", "forward_ce")  # the alpha family D_α, or the forward cross-entropy (Distributional DAgger)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Compute dtype for losses: bf16/fp16 are upcast to fp32; fp32 and fp64 are kept (never downcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _Finite(torch.autograd.Function):
    """Clamp −inf log-probabilities (masked tokens) to the most negative float; gradient passes straight through.

    exp() of the clamped value is still exactly 0, but differences such as ``log p − log q`` stay finite, so
    values and gradients never become NaN. Every term of a divergence that depends on a clamped entry is
    multiplied by its probability 0, so its incoming gradient is exactly 0 and passing it through unchanged is
    exact (and skips the masked backward of an ordinary clamp).
    """

    @staticmethod
    def forward(ctx, logp: torch.Tensor) -> torch.Tensor:
        return logp.clamp(min=torch.finfo(logp.dtype).min)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _finite(logp: torch.Tensor) -> torch.Tensor:
    return _Finite.apply(logp) if logp.requires_grad else logp.clamp(min=torch.finfo(logp.dtype).min)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last axis, for finite (see :class:`_Finite`) inputs."""
    return torch.linalg.vecdot(logp.exp(), logp - logq)  # one fused multiply-and-sum pass


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
    s, t = _finite(student_logp), _finite(teacher_logp)
    if alpha == 0.0:
        return _kl(t, s)
    if alpha == 1.0:
        return _kl(s, t)
    log_m = torch.logaddexp(s + math.log(1.0 - alpha), t + math.log(alpha))  # log((1−α)·p_s + α·p_t)
    return (1.0 - alpha) * _kl(s, log_m) + alpha * _kl(t, log_m)


def forward_cross_entropy(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Forward cross-entropy ``H×(p_T, p_θ) = −Σ_v p_T(v)·log p_θ(v)`` per position (Distributional DAgger, arXiv 2606.05152).

    ``= KL(p_T‖p_θ) + H(p_T)``: with the teacher detached its gradient is the forward KL's (``alpha = 0``), its value
    larger by the teacher's entropy. Args: normalised log-probabilities ``[..., V]``. Returns ``[...]`` nats.
    """
    check_same_shape("student_logp", student_logp, "teacher_logp", teacher_logp)
    s, t = _finite(student_logp), _finite(teacher_logp)
    return -torch.linalg.vecdot(t.exp(), s)


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
    objective: str = "alpha",
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
        objective: ``"alpha"`` (the divergence family) or ``"forward_ce"``: :func:`forward_cross_entropy` over the same
            support (full, or top-k buckets); it needs ``alpha=0`` (the forward direction) and a full or top-k support.
    Returns:
        ``[...]`` per-token loss.
    """
    check_choice("support", support, SUPPORTS)
    check_unit_interval("alpha", alpha)
    check_choice("objective", objective, OBJECTIVES)
    if objective == "forward_ce" and (support == "sampled" or alpha != 0.0):
        raise ValueError(f"objective='forward_ce' needs alpha=0.0 and support 'full' or 'topk', got alpha={alpha!r}, support={support!r}")
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    s_logp = F.log_softmax(upcast(student_logits), dim=-1)
    t_logp = F.log_softmax(upcast(teacher_logits.detach()), dim=-1)
    vocab = s_logp.shape[-1]
    loss = forward_cross_entropy if objective == "forward_ce" else lambda s, t: divergence(s, t, alpha)
    if support == "full":
        return loss(s_logp, t_logp)
    if support == "topk":
        if topk is None or not isinstance(topk, int) or not (1 <= topk <= vocab):
            raise ValueError(f"topk={topk!r} must be an integer in [1, V={vocab}] when support='topk'")
        return loss(*topk_logprobs(s_logp, t_logp, topk, add_tail))
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
