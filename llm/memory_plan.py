"""Per-GPU memory plan of a recipe on a cluster, from the model's config.json only (no weights loaded).

Terms (bytes per GPU; ``n`` GPUs in all; ``b`` bytes per element of the recipe's dtype):

- weights ``P·b`` (÷ n when sharded: FSDP2 / ZeRO-3);
- gradients ``P_train·b`` (÷ n when sharded; gradients and AdamW moments are kept in the parameters' dtype);
- optimiser: AdamW's two moments ``2·P_train·b`` (÷ n when sharded);
- teacher copy: ``P_train·b`` (÷ n) for ema / frozen / trust_region, 0 for live, plus the teacher LM head
  ``V·H·b`` the fused loss gathers when the teacher has its own weights;
- activations for the student's backward, ``s`` tokens per sequence, ``m`` sequences per forward:
  with gradient checkpointing ``L·m·s·H·b`` saved layer inputs + one layer recomputed ``≈ 34·m·s·H·b/2``;
  without, ``≈ 17·L·m·s·H·b`` (attention by an SDPA/flash kernel, no ``s²`` term);
- logits: fused ``≈ 3·chunk·V·4`` (student, teacher and gradient chunks in fp32), unfused
  ``≈ 3·m·T·V·4`` (``T`` completion tokens).

A fixed allowance (CUDA context, allocator fragmentation) of 3 GiB is added. The result is a
planning estimate, not a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .recipe import Recipe

GIB = 1024 ** 3
OVERHEAD_GB = 3.0
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
STRATEGIES = ("fsdp2", "zero3", "ddp")
# config.json numbers of models a plan should know without network (Qwen/Qwen3-8B's published config).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
    },
}


def model_config(path: str) -> dict[str, Any]:
    """``config.json`` of a local model directory, or the built-in numbers of a known hub id."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if path in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[path])
    raise ValueError(f"model.path={path!r}: no config.json there and not a known model ({', '.join(KNOWN_CONFIGS)}); "
                     "download the model's config.json into a directory and point model.path at it")


def parameter_count(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen-style decoder from its config (embeddings, attention, gated MLP, norms)."""
    v, h, inter, layers = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd  # q, k, v, o (+ Qwen3's q/k norms)
    per_layer = attn + 3 * h * inter + 2 * h
    embed = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return embed + layers * per_layer + h


def lora_parameter_count(cfg: dict[str, Any], r: int, targets: list[str]) -> int:
    """Adapter parameters: ``r·(d_in + d_out)`` per targeted projection per layer."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return cfg["num_hidden_layers"] * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def memory_plan(
    recipe: Recipe,
    *,
    gpus_per_node: int,
    nodes: int = 1,
    gpu_memory_gb: float,
    strategy: str = "fsdp2",
    micro_batch: Optional[int] = None,
) -> dict[str, Any]:
    """The per-GPU plan as a dict of GiB figures plus ``fits``; see the module docstring for the terms."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    for name, value in (("gpus_per_node", gpus_per_node), ("nodes", nodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb={gpu_memory_gb!r} must be > 0")
    cfg = model_config(recipe.model.path)
    n = gpus_per_node * nodes
    shard = n if strategy in ("fsdp2", "zero3") else 1
    b = BYTES[recipe.model.dtype]
    params = parameter_count(cfg)
    lora = recipe.model.lora
    trainable = lora_parameter_count(cfg, lora.r, lora.target_modules) if lora else params
    weights = (params + (trainable if lora else 0)) * b / shard
    grads = trainable * b / shard
    optim = 2 * trainable * b / shard
    m, t = recipe.method, recipe.training
    v, h, layers = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    teacher = 0.0
    if m.name in ("sdpo", "hybrid") and m.teacher_kind != "live":
        teacher = trainable * b / shard
    fused = m.name in ("sdpo", "hybrid") and (t.fused_loss is True or (t.fused_loss == "auto" and v >= t.fused_min_vocab)) \
        and m.teacher_kind != "trust_region"
    if fused and teacher:
        teacher += v * h * b
    seqs = micro_batch or t.micro_batch_size or max(1, t.prompts_per_step * m.num_generations // n)
    tokens = t.max_prompt_length + t.max_new_tokens
    if recipe.model.gradient_checkpointing:
        acts = layers * seqs * tokens * h * b + 17 * seqs * tokens * h * b
    else:
        acts = 17 * layers * seqs * tokens * h * b
    from sdpo_sim.core.losses import default_chunk_size

    chunk = t.chunk_size or default_chunk_size(v)
    logits = 3 * chunk * v * 4 if fused else 3 * seqs * t.max_new_tokens * v * 4
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "teacher": teacher,
             "activations": acts, "logits": logits}
    total = sum(parts.values()) / GIB + OVERHEAD_GB
    return {
        "model": recipe.model.path, "parameters": params, "trainable": trainable, "gpus": n, "strategy": strategy,
        "dtype": recipe.model.dtype, "sequences_per_gpu": seqs, "tokens_per_sequence": tokens, "fused_loss": fused,
        **{f"{k}_gb": x / GIB for k, x in parts.items()}, "overhead_gb": OVERHEAD_GB,
        "total_gb": total, "gpu_memory_gb": float(gpu_memory_gb), "fits": total <= gpu_memory_gb,
    }


def format_plan(plan: dict[str, Any]) -> str:
    """A readable table of a plan."""
    lines = [
        f"memory plan: {plan['model']}  ({plan['parameters'] / 1e9:.2f} B parameters, {plan['trainable'] / 1e9:.3f} B trainable, {plan['dtype']})",
        f"cluster: {plan['gpus']} GPUs, {plan['strategy']}; {plan['sequences_per_gpu']} sequences × {plan['tokens_per_sequence']} tokens per GPU per forward; "
        f"loss {'fused (chunked logits)' if plan['fused_loss'] else 'unfused (full logits)'}",
    ]
    for key in ("weights", "gradients", "optimizer", "teacher", "activations", "logits", "overhead"):
        lines.append(f"  {key:<12} {plan[key + '_gb']:9.2f} GiB")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT (fewer prompts_per_step, more GPUs, LoRA or gradient checkpointing)"
    lines.append(f"  {'total':<12} {plan['total_gb']:9.2f} GiB of {plan['gpu_memory_gb']:.0f} GiB per GPU: {verdict}")
    return "\n".join(lines)
