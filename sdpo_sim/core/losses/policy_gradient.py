"""REINFORCE / GRPO: group advantages, the clipped policy-gradient token loss, token aggregation."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_choice

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("token_mean", "sequence_mean", "dr_grpo")
STD_EPS = 1e-4  # TRL's constant in (r − mean) / (std + eps)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages ``A_i = (r_i − mean_group(r)) / (std + 1e-4)``.

    Args:
        rewards: ``[..., B]`` with consecutive blocks of ``group_size`` completions of one prompt.
        group_size: completions per prompt (``num_generations``); must divide ``B``.
        scale: ``"group"`` divides by the group's std, ``"batch"`` by the std over the last axis,
            ``"none"`` keeps the centred reward (Dr.GRPO). Stds are unbiased, as in TRL.
    Returns:
        ``[..., B]`` advantages.
    """
    check_choice("scale", scale, SCALES)
    n = rewards.shape[-1]
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive integer dividing the batch size {n}")
    grouped = rewards.reshape(*rewards.shape[:-1], n // group_size, group_size)
    centred = (grouped - grouped.mean(-1, keepdim=True)).reshape(rewards.shape)
    if scale == "group":
        std = grouped.std(-1, keepdim=True).expand_as(grouped).reshape(rewards.shape) if group_size > 1 else torch.zeros_like(rewards)
        return centred / (std + STD_EPS)
    if scale == "batch":
        std = rewards.std(-1, keepdim=True) if n > 1 else torch.zeros_like(rewards[..., :1])
        return centred / (std + STD_EPS)
    return centred


def policy_gradient_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: Optional[torch.Tensor] = None,
    *,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
) -> torch.Tensor:
    """Clipped policy-gradient loss per token: ``−min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A)``.

    ``ρ = exp(logp − old_logp)``; without ``old_logp`` the rollout is on-policy (``ρ = 1`` in value,
    gradient ``−A·∇logp``: plain REINFORCE).

    Args:
        logp: ``[..., T]`` log-probabilities of the taken tokens under the current policy.
        advantages: ``[...]`` per-completion or ``[..., T]`` per-token advantages.
        old_logp: ``[..., T]`` behaviour log-probabilities, or ``None``.
    Returns:
        ``[..., T]`` per-token loss.
    """
    if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilon={epsilon!r} and epsilon_high={epsilon_high!r} must be ≥ 0")
    if advantages.shape == logp.shape[:-1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; it must be logp.shape[:-1]={tuple(logp.shape[:-1])} "
            f"or logp.shape={tuple(logp.shape)}"
        )
    old = logp.detach() if old_logp is None else old_logp.detach()
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + (epsilon if epsilon_high is None else epsilon_high))
    return -torch.minimum(ratio * advantages, clipped * advantages)


def aggregate(
    token_loss: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    loss_type: str = "token_mean",
    max_completion_length: Optional[int] = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[..., B, T]`` to a scalar.

    - ``token_mean``: Σ loss·mask / Σ mask over every token of the batch (TRL ``dapo``/``bnpo``);
    - ``sequence_mean``: mean over completions of each completion's token mean (TRL ``grpo``);
    - ``dr_grpo``: Σ loss·mask / (number of completions · ``max_completion_length``), a constant
      normaliser (Dr.GRPO); ``max_completion_length`` defaults to ``T``.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if mask is None:
        mask = torch.ones_like(token_loss)
    elif mask.shape != token_loss.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but token_loss has shape {tuple(token_loss.shape)}")
    mask = mask.to(token_loss.dtype)
    if loss_type == "token_mean":
        return (token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "sequence_mean":
        per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.mean()
    length = token_loss.shape[-1] if max_completion_length is None else max_completion_length
    return (token_loss * mask).sum() / (token_loss[..., 0].numel() * length)
