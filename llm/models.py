"""Loading the recipe's model (LoRA, gradient checkpointing, precision checks) and running it at completion positions."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from .prefix import plan_shared_prefix, positions, shared_prefix_outputs
from .recipe import Recipe, check_model_path
from .tiny import untrained_warning

log = logging.getLogger(__name__)

def load_model_and_tokenizer(recipe: Recipe):
    """Load the recipe's model and tokenizer (after :func:`check_model_path`), apply LoRA and checkpointing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(recipe)
    warning = untrained_warning(recipe.model.path)
    if warning:
        log.warning(warning)
    spec = recipe.model
    kwargs: dict[str, Any] = {"dtype": "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)}
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
    return model, tokenizer


HALF_DTYPES = (torch.bfloat16, torch.float16)
# accelerate keeps float32 trainable weights under these (FSDP upcasts them; DeepSpeed holds float32 master weights)
SHARDED_TYPES = ("FSDP", "DEEPSPEED")


def check_trainable_precision(recipe: Recipe, distributed_type: str, model: Optional[torch.nn.Module] = None) -> None:
    """Refuse half-precision trainable weights under the plain, unsharded AdamW (until issue 15 adds mixed precision).

    AdamW moves a weight ``w`` by about ``lr`` per step; bfloat16 keeps 8 significant bits, so any move smaller
    than ``|w|·2⁻⁹`` rounds back to ``w`` (e.g. lr 1e-5 on |w| = 0.02 is 5e-4 of it, below 2⁻⁹ ≈ 2e-3): most
    updates are lost. Without ``model``: from the recipe (``model.dtype`` bfloat16/float16 without LoRA, whose
    adapters peft keeps in float32), before any weight loads. With ``model``: its trainable parameters (``auto``).
    """
    if distributed_type in SHARDED_TYPES:
        return
    dtype = recipe.model.dtype
    if model is None:
        found = dtype if dtype in ("bfloat16", "float16") and recipe.model.lora is None else None
    else:
        halves = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad and p.dtype in HALF_DTYPES})
        found = halves[0] if halves else None
    if found is None:
        return
    resolved = "" if dtype == found else f" (resolved to {found})"
    raise ValueError(f"model.dtype={dtype!r}{resolved} would train {found} weights with plain AdamW, which rounds most "
                     "updates away; set model.dtype: float32, or run sharded under the FSDP2 accelerate config "
                     "(accelerate launch --config_file llm/accelerate/fsdp2.yaml), which keeps float32 weights")



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
    head = trainer.unwrapped.get_output_embeddings().weight if trainer.fused else None

    def forward():
        out = completion_outputs(trainer.model, ids, mask, T, hidden=trainer.fused, share_prefix=trainer.share_prefix)
        return (out, head.detach().clone()) if trainer.fused and trainer.teacher.has_copy else (out, None)

    terms = trainer.teacher.outputs(trainer.unwrapped, forward)
    return sum(c * out for c, (out, _) in terms) / trainer.method.temperature, terms[0][1][1]
