"""The field's SDPO variants as per-token pieces that both worlds compose (docs/variants.md has each one's source).

Every function is pure torch on independent leading dimensions: the toy world passes ``[runs, B, T, V]`` logits,
``[runs, B, T]`` per-token and ``[runs, B]`` per-completion tensors, the LLM path ``[B, T, V]``, ``[B, T]`` and ``[B]``.
Completions come in consecutive groups of ``group_size`` (one prompt each). Nothing here reads a reward table.

- advantage blend (SDPO paper): :func:`blended_advantages`, :func:`advantage_blend_token_loss`;
- SRPO-style routing: :func:`routed_token_loss` with :func:`teacher_confidence_weight`;
- SC-SDPO-style weighting: :func:`success_std_weight` (from :func:`group_success_rate`);
- SDPG-style gating: :func:`positive_advantage_gate`, :func:`distill_schedule`, :func:`reference_anchor`;
- KL to a reference policy (TRL's k3): :func:`reference_kl`;
- forward cross-entropy distillation lives with the alpha family (``distill.forward_cross_entropy``).

The detached weights (gate, prompt weight, token weight, schedule) multiply the per-token distillation loss, so they
apply unchanged to the fused path's ``token_weights``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_same_shape, check_unit_interval
from .distill import upcast
from .policy_gradient import policy_gradient_token_loss

GATES = ("none", "positive_advantage")
PROMPT_WEIGHTS = ("uniform", "success_std")
TOKEN_WEIGHTS = ("uniform", "teacher_confidence")


def _grouped(x: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    """``[..., B] → [..., B/G, G]``, refusing a group size that does not divide ``B``."""
    n = x.shape[-1]
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive integer dividing {name}'s last dimension {n}")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def positive_advantage_gate(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """SDPG-style gate ``g_i = 1[r_i > mean_group(r)]`` per completion, ``[..., B] → [..., B]`` (0./1., scores' dtype).

    ``r_i > mean_group(r)`` is GRPO's ``A_i > 0`` under every ``scale_rewards`` (the scale is positive). A group whose
    scores are all equal gates every member off: its advantages are 0, not the sign of a rounding error of its mean.
    """
    g = _grouped(scores, group_size, "scores")
    above = (g > g.mean(-1, keepdim=True)) & (g.amax(-1, keepdim=True) > g.amin(-1, keepdim=True))
    return above.to(scores.dtype if scores.is_floating_point() else torch.float32).reshape(scores.shape)


def group_success_rate(success: torch.Tensor, group_size: int) -> torch.Tensor:
    """``p_g``, the share of successful completions in each completion's group, ``[..., B] (bool) → [..., B]`` (float32)."""
    if success.dtype != torch.bool:
        raise ValueError(f"success must be a bool tensor [..., B] (which completions succeeded), got dtype {success.dtype}")
    g = _grouped(success, group_size, "success").float()
    return g.mean(-1, keepdim=True).expand_as(g).reshape(success.shape)


def success_std_weight(success: torch.Tensor, group_size: int) -> torch.Tensor:
    """SC-SDPO-style prompt weight ``w_i = sqrt(p_g·(1 − p_g))``, ``p_g`` the success rate of completion i's group.

    The standard deviation of the group's success indicator: 0 for a group that all passed or all failed, at most 0.5
    (``p = 1/2``). Not renormalised: the distillation term shrinks where groups are uniform. ``[..., B] → [..., B]``.
    """
    p = group_success_rate(success, group_size)
    return (p * (1.0 - p)).sqrt()


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy ``H = −Σ_v p(v) log p(v)`` of ``softmax(logits)``, ``[..., V] → [...]``, detached, fp32 or wider."""
    logp = torch.log_softmax(upcast(logits.detach()), -1)
    return -(logp.exp() * logp).sum(-1)


def teacher_confidence_weight(teacher_entropy: torch.Tensor, mask: torch.Tensor,
                              mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SRPO-style entropy-aware token weight ``w_t = exp(−H_T,t) / mean_masked(exp(−H_T))``, detached.

    ``H_T,t`` is the teacher's entropy at position t (:func:`token_entropy` of the teacher logits): a confident
    (low-entropy) distillation target weighs more, an uncertain one less; the mean weight over the ``mask`` tokens of
    each leading index is 1, so the rule moves weight between tokens without rescaling the term.

    Args:
        teacher_entropy: ``[..., B, T]`` nats.
        mask: ``[..., B, T]`` tokens that carry the distillation term (the normaliser's tokens).
        mean: the normaliser ``mean_masked(exp(−H_T))`` ``[...]`` when it must come from a larger batch (an LLM
            batch split over micro-batches or processes); default: this batch's.
    Returns:
        ``[..., B, T]`` weights (0 where ``mask`` is 0).
    """
    check_same_shape("teacher_entropy", teacher_entropy, "mask", mask)
    conf = torch.exp(-teacher_entropy.detach())
    m = mask.to(conf.dtype)
    if mean is None:
        mean = (conf * m).sum((-2, -1)) / m.sum((-2, -1)).clamp(min=1.0)
    return conf * m / mean.to(conf.dtype).clamp(min=torch.finfo(conf.dtype).tiny)[..., None, None]


def distill_schedule(step: int, total_steps: int, warmup_steps: int = 0, decay_steps: int = 0) -> float:
    """SDPG-style multiplier of the distillation weight at update ``step`` (0-based) of ``total_steps``.

    ``s(k) = min(1, k / W) · (k ≥ S − D ? (S − k) / D : 1)``: linear warm-up 0 → 1 over the first ``W = warmup_steps``
    updates, linear decay to 0 over the last ``D = decay_steps`` (a 0 switches either off). The rule of the SDPG code's
    ``_compute_effective_beta`` (lauyikfung/SDPG, ``verl/trainer/ppo/core_algos.py``).
    """
    for name, value, lo in (("step", step, 0), ("total_steps", total_steps, 1), ("warmup_steps", warmup_steps, 0),
                            ("decay_steps", decay_steps, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"distill_schedule: {name}={value!r} must be an integer ≥ {lo}")
    factor = 1.0
    if warmup_steps and step < warmup_steps:
        factor = step / warmup_steps
    if decay_steps and step >= total_steps - decay_steps:
        factor *= max(total_steps - step, 0) / decay_steps
    return factor


def reference_kl(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: Optional[torch.Tensor] = None, *,
                 bias_correction: bool = True) -> torch.Tensor:
    """TRL's per-token KL to the reference policy: the k3 estimator ``k_t = exp(r − l) − (r − l) − 1`` with
    ``l = log π_θ(y_t)``, ``r = log π_ref(y_t)`` (detached), times the ratio ``ρ_t = exp(l − l_old)`` with
    ``bias_correction`` (TRL's ``use_bias_correction_kl``, its default). ``[..., B, T]`` → ``[..., B, T]``.

    ``l_old`` is the sampling policy's log-probability (``old_logp``; ``l`` detached, i.e. on-policy, when ``None``),
    so ``ρ_t`` is 1 in value on-policy but not in gradient. In expectation over ``y_t ~ π_θ`` (the sampled prefix held
    fixed; both tested by enumeration) the value is ``KL(π_θ‖π_ref)`` either way, and the gradient is

    - with ``bias_correction``: ``(l − r)·∇l`` → ``∇ KL(π_θ‖π_ref)``, the reverse KL's;
    - without: ``(1 − π_ref(y_t)/π_θ(y_t))·∇l`` → ``∇ KL(π_ref‖π_θ)``, the *forward* KL's (older TRL releases).
    """
    check_same_shape("logp", logp, "ref_logp", ref_logp)
    d = ref_logp.detach() - logp
    k3 = torch.exp(d) - d - 1.0
    if not bias_correction:
        return k3
    old = logp.detach() if old_logp is None else old_logp.detach()
    check_same_shape("logp", logp, "old_logp", old)
    return k3 * torch.exp(logp - old)


def reference_anchor(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """SDPG-style sampled-token anchor ``½·(log π_θ(y_t) − log π_ref(y_t))²`` (its ``urkl`` mode; ``π_ref`` detached).
    ``[..., B, T]`` → ``[..., B, T]``; the coefficient (SDPG's α) multiplies it outside."""
    check_same_shape("logp", logp, "ref_logp", ref_logp)
    return 0.5 * (logp - ref_logp.detach()) ** 2


def blended_advantages(advantages: torch.Tensor, signal: torch.Tensor, lam: float,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SDPO paper's per-token advantage ``A_t = λ·A_GRPO + (1 − λ)·A_SDPO,t``.

    ``A_SDPO,t = m_t·stopgrad(log p_T(y_t) − log p_θ(y_t))`` (``signal``, any detached weights already multiplied in;
    ``m_t`` the tokens with a teacher). It depends on the sampled token ``y_t``; that is what gives it a gradient in
    expectation: ``E_{y_t ~ π_θ}[A_SDPO,t ∇log π_θ(y_t)] = −∇ KL(π_θ‖p_T)`` at position t. A per-position constant in its
    place (a full-vocabulary divergence ``D_t``) would give ``E[D_t ∇log π_θ(y_t)] = D_t·Σ_v ∇π_θ(v) = 0``.

    Args:
        advantages: ``[..., B]`` per-completion GRPO advantages.
        signal: ``[..., B, T]`` distillation signal.
        lam: λ in [0, 1] (paper: 0.9).
        mask: ``[..., B, T]`` tokens with a teacher (default: all).
    Returns:
        ``[..., B, T]`` advantages, detached.
    """
    check_unit_interval("lam", lam)
    if advantages.shape != signal.shape[:-1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; it must be signal.shape[:-1]={tuple(signal.shape[:-1])}")
    sdpo = signal.detach() if mask is None else signal.detach() * mask.to(signal.dtype)
    return (lam * advantages.detach().unsqueeze(-1) + (1.0 - lam) * sdpo).detach()


def advantage_blend_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    lam: float,
    *,
    distill_mask: torch.Tensor,
    signal: Optional[torch.Tensor] = None,
    distill_tok: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
) -> torch.Tensor:
    """The advantage blend's per-token loss, in one of two forms (give exactly one of ``signal``, ``distill_tok``):

    - **advantage form** (``signal``; the sampled-token support): the paper's equation literally,
      ``−min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε_high)·A_t)`` with ``A_t`` of :func:`blended_advantages`; on-policy its gradient
      is ``−A_t·∇log π_θ(y_t)``;
    - **loss form** (``distill_tok``: a full-vocabulary or top-k divergence per token): the distillation term stays in
      the loss, ``λ·ℓ^PG_t(A_i) + (1 − λ)·m_t·D_t``; its gradient is the expectation over ``y_t`` of the advantage
      form's distillation part (exactly, for the reverse KL), never zero as a per-position constant in ``A`` would be.

    Both are aggregated over every completion token (the paper's single policy-gradient loss), not over the distilled
    tokens only. Any detached weights (importance truncation, gates, schedules) are in ``signal`` / ``distill_tok``.

    Args:
        logp: ``[..., B, T]`` log π_θ(y_t).
        advantages: ``[..., B]`` GRPO advantages.
        lam: λ in [0, 1].
        distill_mask: ``[..., B, T]`` tokens with a teacher.
        signal: ``[..., B, T]`` distillation signal ``log p_T(y_t) − log p_θ(y_t)``.
        distill_tok: ``[..., B, T]`` per-token distillation loss.
        old_logp, epsilon, epsilon_high: as :func:`policy_gradient_token_loss`.
    Returns:
        ``[..., B, T]`` per-token loss.
    """
    if (signal is None) == (distill_tok is None):
        raise ValueError("advantage_blend_token_loss needs exactly one of signal (advantage form) or distill_tok (loss form)")
    check_same_shape("logp", logp, "distill_mask", distill_mask)
    if signal is not None:
        check_same_shape("logp", logp, "signal", signal)
        blended = blended_advantages(advantages, signal, lam, distill_mask)
        return policy_gradient_token_loss(logp, blended, old_logp, epsilon=epsilon, epsilon_high=epsilon_high)
    check_unit_interval("lam", lam)
    check_same_shape("logp", logp, "distill_tok", distill_tok)
    pg = policy_gradient_token_loss(logp, advantages, old_logp, epsilon=epsilon, epsilon_high=epsilon_high)
    return lam * pg + (1.0 - lam) * (distill_tok * distill_mask.to(distill_tok.dtype))


def routed_token_loss(
    pg_tok: torch.Tensor,
    distill_tok: torch.Tensor,
    success: torch.Tensor,
    distill_mask: torch.Tensor,
    completion_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SRPO-style routing: successful completions get the policy-gradient term, failed ones the distillation term.

    ``ℓ_t = s_i·ℓ^PG_t + (1 − s_i)·m_t·ℓ^D_t`` over the mask ``M_t = c_t·(s_i + (1 − s_i)·m_t)``: a failed completion
    without a teacher (``m = 0``) gets no loss. Aggregate ``ℓ`` over ``M`` with the method's ``loss_type``.

    Args:
        pg_tok: ``[..., B, T]`` policy-gradient loss (GRPO advantages).
        distill_tok: ``[..., B, T]`` distillation loss, its weights (e.g. :func:`teacher_confidence_weight`) included.
        success: ``[..., B]`` bool.
        distill_mask: ``[..., B, T]`` tokens with a teacher.
        completion_mask: ``[..., B, T]`` real completion tokens (default: all).
    Returns:
        ``(per_token [..., B, T], mask [..., B, T])``.
    """
    check_same_shape("pg_tok", pg_tok, "distill_tok", distill_tok)
    check_same_shape("pg_tok", pg_tok, "distill_mask", distill_mask)
    if success.dtype != torch.bool or success.shape != pg_tok.shape[:-1]:
        raise ValueError(f"success must be a bool tensor of shape {tuple(pg_tok.shape[:-1])}, got {success.dtype} {tuple(success.shape)}")
    s = success.to(pg_tok.dtype).unsqueeze(-1)
    m = distill_mask.to(pg_tok.dtype)
    c = torch.ones_like(m) if completion_mask is None else completion_mask.to(pg_tok.dtype)
    return s * pg_tok + (1.0 - s) * (m * distill_tok), c * (s + (1.0 - s) * m)
