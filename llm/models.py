"""Loading the recipe's model (LoRA, gradient checkpointing, precision) and running it at completion positions.

Precision (``model.dtype``; ``auto`` is the dtype the saved config records):

- ``float32``: weights, gradients, optimiser state and compute in float32 (no autocast: unchanged arithmetic).
- ``bfloat16``: mixed precision. Trainable weights are float32 *master weights* (full fine-tuning loads the model
  in float32; LoRA adapters are float32 over a frozen bfloat16 base), so AdamW's moves of ~lr are kept; forwards
  and the loss run under ``torch.autocast(bfloat16)`` (:func:`autocast`). An update ``lr`` on a weight ``w`` survives
  when ``lr > |w|·2⁻²⁴`` (float32) instead of ``|w|·2⁻⁹`` (bfloat16). Cost: full fine-tuning holds 4 bytes of
  weights + 4 of gradients + 8 of AdamW moments per parameter (16, as FSDP2's upcast does), not 8 all-bfloat16,
  plus the bfloat16 copies of the weights that autocast makes and the backward keeps (2 per parameter).
  Under FSDP2 accelerate's ``mixed_precision: bf16`` gathers bfloat16 copies of the float32 shards instead;
  under DeepSpeed its bf16 engine holds bfloat16 parameters with float32 master partitions in the optimiser.
- ``float16``: needs loss scaling, which the plain trainer does not do: refused for full fine-tuning unless sharded
  (FSDP2/DeepSpeed scale the loss themselves); LoRA keeps its float16 base frozen with float32 adapters.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import torch

from .prefix import plan_shared_prefix, positions, shared_prefix_outputs
from .recipe import Recipe, check_model_path
from .tiny import untrained_warning

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)
# accelerate's FSDP2 and DeepSpeed apply their own mixed precision (float32 shards or master partitions)
SHARDED_TYPES = ("FSDP", "DEEPSPEED")
ACCELERATE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolved_dtype(recipe: Recipe) -> torch.dtype:
    """``model.dtype`` as a torch dtype; ``auto`` is the dtype the saved config records (float32 when it records
    none, as transformers loads it), read without loading any weight."""
    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype)
    # heavy: loaded only when needed, as in load_model_and_tokenizer
    from transformers import AutoConfig

    check_model_path(recipe)
    config = AutoConfig.from_pretrained(recipe.model.path)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return saved if isinstance(saved, torch.dtype) else torch.float32


def load_model_and_tokenizer(recipe: Recipe, *, master_weights: bool = True):
    """Load the recipe's model and tokenizer (after :func:`check_model_path`), apply LoRA and checkpointing.

    With ``master_weights`` (the default) every trainable parameter is float32 whatever ``model.dtype`` says: a
    bfloat16 full fine-tuning loads the weights in float32 (exactly, from a bfloat16 checkpoint), and LoRA keeps the
    frozen base in ``model.dtype`` with float32 adapters. ``master_weights=False`` loads as ``model.dtype`` says
    (DeepSpeed: its bf16 engine keeps float32 master partitions of its own).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(recipe)
    warning = untrained_warning(recipe.model.path)
    if warning:
        log.warning(warning)
    spec = recipe.model
    dtype = resolved_dtype(recipe)
    full = master_weights and spec.lora is None and dtype in HALF_DTYPES
    kwargs: dict[str, Any] = {"dtype": torch.float32 if full else ("auto" if spec.dtype == "auto" else dtype)}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        import peft  # heavy: loaded only with LoRA, as transformers above

        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                                 target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM"))
    if master_weights:
        with torch.no_grad():
            for p in model.parameters():  # e.g. adapters of a peft that keeps model.dtype: float32 master weights
                if p.requires_grad and p.dtype in HALF_DTYPES:
                    p.data = p.data.float()
    return model, tokenizer


def check_trainable_precision(recipe: Recipe, distributed_type: str, dtype: Optional[torch.dtype] = None) -> None:
    """Refuse the one precision the trainer cannot train: float16 full fine-tuning without sharding.

    float16 keeps 5 exponent bits: gradients below 2⁻²⁴ ≈ 6e-8 flush to zero unless the loss is scaled up first,
    and the plain trainer does not scale it (accelerate's FSDP2 and DeepSpeed do; a LoRA run keeps its float16 base
    frozen, as before). bfloat16 trains with float32 master weights (module docstring). ``dtype``: the resolved
    ``model.dtype`` (default: :func:`resolved_dtype`, which reads the saved config for ``auto``).
    """
    dtype = resolved_dtype(recipe) if dtype is None else dtype
    if distributed_type in SHARDED_TYPES or dtype != torch.float16 or recipe.model.lora is not None:
        return
    resolved = "" if recipe.model.dtype == "float16" else " (resolved to float16)"
    raise ValueError(f"model.dtype={recipe.model.dtype!r}{resolved} would train float16 weights without loss scaling, "
                     "whose small gradients underflow to zero; set model.dtype: bfloat16 (float32 master weights, "
                     "bfloat16 compute) or float32, or use LoRA")


def sharded_launch() -> bool:
    """Whether ``accelerate launch`` asked for FSDP or DeepSpeed (the variables accelerate itself reads)."""
    return any(os.environ.get(name, "false").lower() == "true" for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def accelerate_mixed_precision(dtype: torch.dtype, sharded: bool) -> str:
    """accelerate's ``mixed_precision`` for a run computing in ``dtype``: ``bf16``/``fp16`` under FSDP/DeepSpeed
    (FSDP2 gathers bfloat16 copies of float32 shards; DeepSpeed's bf16 engine keeps float32 master partitions);
    ``no`` otherwise, where the trainer autocasts itself (:func:`autocast`): accelerate's autocast wrapper would
    also convert every output to float32, all hidden states of the fused loss's forward included."""
    return ACCELERATE_NAMES.get(dtype, "no") if sharded else "no"


def deepspeed_half(accelerator) -> Optional[str]:
    """``bf16``/``fp16`` when ``accelerator`` runs DeepSpeed with that engine precision, else ``None``."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    config = {} if plugin is None else plugin.deepspeed_config
    return next((name for name in ("bf16", "fp16") if str(config.get(name, {}).get("enabled", False)).lower() == "true"), None)


def check_accelerator_precision(accelerator, dtype: torch.dtype, field: str = "model.dtype") -> None:
    """Refuse an accelerator whose mixed precision disagrees with the run's compute ``dtype``.

    Unsharded runs need accelerate's ``mixed_precision: no`` (the trainer autocasts; accelerate's wrapper would
    autocast again with a weight cache that the teacher's in-place weight swap would make stale); FSDP needs
    ``bf16``/``fp16`` for a half ``dtype`` (else autocast would keep a bfloat16 copy of every gathered weight) and
    ``no`` for float32; DeepSpeed's engine precision must be ``dtype``'s.
    """
    kind, want = accelerator.distributed_type.name, ACCELERATE_NAMES.get(dtype, "no")
    name = str(dtype).removeprefix("torch.")
    if kind == "DEEPSPEED":
        have = deepspeed_half(accelerator) or "no"
        if have != want:
            raise ValueError(f"{field} resolves to {name} but the DeepSpeed config's precision is {have!r}; it must be "
                             f"{want!r} (let the trainer build the accelerator, or set bf16/fp16.enabled to match)")
        return
    need = want if kind == "FSDP" else "no"
    if accelerator.mixed_precision != need:
        raise ValueError(f"{field} resolves to {name} but the accelerator (distributed_type {kind}) has mixed_precision="
                         f"{accelerator.mixed_precision!r}; it must be {need!r} (the trainer autocasts unsharded runs itself)")


def autocast(device_type: str, dtype: torch.dtype):
    """Context for the forwards and the loss: ``torch.autocast(device_type, bfloat16)`` for a bfloat16 run (weights
    stay float32; matmuls run in bfloat16, softmax and norms in float32), a no-op otherwise (float32 arithmetic is
    untouched). The weight cache is off: the teacher swaps weights into the same tensors in place, which a cache
    keyed on the tensor would not see (the student would read the teacher's cached bfloat16 copies)."""
    if dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)



def no_forward_buffer_sync(model) -> None:
    """Stop DDP broadcasting module buffers in forwards (a collective in each forward after a gradient forward).

    With it, ranks making different numbers of forward calls — a shared-prefix plan (two calls) on one rank
    and none on another — would pair unrelated collectives and hang. A transformer's buffers (rotary
    frequencies) are constants, made equal on every rank by DDP's initial sync, so nothing is lost.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.forward_sync_buffers = False  # the name torch ≥ 2.13 reads
        model.broadcast_buffers = False  # the name earlier torch reads


def completion_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, *, hidden: bool,
                       share_prefix: bool = False) -> torch.Tensor:
    """Outputs at the positions that predict the last ``num_tokens`` tokens: logits ``[B, T, V]`` or
    final (normed) hidden states ``[B, T, H]`` (``hidden=True``, for the fused loss).

    ``share_prefix``: consecutive rows that begin alike (a prompt's group) run their common prefix once
    (:mod:`llm.prefix`); same outputs and gradients up to float rounding.
    """
    plan = plan_shared_prefix(input_ids, attention_mask, num_tokens) if share_prefix else None
    if plan is not None:
        return shared_prefix_outputs(model, plan, num_tokens, hidden=hidden)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False,
                logits_to_keep=1 if hidden else num_tokens + 1, output_hidden_states=hidden)
    if hidden:
        return out.hidden_states[-1][:, -num_tokens - 1:-1]
    return out.logits[:, :-1]


def teacher_outputs(trainer, ids: torch.Tensor, mask: torch.Tensor, T: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The teacher weights of ``trainer`` (a :class:`~llm.trainer.Trainer`; swapped in and out) reading rows ``ids``/``mask``
    ``[b, L]``: outputs ``[b, T, V]`` (or hidden states ``[b, T, H]`` on the fused path) at the last ``T`` positions over the
    temperature, and the teacher's own LM head when it has stored weights (fused path; else ``None``)."""
    def forward():
        out = completion_outputs(trainer.model, ids, mask, T, hidden=trainer.fused, share_prefix=trainer.share_prefix)
        if not (trainer.fused and trainer.teacher.has_copy):
            return out, None
        # the head as this forward left it: FSDP2 gathers the root unit in the forward, so read before it may be a
        # DTensor shard (after a reshard, e.g. the reference forward's weight swap)
        return out, trainer.unwrapped.get_output_embeddings().weight.detach().clone()

    terms = trainer.teacher.outputs(trainer.unwrapped, forward)
    # trust_region mixes two outputs with weights (1 − r, r): in float32, so a bfloat16 r·ℓ term is not rounded away
    mix = (lambda out: out.float()) if len(terms) > 1 else (lambda out: out)
    return sum(c * mix(out) for c, (out, _) in terms) / trainer.method.temperature, terms[0][1][1]
