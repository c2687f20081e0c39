"""The one loss library of sdpo-lab, shared by the toy world and the LLM path.

Pure torch; it knows nothing about reward tables or transformers. Shapes are ``[..., V]`` for
distributions and ``[..., B, T]`` for per-token losses of a batch of completions.
"""

from .distill import SUPPORTS, divergence, sdpo_token_loss, topk_logprobs
from .fused import default_chunk_size, fused_linear_sdpo_loss
from .hybrid import CONTROLLERS, AlphaController, hybrid_loss, truncated_importance_weight
from .policy_gradient import LOSS_TYPES, SCALES, aggregate, group_advantages, policy_gradient_token_loss

__all__ = [
    "SUPPORTS", "SCALES", "LOSS_TYPES", "CONTROLLERS",
    "divergence", "sdpo_token_loss", "topk_logprobs",
    "fused_linear_sdpo_loss", "default_chunk_size",
    "group_advantages", "policy_gradient_token_loss", "aggregate",
    "truncated_importance_weight", "hybrid_loss", "AlphaController",
]
