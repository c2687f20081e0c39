"""``MethodConfig``: one validated description of a method, shared by the toy world and LLM recipes.

Names follow TRL where TRL has one (``num_generations``, ``temperature``, ``loss_type``,
``epsilon``, ``scale_rewards``). The learning rate is *not* part of it: it does not transfer
between worlds and is tuned per world.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import yaml

from .config_fields import setting
from .io import atomic_write_text
from .losses import (
    CONTROLLERS,
    GATES,
    LOSS_TYPES,
    OBJECTIVES,
    PROMPT_WEIGHTS,
    SCALES,
    SUPPORTS,
    TOKEN_WEIGHTS,
    AlphaController,
    distill_schedule,
    group_advantages,
    positive_advantage_gate,
    success_std_weight,
    teacher_confidence_weight,
)
from .validation import check_bool, check_choice, check_int, check_number

_OWNER = "MethodConfig"  # how messages name a field: MethodConfig.alpha=2.0 ...

METHODS = ("reinforce", "grpo", "sdpo", "hybrid", "blend", "srpo")
DISTILLING = ("sdpo", "hybrid", "blend", "srpo")  # methods with a distillation term
POLICY_GRADIENT = ("reinforce", "grpo", "hybrid", "blend", "srpo")  # methods with a policy-gradient term
GROUP_ADVANTAGES = ("grpo", "blend", "srpo")  # methods whose policy gradient uses GRPO's group advantages
TEACHER_KINDS = ("live", "ema", "frozen", "trust_region")


# Magnitude bounds. Logits are float32: float32 exp overflows past 88.7 nats, and a softmax is one-hot to
# float32's 2**-24 resolution once two logits differ by ln(2**24) = 16.6 nats. A setting that moves a logit
# (or a weight) by far more than that in one step cannot be meant; each bound below says which arithmetic it guards.
# is_clip: the truncated weight min(exp(logp - old_logp), c) multiplies a token's loss; c = 1e3 already lets one
# token outweigh a thousand on-policy ones (ln 1e3 = 6.9 nats of staleness), so a larger cap never binds.
MAX_IS_CLIP = 1e3
# epsilon: the PPO ratio is clipped to [1 - eps, 1 + eps]; eps = 1e3 admits ratios of 1e3 (6.9 nats): larger never binds.
MAX_EPSILON = 1e3
# divergence_tau: the controller is sigmoid((D - tau)/(tau/3)) on a float32 batch mean D (7 significant digits):
# below 1e-6 its slope 3/tau turns float32 rounding of D into a 0/1 switch; a per-token divergence of 1e3 nats is
# ten times float32 exp's whole range (88.7 nats), so a larger threshold is never crossed.
TAU_RANGE = (1e-6, 1e3)
# entropy_gain: alpha_mix in [0, 1] moves by gain·(H - H*) per step; at 1e3 a 1e-3-nat error already swings it fully.
MAX_ENTROPY_GAIN = 1e3
# entropy_target: a per-token entropy is at most ln(vocabulary size), 11.9 nats for 150k tokens (the toy world checks ln V).
MAX_ENTROPY_TARGET = 1e3
# temperature: logits are theta/temperature and Adam moves theta by ~lr per step. At 1e-3 one step at the smallest
# lr of the packaged specs (0.02) moves a logit by 20 nats > 16.6 (one-hot after the first update); at 1e3 the logits
# move by at most lr/1e3 per step, so the policy stays uniform over any step budget.
TEMPERATURE_RANGE = (1e-3, 1e3)
# ref_beta, ref_anchor: coefficients of a per-token penalty next to advantages of order 1 (group-normalised) or rewards
# in [0, 1]; at 1e3 the penalty already outweighs the reward term a thousandfold, so a larger one only pins the policy.
MAX_REF_COEF = 1e3
# The variants' fields (docs/variants.md): a world that has not wired one must refuse it (variants_in_use).
VARIANT_FIELDS = ("blend_lambda", "distill_loss", "distill_prompt_weight", "distill_token_weight", "distill_gate",
                  "distill_warmup_steps", "distill_decay_steps", "ref_beta", "use_bias_correction_kl", "ref_anchor")
# Fields that act on the distillation term only (refused on methods without one).
_DISTILL_ONLY = ("distill_loss", "distill_prompt_weight", "distill_token_weight", "distill_gate", "distill_warmup_steps",
                 "distill_decay_steps")


@dataclass
class MethodConfig:
    """A method's settings (docs/design.md §5). Construct with :meth:`from_dict` from plain mappings."""

    name: str = setting("sdpo", "the method: reinforce (batch-mean baseline), grpo (group-normalised advantages), sdpo (self-distillation from the feedback-conditioned teacher), hybrid (alpha_mix·SDPO + (1 − alpha_mix)·REINFORCE), blend (the SDPO paper's per-token advantage λ·A_GRPO + (1 − λ)·A_SDPO, λ = blend_lambda) or srpo (SRPO-style routing: completions that succeed get the GRPO term, failed ones the distillation term)", choices=METHODS)
    # -- distillation (sdpo, hybrid) --
    alpha: float = setting(1.0, "divergence index in [0, 1] between student and teacher: 0 forward KL, 1 reverse KL, between a generalised JSD")
    support: str = setting("full", "tokens the divergence runs over: full vocabulary, the student's topk (with add_tail) or the sampled token only (needs alpha=1)", choices=SUPPORTS)
    topk: Optional[int] = setting(None, "K for support=topk, at most the vocabulary size (official SDPO: 100); null otherwise")
    add_tail: bool = setting(True, "with support=topk, keep the leftover probability mass as one tail bucket (else renormalise the top K)")
    is_clip: float = setting(2.0, "cap c in (0, 1000] of the importance weight min(exp(logp − old_logp), c) on the distillation loss when rollouts are reused (updates_per_batch > 1, in either world)")
    teacher_kind: str = setting("ema", "teacher weights: live (the student itself), ema (an exponential moving average of it), frozen (the initial weights) or trust_region (logits (1 − rate)·initial + rate·student)", choices=TEACHER_KINDS)
    teacher_rate: float = setting(0.05, "in [0, 1]: the EMA rate r of θ_T ← (1 − r)·θ_T + r·θ (ema) or the mixing rate toward the student (trust_region)")
    distill_loss: str = setting("alpha", "the distillation loss per token: alpha (the divergence family indexed by alpha) or forward_ce (the cross-entropy −Σ_v p_T(v)·log p_θ(v) of Distributional DAgger; needs alpha=0 and support full or topk, and has forward KL's gradient)", choices=OBJECTIVES)
    distill_prompt_weight: str = setting("uniform", "weight of each prompt's distillation: uniform, or success_std = sqrt(p·(1 − p)), p the share of its group's completions that succeed (SC-SDPO-style; 0 where a group all passes or all fails)", choices=PROMPT_WEIGHTS)
    distill_token_weight: str = setting("uniform", "weight of each token's distillation: uniform, or teacher_confidence = exp(−H_T) over its batch mean, H_T the teacher's entropy at that position (SRPO-style entropy-aware weights)", choices=TOKEN_WEIGHTS)
    distill_gate: str = setting("none", "which completions are distilled: every one with a teacher (none), or positive_advantage: only those scoring above their group's mean (SDPG-style gating)", choices=GATES)
    distill_warmup_steps: int = setting(0, "SDPG-style schedule: the distillation weight rises linearly from 0 to 1 over the first N training steps (0: off)")
    distill_decay_steps: int = setting(0, "SDPG-style schedule: the distillation weight falls linearly to 0 over the last N training steps of the run (0: off)")
    # -- hybrid --
    controller: str = setting("constant", "hybrid's rule for alpha_mix: constant, divergence (sigmoid((D − τ)/(τ/3)) of the batch-mean divergence D) or entropy (alpha_mix += gain·(H − H*), clipped to [0, 1])", choices=CONTROLLERS)
    alpha_mix: float = setting(0.5, "hybrid's weight in [0, 1] of the SDPO term: the constant value, or the entropy controller's starting value")
    divergence_tau: float = setting(0.1, "threshold τ of the divergence controller, nats per token, in [1e-6, 1000]")
    entropy_target: Optional[float] = setting(None, "target per-token entropy H* (nats) of the entropy controller, at most ln(vocabulary size); needed for controller=entropy, null otherwise")
    entropy_gain: float = setting(0.5, "step of the entropy controller per nat of entropy error, in [0, 1000]")
    # -- blend --
    blend_lambda: float = setting(0.9, "blend's λ in [0, 1] (SDPO paper: 0.9): support sampled uses the per-token advantage λ·A_GRPO + (1 − λ)·stopgrad(log p_T − log p_θ); full and topk keep the divergence in the loss, λ·L_GRPO + (1 − λ)·D")
    # -- policy gradient (reinforce, grpo, hybrid) --
    num_generations: int = setting(8, "group size: completions sampled per prompt (≥ 2 for grpo, sdpo and hybrid, whose groups need siblings)")
    scale_rewards: str = setting("group", "grpo's advantage scale: the group's reward std, the batch's, or none (centred rewards, Dr. GRPO)", choices=SCALES)
    loss_type: str = setting("token_mean", "how token losses are averaged: token_mean (over all tokens of the batch), sequence_mean (each completion's token mean, then over completions) or dr_grpo (the sum over tokens divided by completions × the maximum completion length)", choices=LOSS_TYPES)
    epsilon: float = setting(0.2, "PPO ratio clip [1 − ε, 1 + ε], in [0, 1000], when rollouts are reused (updates_per_batch > 1, in either world)")
    # -- reference policy (every method) --
    ref_beta: float = setting(0.0, "coefficient in [0, 1000] of the KL to the reference (initial) policy, TRL's k3 per token exp(r − l) − (r − l) − 1 (l, r: log-probabilities of the sampled token under the policy and the reference), added to any method's loss; 0: off, as in the official SDPO configs. TRL calls it beta; here ref_beta, because a toy run's flat config already has beta (the teacher's sharpness)")
    use_bias_correction_kl: bool = setting(True, "with ref_beta > 0, multiply the k3 term by the ratio π_θ/π_old (1 in value on-policy, not in gradient), as TRL does by default: its gradient is then the reverse KL(π_θ‖π_ref)'s in expectation; false: plain k3, whose gradient is the forward KL(π_ref‖π_θ)'s")
    ref_anchor: float = setting(0.0, "coefficient in [0, 1000] of the SDPG-style sampled-token anchor ½·(log π_θ(y_t) − log π_ref(y_t))², π_ref the initial policy, added to any method's loss; 0: off")
    temperature: float = setting(1.0, "sampling temperature, in [0.001, 1000]; the losses divide the logits by it too (as TRL does)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "MethodConfig":
        """Check every field; raise ``ValueError`` naming the first bad one and what is allowed."""
        check_choice(_OWNER, "name", self.name, METHODS)
        check_number(_OWNER, "alpha", self.alpha, 0.0, 1.0)
        check_choice(_OWNER, "support", self.support, SUPPORTS)
        check_choice(_OWNER, "distill_loss", self.distill_loss, OBJECTIVES)
        if self.distill_loss == "forward_ce" and (self.alpha != 0.0 or self.support == "sampled"):
            raise ValueError(f"MethodConfig.distill_loss='forward_ce' needs alpha=0.0 (the forward direction: the divergence statistic is "
                             f"then KL(p_T‖p_θ)) and support 'full' or 'topk', got alpha={self.alpha!r}, support={self.support!r}")
        if self.support == "topk":
            check_int(_OWNER, "topk", self.topk, 1, rule="must be a positive integer when support='topk'")
        else:
            check_int(_OWNER, "topk", self.topk, 1, optional=True, rule="must be a positive integer or null")
        if self.support == "sampled" and self.alpha != 1.0:
            raise ValueError(f"MethodConfig.support='sampled' needs alpha=1.0 (reverse KL), got alpha={self.alpha!r}")
        check_bool(_OWNER, "add_tail", self.add_tail)
        check_number(_OWNER, "is_clip", self.is_clip, 0.0, MAX_IS_CLIP, lo_open=True, why="a larger cap never binds")
        check_choice(_OWNER, "teacher_kind", self.teacher_kind, TEACHER_KINDS)
        check_number(_OWNER, "teacher_rate", self.teacher_rate, 0.0, 1.0)
        check_choice(_OWNER, "controller", self.controller, CONTROLLERS)
        check_number(_OWNER, "alpha_mix", self.alpha_mix, 0.0, 1.0)
        check_number(_OWNER, "divergence_tau", self.divergence_tau, *TAU_RANGE, why="nats per token")
        if self.entropy_target is not None:
            check_number(_OWNER, "entropy_target", self.entropy_target, 0.0, MAX_ENTROPY_TARGET, why="nats per token")
        if self.name == "hybrid" and self.controller == "entropy" and self.entropy_target is None:
            raise ValueError("MethodConfig.entropy_target must be set (nats per token) when controller='entropy'")
        check_number(_OWNER, "entropy_gain", self.entropy_gain, 0.0, MAX_ENTROPY_GAIN)
        check_number(_OWNER, "blend_lambda", self.blend_lambda, 0.0, 1.0)
        check_choice(_OWNER, "distill_prompt_weight", self.distill_prompt_weight, PROMPT_WEIGHTS)
        check_choice(_OWNER, "distill_token_weight", self.distill_token_weight, TOKEN_WEIGHTS)
        check_choice(_OWNER, "distill_gate", self.distill_gate, GATES)
        check_int(_OWNER, "distill_warmup_steps", self.distill_warmup_steps, 0, why="0: no warm-up")
        check_int(_OWNER, "distill_decay_steps", self.distill_decay_steps, 0, why="0: no decay")
        check_bool(_OWNER, "use_bias_correction_kl", self.use_bias_correction_kl)
        for name in ("ref_beta", "ref_anchor"):
            check_number(_OWNER, name, getattr(self, name), 0.0, MAX_REF_COEF, why="0: off; a larger penalty only pins the policy")
        if self.name not in DISTILLING:
            for name in _DISTILL_ONLY:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise ValueError(f"MethodConfig.{name}={getattr(self, name)!r} acts on the distillation term, which name={self.name!r} "
                                     f"does not have ({', '.join(DISTILLING)} do)")
        check_int(_OWNER, "num_generations", self.num_generations, 1, rule="must be a positive integer")
        if self.name != "reinforce" and self.num_generations < 2:
            raise ValueError(f"MethodConfig.num_generations must be ≥ 2 for name={self.name!r} (groups need siblings)")
        check_choice(_OWNER, "scale_rewards", self.scale_rewards, SCALES)
        check_choice(_OWNER, "loss_type", self.loss_type, LOSS_TYPES)
        check_number(_OWNER, "epsilon", self.epsilon, 0.0, MAX_EPSILON, why="a larger clip never binds")
        check_number(_OWNER, "temperature", self.temperature, *TEMPERATURE_RANGE)
        return self

    # ----- what the method does (both worlds' loops ask these; nothing else decides it) -----
    @property
    def distills(self) -> bool:
        """Whether the loss has the distillation term ``D(π_θ, stopgrad π_T)`` (sdpo, hybrid, blend, srpo)."""
        return self.name in DISTILLING

    @property
    def uses_policy_gradient(self) -> bool:
        """Whether the loss has the policy-gradient term ``−A·log π_θ(y_t)`` (reinforce, grpo, hybrid, blend, srpo)."""
        return self.name in POLICY_GRADIENT

    @property
    def needs_success(self) -> bool:
        """Whether the loss reads which completions succeeded (srpo's routing, the success_std prompt weight)."""
        return self.name == "srpo" or self.distill_prompt_weight == "success_std"

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads ``log π_ref(y_t)`` of the reference (initial) policy (ref_beta or ref_anchor > 0)."""
        return self.ref_beta > 0 or self.ref_anchor > 0

    @property
    def weights_distillation(self) -> bool:
        """Whether :meth:`distill_weights` has anything to multiply (a gate, a prompt or token weight, a schedule)."""
        return (self.distill_gate != "none" or self.distill_prompt_weight != "uniform" or self.distill_token_weight != "uniform"
                or self.distill_warmup_steps > 0 or self.distill_decay_steps > 0)

    def variants_in_use(self) -> tuple[str, ...]:
        """The variant settings (docs/variants.md) this configuration uses: its name when blend or srpo, and every
        field of :data:`VARIANT_FIELDS` away from its default (``blend_lambda`` only for blend). A world that has not
        wired a variant refuses the configuration by these names."""
        used = [f"name={self.name}"] if self.name in ("blend", "srpo") else []
        return tuple(used + [n for n in VARIANT_FIELDS if getattr(self, n) != _DEFAULTS[n] and (n != "blend_lambda" or self.name == "blend")])

    def distill_weights(self, *, scores: torch.Tensor, mask: torch.Tensor, success: Optional[torch.Tensor] = None,
                        teacher_entropy: Optional[torch.Tensor] = None, step: int = 0, total_steps: int = 1,
                        dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """The detached weight ``[..., B, T]`` that multiplies each token's distillation loss, or ``None`` when no
        weighting is set (so the default arithmetic is untouched):

        ``w_t = s(step) · g_i · p_i · c_t`` with ``s`` the warm-up/decay schedule (:func:`distill_schedule`), ``g_i`` the
        positive-advantage gate, ``p_i = sqrt(p_g(1 − p_g))`` the success_std prompt weight and ``c_t`` the
        teacher_confidence token weight, each 1 when off.

        Args:
            scores: ``[..., B]`` the scores the advantages come from (the gate's ``r_i > mean_group(r)``).
            mask: ``[..., B, T]`` tokens that carry the distillation term (teacher_confidence's normaliser).
            success: ``[..., B]`` bool, needed by success_std.
            teacher_entropy: ``[..., B, T]`` the teacher's entropy, needed by teacher_confidence.
            step, total_steps: the training step (0-based) and the run's number of steps, for the schedule.
        """
        if not self.weights_distillation:
            return None
        w = torch.ones(mask.shape, dtype=dtype)
        if self.distill_warmup_steps or self.distill_decay_steps:
            w = w * distill_schedule(step, total_steps, self.distill_warmup_steps, self.distill_decay_steps)
        if self.distill_gate == "positive_advantage":
            w = w * positive_advantage_gate(scores, self.num_generations).to(dtype).unsqueeze(-1)
        if self.distill_prompt_weight == "success_std":
            if success is None:
                raise ValueError("MethodConfig.distill_weights: distill_prompt_weight='success_std' needs success ([..., B] bool)")
            w = w * success_std_weight(success, self.num_generations).to(dtype).unsqueeze(-1)
        if self.distill_token_weight == "teacher_confidence":
            if teacher_entropy is None:
                raise ValueError("MethodConfig.distill_weights: distill_token_weight='teacher_confidence' needs teacher_entropy ([..., B, T])")
            w = w * teacher_confidence_weight(teacher_entropy, mask).to(dtype)
        return w

    def make_controller(self) -> Optional[AlphaController]:
        """The hybrid's ``alpha_mix`` controller (``None`` for the pure methods)."""
        if self.name != "hybrid":
            return None
        return AlphaController(self.controller, self.alpha_mix, self.divergence_tau, self.entropy_target, self.entropy_gain)

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-completion advantages ``[..., N]`` from scores ``[..., N]`` (N completions of one batch, groups of
        ``num_generations`` consecutive ones):

        - grpo, blend, srpo: ``A_i = (r_i − mean_group(r)) / scale`` (``scale_rewards``: group std, batch std or 1);
        - reinforce, hybrid: ``A_i = r_i − mean_batch(r)`` (a batch-mean baseline, no scaling).
        """
        if self.name in GROUP_ADVANTAGES:
            return group_advantages(scores, self.num_generations, self.scale_rewards)
        return group_advantages(scores, scores.shape[-1], "none")

    # ----- construction and serialisation -----
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodConfig":
        """Build from a plain mapping; unknown keys are refused by name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a method config must be a mapping of field names to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if "method" in unknown:
            raise ValueError(f"unknown MethodConfig field 'method' (={data['method']!r}); a method's name is the field 'name', "
                             f"e.g. name: {data['method'] if isinstance(data['method'], str) else 'sdpo'}")
        if unknown:
            raise ValueError(f"unknown MethodConfig field(s) {', '.join(map(repr, unknown))}; known fields: {', '.join(cls.field_names())}")
        values = dict(data)
        for name in ("alpha", "is_clip", "teacher_rate", "alpha_mix", "divergence_tau", "entropy_gain", "epsilon", "temperature",
                     "blend_lambda", "ref_beta", "ref_anchor"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])  # YAML's `1` is a float field's 1.0
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "MethodConfig":
        """A validated copy with some fields changed."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_yaml(cls, text: str) -> "MethodConfig":
        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MethodConfig":
        """Read a ``.yaml``/``.yml``/``.json`` file; a file with a top-level ``method:`` mapping (a recipe) works too."""
        path = Path(path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if isinstance(data, Mapping) and isinstance(data.get("method"), Mapping):
            data = data["method"]
        try:
            return cls.from_dict(data or {})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: Union[str, Path]) -> None:
        """Write atomically as YAML or JSON (by suffix)."""
        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        atomic_write_text(path, text)


_DEFAULTS = {f.name: f.default for f in fields(MethodConfig)}  # every field's default (all are plain values)
