"""The self-teacher's weights: live, EMA, frozen or trust-region (``MethodConfig.teacher_kind``).

The teacher is the student's own network with different weights for the *trainable* parameters
(all of them for full fine-tuning, only the adapters with LoRA). Those weights are kept as one copy,
shard by shard: each process holds exactly the local pieces of the parameters it owns (a DTensor's
local shard under FSDP2, ``ds_tensor`` under DeepSpeed ZeRO-3, the whole tensor otherwise). A teacher
forward swaps them into the student in place, runs without gradient, and swaps back, so the teacher
needs no second model object and follows any sharding of the student.

- ``live``: the current student (no copy).
- ``ema``: ``θ_T ← (1 − r)·θ_T + r·θ`` after each optimiser step (official SDPO: r = 0.05, 0.01 with rich feedback).
- ``frozen``: the initial weights.
- ``trust_region``: teacher logits ``(1 − r)·ℓ(θ_0) + r·ℓ(θ)``: a geometric mixture of the initial and the live
  teacher, which keeps it within a trust region of the initial one (two teacher forwards per step).

Precision: the copy is kept in float32 (or wider) whatever the parameters' dtype, and the EMA reads the optimiser's
float32 master values (DeepSpeed's master partition when its bf16 engine holds bfloat16 parameters), so
``θ_T + r·(θ − θ_T)`` is not rounded back to ``θ_T``: in bfloat16 a move below ``|θ_T|·2⁻⁹`` is lost, and with
r = 0.01 that is nearly every move. A teacher forward rounds the float32 copy into a half-precision parameter and
puts the student's own values back exactly afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from sdpo_sim.core.method import TEACHER_KINDS


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process holds: a DTensor's local shard, a ZeRO-3 partition, or itself."""
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3 partitioned parameter
        return param.ds_tensor
    to_local = getattr(param, "to_local", None)  # torch.distributed.tensor.DTensor (FSDP2)
    data = param.data
    return to_local() if callable(to_local) and hasattr(data, "placements") else data


def master_tensor(param: torch.Tensor) -> torch.Tensor:
    """The values the optimiser updates for the part of ``param`` this process holds: DeepSpeed ZeRO-3's float32
    master partition when its engine keeps one, else :func:`local_tensor` (the parameter itself is the master)."""
    if hasattr(param, "ds_tensor") and getattr(param, "_z3_optimizer", None) is not None:
        # optional package, imported lazily: it is installed whenever a ZeRO-3 parameter exists
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            return master
    return local_tensor(param)


def copy_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the teacher keeps a parameter of ``dtype`` in: float32 for bfloat16/float16, never narrower."""
    return torch.promote_types(dtype, torch.float32)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back into its sharded state (the root stays unsharded after a forward),
    so ``named_parameters`` yields the sharded DTensors whose local shards the teacher stores."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the trainable parameters, in their sharded form under FSDP2."""
    reshard(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Teacher:
    """Teacher weights of one kind, stored as local shards of the student's trainable parameters."""

    def __init__(self, kind: str, rate: float, model: nn.Module):
        if kind not in TEACHER_KINDS:
            raise ValueError(f"teacher kind={kind!r} is not allowed; choose one of {', '.join(map(repr, TEACHER_KINDS))}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"teacher rate={rate!r} must be in [0, 1]")
        self.kind, self.rate = kind, float(rate)
        self.names = [n for n, _ in trainable_named_parameters(model)]
        with torch.no_grad():
            self.weights: dict[str, torch.Tensor] = (
                {} if kind == "live" else {n: master_tensor(p).detach().to(copy_dtype(p.dtype), copy=True)
                                           for n, p in trainable_named_parameters(model)}
            )

    @property
    def has_copy(self) -> bool:
        return bool(self.weights)

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(trainable_named_parameters(model))
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"teacher weights name parameter(s) the model does not train: {missing[:3]}")
        return params

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Within the block, the model's trainable parameters hold the stored teacher weights (rounded to the
        parameters' dtype when it is narrower than the copy's); afterwards exactly the student's values again."""
        params = self._params(model)
        kept: dict[str, torch.Tensor] = {}  # the student's values of half-precision parameters, while swapped out

        def swap(into: bool) -> None:
            reshard(model)  # FSDP2: drop gathered copies so the next forward gathers the swapped shards
            with torch.no_grad():
                for n, w in self.weights.items():
                    local = local_tensor(params[n])
                    if local.dtype == w.dtype:  # exchange in place: exact both ways, no second copy
                        tmp = local.clone()
                        local.copy_(w)
                        w.copy_(tmp)
                    elif into:
                        kept[n] = local.clone()
                        local.copy_(w)
                    else:
                        local.copy_(kept.pop(n))

        swap(True)
        try:
            yield
        finally:
            swap(False)

    @torch.no_grad()
    def outputs(self, model: nn.Module, forward: Callable[[], Any]) -> list[tuple[float, Any]]:
        """Teacher outputs of ``forward()`` (a closure running ``model`` on the teacher inputs) with their weights.

        The teacher's logits are ``Σ_k c_k·ℓ_k`` over the returned ``(c_k, out_k)``: one term ``(1, ·)`` for
        live/ema/frozen, and ``[(1 − r, ·@θ_0), (r, ·@θ)]`` for ``trust_region``.
        """
        if self.kind == "live":
            return [(1.0, forward())]
        with self.swapped_in(model):
            stored = forward()
        if self.kind == "trust_region":
            return [(1.0 - self.rate, stored), (self.rate, forward())]
        return [(1.0, stored)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After an optimiser step: EMA moves toward the student; the other kinds keep their weights."""
        if self.kind != "ema":
            return
        params = self._params(model)
        for n, w in self.weights.items():
            w.lerp_(master_tensor(params[n]).to(w.dtype), self.rate)  # θ_T ← θ_T + r·(θ − θ_T), in the copy's float32

    def state_dict(self) -> dict:
        return {"kind": self.kind, "rate": self.rate, "weights": {n: w.clone() for n, w in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint teacher kind {state['kind']!r} differs from the recipe's {self.kind!r}")
        if set(state["weights"]) != set(self.weights):
            raise ValueError("checkpoint teacher weights do not match the model's trainable parameters")
        with torch.no_grad():
            for n, w in state["weights"].items():
                self.weights[n].copy_(w)


def make_teacher(kind: str, rate: float, model: nn.Module) -> Teacher:
    """A :class:`Teacher` for ``model`` (call after the model is wrapped/sharded, before training)."""
    return Teacher(kind, rate, model)


# teacher kinds whose stored weights stay the initial ones θ_0 for the whole run (trust_region mixes θ_0 with θ)
KEEPS_INITIAL = ("frozen", "trust_region")


class Reference:
    """The reference policy ``π_ref`` of the KL and anchor terms (``ref_beta``, ``ref_anchor``): the initial weights θ_0,
    frozen, read through the student's own model object as the teacher is (no second model):

    - LoRA (``lora=True``, a peft model): the base model with the adapters disabled (peft's ``disable_adapter()``
      context), which is θ_0 since peft initialises LoRA's ``B`` to 0. No copy.
    - full fine-tuning: a frozen copy of the trainable weights, kept and swapped in shard by shard as the teacher's
      (:class:`Teacher` of kind ``frozen``). When the teacher already keeps θ_0 (:data:`KEEPS_INITIAL`) its copy is
      used, so no second copy exists; else (``ema``, ``live``) one is made here.

    The copy is not checkpointed: it is the weights the run starts from (``model.path``), taken before a resume loads.
    """

    def __init__(self, model: nn.Module, teacher: Teacher, *, lora: bool):
        self.lora, self.teacher = lora, teacher
        if lora:
            self.copy = None
        elif teacher.kind in KEEPS_INITIAL:
            self.copy = teacher
        else:
            self.copy = Teacher("frozen", 0.0, model)

    @property
    def owns_copy(self) -> bool:
        """Whether the reference holds a copy of weights of its own (full fine-tuning with an ema or live teacher)."""
        return self.copy is not None and self.copy is not self.teacher

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model`` (the unwrapped student) computes ``π_ref``; afterwards the student again."""
        if self.lora:
            with model.disable_adapter():
                yield
        else:
            with self.copy.swapped_in(model):
                yield


def make_reference(uses_reference: bool, model: nn.Module, teacher: Teacher, *, lora: bool) -> Optional[Reference]:
    """A :class:`Reference` for ``model`` when the loss reads ``π_ref`` (``MethodConfig.uses_reference``), else ``None``:
    no copy of any weight is made for a run without a reference term."""
    return Reference(model, teacher, lora=lora) if uses_reference else None
