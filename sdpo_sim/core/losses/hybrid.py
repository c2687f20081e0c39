"""Hybrid SDPO + REINFORCE: importance-ratio truncation, the mixture, and alpha_mix controllers.

Controllers hold their state as tensors so one controller steers many independent runs at once
(``alpha_mix`` of shape ``[runs]`` in the toy world, ``[]`` in the LLM trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ._checks import check_choice, check_unit_interval

CONTROLLERS = ("constant", "divergence", "entropy")
Number = Union[float, torch.Tensor]


def truncated_importance_weight(logp: torch.Tensor, behaviour_logp: torch.Tensor, clip: float = 2.0) -> torch.Tensor:
    """Detached truncated importance ratio ``min(π_θ(y)/π_old(y), clip)`` per token ``[..., T]``.

    Used to reweight the distillation loss when rollouts are reused (official SDPO: clip 2).
    """
    if clip <= 0:
        raise ValueError(f"clip={clip!r} must be > 0")
    return torch.exp(logp.detach() - behaviour_logp.detach()).clamp(max=clip)


def hybrid_loss(sdpo: torch.Tensor, reinforce: torch.Tensor, alpha_mix: Number) -> torch.Tensor:
    """``alpha_mix·L_SDPO + (1 − alpha_mix)·L_REINFORCE``; gradients mix with the same weights."""
    if not isinstance(alpha_mix, torch.Tensor):
        check_unit_interval("alpha_mix", alpha_mix)
    elif alpha_mix.numel() and ((alpha_mix < 0) | (alpha_mix > 1)).any():
        raise ValueError("alpha_mix must lie in [0, 1]")
    return alpha_mix * sdpo + (1 - alpha_mix) * reinforce


@dataclass
class AlphaController:
    """State and rule for ``alpha_mix``.

    - ``constant``: ``alpha_mix = init``;
    - ``divergence``: ``alpha_mix = sigmoid((D̄ − τ)/(τ/3))``, ``D̄`` the batch-mean teacher–student
      divergence: lean on the teacher while it has something to say;
    - ``entropy``: ``alpha_mix ← clip(alpha_mix + gain·(H − H*), 0, 1)``: less distillation when
      per-token entropy ``H`` falls below the target ``H*`` (guards against mode collapse).
    """

    kind: str = "constant"
    init: float = 0.5
    tau: float = 0.1
    entropy_target: Optional[float] = None
    gain: float = 0.5
    alpha: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_choice("controller", self.kind, CONTROLLERS)
        check_unit_interval("alpha_mix", self.init)
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau!r} (divergence threshold) must be > 0")
        if self.kind == "entropy" and (self.entropy_target is None or self.entropy_target < 0):
            raise ValueError("controller='entropy' needs entropy_target ≥ 0 (target per-token entropy, nats)")
        if self.gain < 0:
            raise ValueError(f"gain={self.gain!r} must be ≥ 0")

    def value(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Current ``alpha_mix`` (``init`` before the first update), broadcast to ``shape``."""
        if self.alpha is None:
            self.alpha = torch.full(shape, float(self.init))
        return self.alpha

    def update(self, divergence: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance one step from this batch's statistics (shape ``[runs]`` or ``[]``); returns alpha_mix."""
        if self.kind == "constant":
            ref = divergence if divergence is not None else entropy
            return self.value(() if ref is None else tuple(ref.shape))
        if self.kind == "divergence":
            if divergence is None:
                raise ValueError("controller='divergence' needs the batch-mean teacher–student divergence")
            self.alpha = torch.sigmoid((divergence.detach().float() - self.tau) / (self.tau / 3.0))
            return self.alpha
        if entropy is None:
            raise ValueError("controller='entropy' needs the current per-token entropy")
        current = self.value(tuple(entropy.shape))
        self.alpha = (current + self.gain * (entropy.detach().float() - self.entropy_target)).clamp(0.0, 1.0)
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = state["alpha"]
