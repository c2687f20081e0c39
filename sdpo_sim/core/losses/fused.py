"""SDPO loss from hidden states and the LM-head weight, chunk by chunk (``[N, V]`` never exists).

Forward computes, for each chunk of ``chunk_size`` tokens, the student and teacher logits, the
per-token loss of :func:`sdpo_token_loss`, and the gradient of the chunk's loss with respect to its
logits; that gradient is pushed at once into ``dL/dh = g·W`` and ``dL/dW += gᵀ·h`` and the chunk's
logits are freed. For the full-vocabulary KL endpoints (alpha 0 or 1) that gradient has a closed form
(:func:`_kl_and_logit_grad`); every other mode differentiates :func:`sdpo_token_loss` by autograd, chunk
by chunk. Backward only scales the stored gradients by the incoming gradient. Peak extra
memory is a few ``[chunk_size, V]`` buffers plus one ``[V, H]`` gradient, independent of ``N``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .distill import sdpo_token_loss, upcast


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so one ``[chunk, V]`` fp32 buffer is about 32 MiB (at least 8 rows).

    Measured on CPU (benchmarks/bench_fused_loss.py, V=32768): 32 MiB buffers beat 16 MiB ones in both
    time (half as many dL/dW passes over the [V, H] accumulator) and peak memory (glibc serves blocks
    ≥ 32 MiB by mmap and returns them on free, so the heap does not grow between chunks).
    """
    return max(8, (1 << 23) // max(1, vocab_size))


def _kl_and_logit_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL and its gradient w.r.t. the student logits ``[n, V]``, for the two KL endpoints.

    alpha=1, reverse KL(p_s‖p_t): ``∂/∂z = p_s ⊙ (log p_s − log p_t − KL)``;
    alpha=0, forward KL(p_t‖p_s): ``∂/∂z = p_s − p_t``. Same values as :func:`sdpo_token_loss`.
    """
    s = torch.log_softmax(student_logits, dim=-1)
    t = torch.log_softmax(teacher_logits, dim=-1)
    p = s.exp()
    if alpha == 1.0:
        diff = s.sub_(t)  # reuse the buffer: log p_s − log p_t
        kl = (p * diff).sum(-1)
        return kl, p.mul_(diff.sub_(kl.unsqueeze(-1)))
    q = t.exp()
    kl = (q * (t - s)).sum(-1)
    return kl, p.sub_(q)


class _FusedLinearSDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, weight, teacher_hidden, teacher_weight, mask, tokens, token_weights, opts):
        alpha, support, topk, add_tail, chunk_size, objective = opts
        acc_dtype = torch.promote_types(student_hidden.dtype, torch.float32)  # fp64 stays fp64, bf16 → fp32
        n_sel = mask.sum().clamp(min=1).to(acc_dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(student_hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc_dtype, device=student_hidden.device)
        w = weight.detach()
        tw = w if teacher_weight is None else teacher_weight.detach()
        for start in range(0, student_hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            m = mask[sl]
            if not bool(m.any()):
                continue
            h = student_hidden[sl].detach()
            scale = m.to(acc_dtype) if token_weights is None else m.to(acc_dtype) * token_weights[sl].to(acc_dtype)
            if support == "full" and alpha in (0.0, 1.0):
                # closed-form gradient w.r.t. the logits: no autograd graph over [chunk, V] buffers
                with torch.no_grad():
                    t_logits = upcast(teacher_hidden[sl].detach() @ tw.T)
                    per_tok, g = _kl_and_logit_grad(upcast(h @ w.T), t_logits, alpha)
                    if objective == "forward_ce":  # H×(p_T, p_θ) = KL(p_T‖p_θ) + H(p_T): the same logit gradient
                        t_logp = torch.log_softmax(t_logits, -1)
                        per_tok -= (t_logp.exp() * t_logp).sum(-1)
                        del t_logp
                    chunk_loss = (per_tok * scale).sum() / n_sel
                    g.mul_((scale / n_sel).unsqueeze(-1))
                    total += chunk_loss
                    if need_h:
                        grad_h[sl] = (g @ w.to(g.dtype)).to(grad_h.dtype)
                    if need_w:
                        grad_w.addmm_(g.T.to(acc_dtype), h.to(acc_dtype))
                del per_tok, g, t_logits
                continue
            captured: list[torch.Tensor] = []
            with torch.enable_grad():
                # The logits hang off a small leaf (this chunk's hidden rows) and nothing keeps a reference to
                # them, so autograd frees the [chunk, V] buffer right after the log-softmax; a hook hands over
                # their gradient g for dL/dW, and differentiating w.r.t. the leaf gives dL/dh = g·W.
                h_leaf = h.requires_grad_(True)
                logits = upcast(h_leaf @ w.T)
                logits.register_hook(captured.append)
                with torch.no_grad():
                    t_logits = upcast(teacher_hidden[sl].detach() @ tw.T)
                per_tok = sdpo_token_loss(
                    logits, t_logits, alpha=alpha, support=support, topk=topk, add_tail=add_tail, objective=objective,
                    tokens=None if tokens is None else tokens[sl],
                )
                del logits, t_logits
                chunk_loss = (per_tok * scale).sum() / n_sel
                (g_h,) = torch.autograd.grad(chunk_loss, h_leaf)
            total += chunk_loss.detach()
            if need_h:
                grad_h[sl] = g_h
            if need_w:
                grad_w.addmm_(captured[0].T.to(acc_dtype), h.to(acc_dtype))  # dL/dW += gᵀ·h, inside the GEMM
            del per_tok, g_h, captured
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None


def fused_linear_sdpo_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_weight: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    support: str = "full",
    topk: Optional[int] = None,
    add_tail: bool = True,
    chunk_size: Optional[int] = None,
    tokens: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    objective: str = "alpha",
) -> torch.Tensor:
    """Mean SDPO token loss over the tokens selected by ``mask``, from hidden states.

    Equals ``(sdpo_token_loss(h_s @ Wᵀ, h_t @ W_tᵀ, ...) * mask * token_weights).sum() / mask.sum()``
    with exact gradients for ``student_hidden`` and ``weight``; the teacher gets none.

    Args:
        student_hidden: ``[N, H]`` student final hidden states.
        teacher_hidden: ``[N, H]`` teacher final hidden states (same tokens, teacher context).
        weight: ``[V, H]`` LM-head weight of the student.
        mask: ``[N]`` bool/0-1, tokens that count.
        teacher_weight: ``[V, H]`` teacher LM head (default: ``weight``, detached).
        alpha, support, topk, add_tail, objective: as :func:`sdpo_token_loss`.
        chunk_size: tokens per chunk (default: :func:`default_chunk_size`).
        tokens: ``[N]`` sampled token ids (``support="sampled"``).
        token_weights: ``[N]`` detached per-token weights, e.g. truncated importance ratios.
    Returns:
        scalar loss.
    """
    if student_hidden.dim() != 2 or teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must both be [N, H]"
        )
    n, hdim = student_hidden.shape
    if weight.dim() != 2 or weight.shape[1] != hdim:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; it must be [V, H={hdim}]")
    if teacher_weight is not None and teacher_weight.shape != weight.shape:
        raise ValueError(f"teacher_weight has shape {tuple(teacher_weight.shape)}; it must equal weight's {tuple(weight.shape)}")
    if mask.shape != (n,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be [N={n}]")
    for name, t in (("tokens", tokens), ("token_weights", token_weights)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be [N={n}]")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    # Validate option combinations once, on a tiny slice, so errors name the argument before any work.
    sdpo_token_loss(
        torch.zeros(1, weight.shape[0]), torch.zeros(1, weight.shape[0]), alpha=alpha, support=support, objective=objective,
        topk=topk, add_tail=add_tail, tokens=None if tokens is None else tokens[:1].cpu(),
    )
    return _FusedLinearSDPO.apply(
        student_hidden, weight, teacher_hidden, teacher_weight, mask.bool(), tokens, token_weights,
        (alpha, support, topk, add_tail, chunk_size, objective),
    )
