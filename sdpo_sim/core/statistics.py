"""Per-token statistics of a student and its teacher, one definition for both worlds' metrics."""

from __future__ import annotations

from typing import Optional

import torch

from .losses import divergence


@torch.no_grad()
def token_statistics(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], tokens: torch.Tensor, alpha: float,
                     *, with_entropy: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token ``(entropy, divergence, distillation signal)``, each ``[...]``, from logits ``[..., V]`` and the sampled
    tokens ``[...]`` (computed in float32 or wider):

    - entropy ``H_t = −Σ_v π_θ(v) log π_θ(v)`` (``None`` with ``with_entropy=False``);
    - divergence ``D_α(π_θ ‖ π_T)`` over the full vocabulary, the method's α (:func:`~sdpo_sim.core.losses.divergence`);
    - the distillation signal ``log π_T(y_t) − log π_θ(y_t)``: what the SDPO update pushes each sampled token by
      (the teacher's credit for it, lag between teacher and student weights included).

    Without a teacher (``teacher_logits=None``) only the entropy is computed.
    """
    s_logp = torch.log_softmax(student_logits.float(), -1)
    entropy = -(s_logp.exp() * s_logp).sum(-1) if with_entropy else None
    if teacher_logits is None:
        return entropy, None, None
    t_logp = torch.log_softmax(teacher_logits.float(), -1)
    y = tokens.unsqueeze(-1)
    return entropy, divergence(s_logp, t_logp, alpha), (t_logp.gather(-1, y) - s_logp.gather(-1, y)).squeeze(-1)
