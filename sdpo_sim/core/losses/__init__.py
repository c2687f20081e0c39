"""The one loss library of sdpo-lab, shared by the toy world and the LLM path.

Pure torch; it knows nothing about reward tables or transformers. Shapes are ``[..., V]`` for
distributions and ``[..., B, T]`` for per-token losses of a batch of completions.
"""

from .distill import (
    OBJECTIVES,
    SUPPORTS,
    divergence,
    forward_cross_entropy,
    sdpo_token_loss,
    topk_logprobs,
)
from .fused import default_chunk_size, fused_linear_sdpo_loss
from .hybrid import (
    CONTROLLERS,
    AlphaController,
    hybrid_loss,
    truncated_importance_weight,
)
from .policy_gradient import (
    LOSS_TYPES,
    SCALES,
    aggregate,
    group_advantages,
    policy_gradient_token_loss,
)
from .variants import (
    GATES,
    PROMPT_WEIGHTS,
    TOKEN_WEIGHTS,
    advantage_blend_token_loss,
    blended_advantages,
    distill_schedule,
    group_success_rate,
    positive_advantage_gate,
    reference_anchor,
    reference_kl,
    routed_token_loss,
    success_std_weight,
    teacher_confidence_weight,
    token_entropy,
)

__all__ = [
    "SUPPORTS", "OBJECTIVES", "SCALES", "LOSS_TYPES", "CONTROLLERS", "GATES", "PROMPT_WEIGHTS", "TOKEN_WEIGHTS",
    "divergence", "forward_cross_entropy", "sdpo_token_loss", "topk_logprobs",
    "fused_linear_sdpo_loss", "default_chunk_size",
    "group_advantages", "policy_gradient_token_loss", "aggregate",
    "truncated_importance_weight", "hybrid_loss", "AlphaController",
    "blended_advantages", "advantage_blend_token_loss", "routed_token_loss", "teacher_confidence_weight", "token_entropy",
    "group_success_rate", "success_std_weight", "positive_advantage_gate", "distill_schedule",
    "reference_kl", "reference_anchor",
]
