"""Per-process memory plan of a recipe, from the model's ``config.json`` only (no weights loaded): what a training step
holds, phase by phase, and its peak.

Notation (bytes, per process; ``n`` processes, ``s = n`` when the strategy shards (FSDP2, ZeRO-3) else 1):
``P`` parameters, ``P_t`` trainable (all, or LoRA's adapters), ``V`` vocabulary, ``H`` hidden, ``I`` MLP width, ``L``
layers, ``a``/``k`` attention/key-value heads of width ``d``; ``b`` bytes per element of the compute dtype
(``model.dtype``; ``auto``: the dtype ``config.json`` records, float32 when none). Trainable weights, their gradients,
AdamW's moments and the teacher's copy are float32 whatever ``model.dtype`` says (``llm/models.py``: float32 master
weights under bfloat16 autocast; LoRA adapters float32 over a frozen ``b``-byte base). ``c`` rows per chunk of the
logits (``training.chunk_size`` or :func:`~sdpo_sim.core.losses.default_chunk_size`, about 32 MiB of float32 ``[c, V]``;
fewer when a forward has fewer completion tokens).

Held for the whole step:

- weights ``(P_t·4 + (P − P_t)·b)/s`` (ZeRO-3 in bfloat16 also ``P_t·2/s`` bfloat16 partitions); AdamW's moments
  ``2·P_t·4/s``; the teacher's copy ``P_t·4/s`` (ema / frozen / trust_region, whatever the method; none for live);
  the reference policy's copy ``P_t·4/s`` (full fine-tuning with ``ref_beta`` or ``ref_anchor`` > 0 and an ema or live
  teacher; a frozen or trust_region teacher's copy is θ_0 already, and LoRA's reference is the base without adapters);
  DDP's gradient buckets ``P_t·4``; a colocated vLLM engine's share ``vllm_gpu_memory_utilization × GPU memory``
  (its weights and KV cache live in it; a server runs on GPUs of its own).

Each phase adds what it holds at its peak; the step peaks in the largest phase:

- **generation** (transformers): KV cache ``2·L·k·d·b`` per token × rows × (prompt + new tokens), one layer's cache
  again while ``DynamicCache`` concatenates, ``GEN_BUFFERS`` float32 ``[rows, V]`` buffers per decoding step (the
  Gumbel sampler's float64 noise included) or the prefill's working set; vLLM: the weight sync's largest tensor,
  gathered whole in float32.
- **reference forward** (no gradient, once per rollout batch, with a reference term): the student's rows through the
  initial weights, as the teacher forward below but over ``S`` positions, then ``log π_ref(y_t)`` (fused: chunk by chunk;
  the same counts as the teacher forward and the log-probabilities, not measured as a phase of its own).
- **teacher forward** (no gradient): on the fused path ``L + 1`` hidden-state tensors ``[m, S_t, H]`` (the forward asks
  for the hidden states, and transformers then keeps every layer's), one layer's working set, one parameter's clone
  while the teacher weights are swapped in, the teacher's LM-head clone ``V·H·4``.
- **loss** (student forward, statistics, loss forward): the saved activations, the teacher outputs and LM-head clone,
  then the larger of the statistics (2 logits chunks + ``STATS_BUFFERS`` float32 ``[c, V]``) and the fused loss (its
  float32 ``[V, H]`` gradient, ``[N, H]`` gradient and ``FUSED_BUFFERS`` ``[c, V]``); unfused: the student's
  ``[m, T, V]`` logits plus the larger of the statistics' chunk and ``UNFUSED_BUFFERS`` float32 ``[m, T, V]``. The
  feedback credit (``training.feedback_credit_every``) reads the teacher again while the loss's gradients are held.
  Under bfloat16 autocast each chunk's matmul adds a bfloat16 copy of the float32 head (``V·H·2``).
- **backward**: at its start the activations with the fused loss's two ``[V, H]`` gradients (or the unfused loss's
  ``UNFUSED_BACKWARD_BUFFERS``), at its end every gradient ``P_t·4/s`` (tied embeddings: two more ``[V, H]`` while the
  embedding's gradient is added to the head's); with several micro-batches the gradients are held through the later
  micro-batches' loss phases.
- **optimizer step**: the gradients plus AdamW's temporaries: on CUDA (``foreach``) a float32 copy of all trainable
  weights (``√v``), on CPU (per tensor) two of the largest trainable tensor.

Activations per token and layer, counted from the tensors Qwen3's decoder layer saves for backward (SDPA attention,
left-padded batches, so the ``[m, 1, S, S]`` mask is materialised once per layer):
``b·(4H + 4I + 3ad + 2a'd + kd + S) + 4·(2H + ad + kd + 2a + k + 2)``, with ``a' = a`` when key/value heads are
repeated (``1 < k < a``) and ``a' = k`` otherwise; float32 weights under bfloat16 autocast (unsharded full fine-tuning)
save ``2·(4I + 5H + 3ad + 2a'd + kd + S) + 4·(4H + ad + kd + 2a + k + 2)`` plus a bfloat16 copy of every layer matrix;
gradient checkpointing keeps ``b·H`` per token and layer plus one recomputed layer. Every count above was measured with
:class:`llm.memory_measure.PeakMemory` and is re-measured by ``tests/test_llm_memory.py``;
``benchmarks/bench_memory_plan.py`` compares whole plans with measured peaks of training steps.

``device="cuda"`` adds a fixed 3 GiB (CUDA context, allocator fragmentation), and the sharding strategies what they
gather: FSDP2 the root unit (embeddings, LM head) and two decoder layers in the compute dtype plus one layer's
unsharded float32 gradients; ZeRO-3 the largest module and its prefetch/reduce buckets (``0.9·H²`` and ``H²``
elements, accelerate's "auto"). Those GPU terms are not measured yet. ``device="cpu"`` plans one process on CPU
(strategy ``single``) with no allowance: the configuration a CPU measurement can check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from sdpo_sim.core.losses import default_chunk_size

from .recipe import Recipe
from .teacher_weights import KEEPS_INITIAL

GIB = 1024 ** 3
OVERHEAD_GB = 3.0  # CUDA context + caching-allocator fragmentation (device="cuda" only)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("fsdp2", "zero3", "ddp", "single")
DEVICES = ("cuda", "cpu")
# float32 [rows, V] buffers alive at once in one decoding step of llm.generation (logits, their float32 copy, the
# Gumbel sampler's float64 uniforms and their logs, the warped and perturbed scores), measured
GEN_BUFFERS = 10.0
# float32 [c, V] buffers of the fused loss's forward at its peak, by (support, alpha): measured
FUSED_BUFFERS = {("full", 1.0): 6, ("full", 0.0): 8, ("full", None): 15, ("topk", None): 5, ("sampled", None): 5}
# token_stats per chunk, on top of the two [c, V] logits chunks (in the hidden states' dtype): float32 buffers
STATS_BUFFERS = {"kl": 7, "mixed": 8}
# token_stats without a teacher (entropy only) from logits: log-softmax, its exp and their product
ENTROPY_BUFFERS = 3
# unfused: float32 [m, T, V] buffers the loss holds at its forward peak (on top of the b-byte logits), measured
UNFUSED_BUFFERS = {("full", 1.0): 7, ("full", 0.0): 7, ("full", None): 12, ("topk", None): 2, ("sampled", None): 2}
# unfused: float32 [m, T, V] buffers the loss's backward adds to the saved activations (its saved tensors and the
# gradients of the logits), and those of the policy gradient's log-softmax (saved output, gather's and its gradients)
UNFUSED_BACKWARD_BUFFERS = {("full", 1.0): 5, ("full", 0.0): 3, ("full", None): 9, ("topk", None): 3, ("sampled", None): 3}
PG_BACKWARD_BUFFERS = 3
# token_logprobs from hidden states (checkpointed chunks; its backward recomputes a chunk): float32 [c, V] buffers
LOGPROB_BUFFERS = 3
# KNOWN_CONFIGS: config.json numbers a plan should know without network (the published configs)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-1.7B": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
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


def _dims(cfg: dict[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    """``(V, H, I, L, a, k, d)`` of a Llama/Qwen-style config."""
    heads = cfg["num_attention_heads"]
    return (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
            cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads)


def layer_parameter_count(cfg: dict[str, Any]) -> int:
    """Parameters of one decoder layer: q, k, v, o (+ Qwen3's q/k norms), the gated MLP and two norms."""
    _, h, inter, _, heads, kv, hd = _dims(cfg)
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd
    return attn + 3 * h * inter + 2 * h


def parameter_count(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen-style decoder from its config (embeddings, attention, gated MLP, norms)."""
    v, h, _, layers, _, _, _ = _dims(cfg)
    embed = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return embed + layers * layer_parameter_count(cfg) + h


def lora_parameter_count(cfg: dict[str, Any], r: int, targets: list[str]) -> int:
    """Adapter parameters: ``r·(d_in + d_out)`` per targeted projection per layer."""
    shapes = _projection_shapes(cfg)
    return cfg["num_hidden_layers"] * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def _projection_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    _, h, inter, _, heads, kv, hd = _dims(cfg)
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def lora_largest_tensor(cfg: dict[str, Any], r: int, targets: list[str]) -> int:
    """Elements of the largest adapter matrix (``r × max(d_in, d_out)``)."""
    shapes = _projection_shapes(cfg)
    return max((r * max(shapes[t]) for t in targets if t in shapes), default=0)


def activation_bytes_per_token(cfg: dict[str, Any], b: int, span: int, *, autocast: bool = False) -> float:
    """Bytes one decoder layer saves for backward per token (SDPA, padded batch; ``span``: keys each query attends
    over, the ``[m, 1, S, S]`` mask's row), weights in ``b``-byte elements, or float32 weights under bfloat16
    autocast (``autocast``: each projection casts its input again); see the module docstring for the count."""
    _, h, inter, _, a, k, d = _dims(cfg)
    kv_rep = a if 1 < k < a else k
    small = 4 * (a * d + k * d + 2 * a + k + 2)  # float32 norm statistics and the normalised q / k
    if autocast:
        return 2 * (4 * inter + 5 * h + 3 * a * d + 2 * kv_rep * d + k * d + span) + 4 * 4 * h + small
    return b * (4 * h + 4 * inter + 3 * a * d + 2 * kv_rep * d + k * d + span) + 4 * 2 * h + small


def _loss_key(support: str, alpha: float) -> tuple[str, Optional[float]]:
    if support == "full":
        return ("full", alpha) if alpha in (0.0, 1.0) else ("full", None)
    return (support, None)


def memory_plan(
    recipe: Recipe,
    *,
    gpus_per_node: int = 1,
    nodes: int = 1,
    gpu_memory_gb: float,
    strategy: str = "fsdp2",
    micro_batch: Optional[int] = None,
    device: str = "cuda",
) -> dict[str, Any]:
    """The per-process plan: every term in GiB (``<term>_gb``), the phases (``phases``: name → GiB on top of what is
    held), the ``peak_phase``, ``total_gb`` and ``fits`` (``total_gb ≤ gpu_memory_gb``); see the module docstring.

    ``device="cpu"``: one process on CPU (``strategy`` must be ``single``; no CUDA allowance; ``gpu_memory_gb`` is
    the host memory to compare with)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not allowed; choose one of {', '.join(DEVICES)}")
    for name, value in (("gpus_per_node", gpus_per_node), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb={gpu_memory_gb!r} must be > 0")
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1):
        raise ValueError(f"micro_batch={micro_batch!r} must be a positive integer (or None for the recipe's share)")
    n = gpus_per_node * nodes
    if strategy == "single" and n != 1:
        raise ValueError(f"strategy='single' plans one process; got {n} GPUs (use ddp, fsdp2 or zero3)")
    if device == "cpu" and strategy != "single":
        raise ValueError(f"device='cpu' plans one process (strategy single); got strategy={strategy!r}")
    cfg = model_config(recipe.model.path)
    V, H, I, L, a, k, d = _dims(cfg)
    tied = bool(cfg.get("tie_word_embeddings", False))
    m, t, spec, gen = recipe.method, recipe.training, recipe.model, recipe.generation
    shard = n if strategy in ("fsdp2", "zero3") else 1
    dtype = spec.dtype if spec.dtype != "auto" else str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    b = BYTES.get(dtype, 4)
    params = parameter_count(cfg)
    lora = spec.lora
    trainable = lora_parameter_count(cfg, lora.r, lora.target_modules) if lora else params
    frozen = params if lora else 0  # LoRA: the base stays, in the compute dtype
    head_trainable = lora is None
    # float32 master weights under bfloat16 autocast (unsharded full fine-tuning): every matmul casts its weight, and
    # the backward keeps the copies; sharded runs gather bfloat16 copies instead, LoRA's base is bfloat16 already
    cast = b == 2 and lora is None and shard == 1
    largest = lora_largest_tensor(cfg, lora.r, lora.target_modules) * 4 if lora else max(V * H, I * H) * 4  # float32 bytes

    # --- held for the whole step
    terms: dict[str, float] = {}
    terms["weights"] = (trainable * 4 + frozen * b) / shard
    if strategy == "zero3" and b == 2:  # DeepSpeed's bf16 engine: bfloat16 partitions beside the float32 masters
        terms["weights"] += trainable * 2 / shard
    terms["optimizer"] = 2 * trainable * 4 / shard
    copy = m.teacher_kind != "live"  # the trainer keeps the copy whatever the method (grpo/reinforce never read it)
    terms["teacher"] = trainable * 4 / shard if copy else 0.0
    ref_copy = m.uses_reference and lora is None  # the reference swaps θ_0 in (llm.teacher_weights.Reference)
    terms["reference"] = trainable * 4 / shard if ref_copy and m.teacher_kind not in KEEPS_INITIAL else 0.0
    terms["ddp_buckets"] = trainable * 4 if strategy == "ddp" else 0.0
    vllm = gen.backend == "vllm"
    colocated = vllm and gen.vllm_mode == "colocate"  # a server runs on GPUs of its own
    terms["vllm"] = gen.vllm_gpu_memory_utilization * gpu_memory_gb * GIB if colocated and device == "cuda" else 0.0
    layer_params = layer_parameter_count(cfg)
    if strategy == "fsdp2":  # root unit (embeddings + head) and two layers gathered in the compute dtype
        terms["gathered"] = (V * H * (1 if tied else 2) + 2 * layer_params) * b + layer_params * 4
    elif strategy == "zero3":  # the largest module gathered whole, plus prefetch (0.9·H²) and reduce (H²) buckets
        terms["gathered"] = V * H * b + 0.9 * H * H * b + H * H * 4
    else:
        terms["gathered"] = 0.0
    held = sum(terms.values())

    # --- shapes per process
    rows = max(1, t.prompts_per_step * m.num_generations // n)  # completions this process generates per step
    seqs = micro_batch or t.micro_batch_size or rows
    seqs = min(seqs, rows)
    parts = -(-rows // seqs)  # micro-batches per update
    P_len, T = t.max_prompt_length, t.max_new_tokens
    C_len = recipe.context.max_context_tokens
    S, S_t = P_len + T, C_len + T
    fused = m.distills and (t.fused_loss is True or (t.fused_loss == "auto" and V >= t.fused_min_vocab)) \
        and m.teacher_kind != "trust_region"
    chunk = t.chunk_size or default_chunk_size(V)
    share = (t.share_prompt_prefix is True or (t.share_prompt_prefix == "auto" and not spec.gradient_checkpointing
                                                and shard == 1))
    needs_logp = m.uses_policy_gradient or m.uses_reference or t.updates_per_batch > 1

    # --- generation
    phases: dict[str, dict[str, float]] = {}
    if vllm:  # weights synced one tensor at a time: the largest gathered whole, in float32 (LoRA: merged in float32)
        phases["generation"] = {"vllm_weight_sync": max(V * H, I * H) * 4}
    else:
        kv_token = 2 * L * k * d * b
        phases["generation"] = {
            "kv_cache": kv_token * rows * S + kv_token / L * rows * S,
            "decode_buffers": GEN_BUFFERS * rows * V * 4,
            "prefill": rows * P_len * (3 * I + 3 * H) * b + rows * P_len * P_len * b,
        }
    terms["kv_cache"] = phases["generation"].get("kv_cache", 0.0)

    # --- reference forward (no gradient): the student rows through θ_0, then log π_ref(y_t)
    if m.uses_reference:
        Nr = seqs * T
        phases["reference_forward"] = {
            "hidden_states" if fused else "reference_logits": (L + 1) * seqs * S * H * b if fused else seqs * (T + 1) * V * b,
            "layer_working_set": seqs * S * (3 * I + 3 * H) * b + seqs * S * S * b,
            "swap_clone": largest / shard if ref_copy else 0.0,
            "log_probabilities": LOGPROB_BUFFERS * min(chunk, Nr) * V * 4 if fused else Nr * V * 4 * (1 if b == 4 else 2),
        }

    # --- teacher forward (no gradient): all hidden states kept on the fused path
    teacher_rows = seqs if m.distills else 0
    head_clone = V * H * (4 if head_trainable else b) if (fused and copy) else 0.0  # cloned even when frozen (LoRA)
    if m.distills:
        out_width = H if fused else V
        kept = ((L + 1) * teacher_rows * S_t * H * b) if fused else teacher_rows * (T + 1) * V * b
        if m.teacher_kind == "trust_region":  # two teacher forwards, mixed
            kept *= 2
        phases["teacher_forward"] = {
            "hidden_states" if fused else "teacher_logits": kept,
            "layer_working_set": teacher_rows * S_t * (3 * I + 3 * H) * b + teacher_rows * S_t * S_t * b,
            "swap_clone": largest / shard if copy else 0.0,  # one local shard at a time
            "teacher_head": head_clone,
        }
    else:
        out_width = V

    # --- loss: student forward (saved activations), statistics, loss forward
    if share:  # prompts once per group (m/G prefixes), completions per row, keys over prompt + completion
        groups = max(1, -(-seqs // m.num_generations))
        span_tokens = groups * P_len + seqs * T
        acts = (groups * P_len * activation_bytes_per_token(cfg, b, P_len, autocast=cast) + seqs * T * activation_bytes_per_token(cfg, b, S, autocast=cast)) * L
        acts += 2 * L * seqs * P_len * k * d * b  # the prefix cache gathered for every row
    else:
        span_tokens = seqs * S
        acts = L * span_tokens * activation_bytes_per_token(cfg, b, S, autocast=cast)
    if spec.gradient_checkpointing:  # layer inputs + one layer recomputed in backward
        acts = L * span_tokens * H * b + span_tokens * activation_bytes_per_token(cfg, b, S, autocast=cast)
    acts += span_tokens * (3 * H * b + 2 * d * 4)  # embeddings, final norm, rotary tables
    if cast:  # the bfloat16 copies of the layers' matrices, kept for backward
        acts += L * (layer_params - 2 * H - 2 * d) * 2
    terms["activations"] = acts
    key = _loss_key(m.support, m.alpha)
    stats_kind = "kl" if m.alpha in (0.0, 1.0) else "mixed"
    Nc = seqs * T  # completion tokens per forward
    rows_c = min(chunk, Nc)  # rows of one [c, V] chunk (a forward with fewer tokens than a chunk has one smaller chunk)
    teacher_out = Nc * out_width * b if m.distills else 0.0
    head_cast = V * H * 2 if cast else 0.0  # autocast's bfloat16 copy of the float32 LM head, per chunk matmul
    if fused:
        stats = rows_c * V * (2 * b + 4 * STATS_BUFFERS[stats_kind]) + head_cast
        grad_w = V * H * 4 if head_trainable else 0.0
        loss_fwd = grad_w + Nc * H * b + FUSED_BUFFERS[key] * rows_c * V * 4 + head_cast
        logits = max(stats, loss_fwd)
        if needs_logp:
            logits = max(logits, LOGPROB_BUFFERS * rows_c * V * 4)
    else:
        student_logits = Nc * V * b
        stats = rows_c * V * 4 * (STATS_BUFFERS[stats_kind] if m.distills else ENTROPY_BUFFERS)
        loss_fwd = UNFUSED_BUFFERS.get(key, 7) * Nc * V * 4 if m.distills else 0.0
        if needs_logp:
            loss_fwd += Nc * V * 4 * (1 if b == 4 else 2)  # log_softmax of the float32 logits
        logits = student_logits + max(stats, loss_fwd)
        grad_w = 0.0
    terms["logits"] = logits
    grads = trainable * 4 / shard
    terms["gradients"] = grads
    carried = grads if parts > 1 else 0.0  # later micro-batches run with the accumulated gradients
    loss_phase = {"activations": acts, "teacher_outputs": teacher_out, "teacher_head": head_clone, "logits": logits,
                  "accumulated_gradients": carried}
    if m.distills and t.feedback_credit_every > 0:  # the credit's teacher forward after the loss forward
        residue = grad_w + Nc * H * b if fused else 0.0  # the fused loss's [V, H] and [N, H] gradients, held to backward
        credit = residue + head_clone + max(stats, phases["teacher_forward"]["hidden_states" if fused else "teacher_logits"])
        loss_phase["logits"] = max(logits, credit)
    phases["loss"] = loss_phase

    # --- backward and optimizer step
    embed_sum = 2 * V * H * 4 if (tied and head_trainable) else 0.0
    if fused:  # the fused loss hands back its float32 [V, H] gradient and a copy in the weight's dtype
        bwd_logits = grad_w + V * H * 4 if head_trainable else 0.0
    else:
        bwd_logits = Nc * V * b + Nc * V * 4 * ((UNFUSED_BACKWARD_BUFFERS.get(key, 5) if m.distills else 0)
                                                + (PG_BACKWARD_BUFFERS if needs_logp else 0))
    phases["backward"] = {"start": acts + bwd_logits + carried, "end": grads + embed_sum}
    step_temp = trainable * 4 / shard if device == "cuda" else 2 * largest
    terms["step_temporaries"] = step_temp
    phases["optimizer"] = {"gradients": grads, "step_temporaries": step_temp}

    def size(name: str, parts_: dict[str, float]) -> float:
        if name == "backward":  # its start or its end
            return max(parts_.values())
        if name == "generation" and "kv_cache" in parts_:  # the prefill's working set comes before the decoding
            return parts_["kv_cache"] + max(parts_["decode_buffers"], parts_["prefill"])
        return sum(parts_.values())

    phase_bytes = {name: size(name, p) for name, p in phases.items()}
    peak_phase = max(phase_bytes, key=phase_bytes.get)
    overhead = OVERHEAD_GB if device == "cuda" else 0.0
    total = (held + phase_bytes[peak_phase]) / GIB + overhead
    return {
        "model": recipe.model.path, "parameters": params, "trainable": trainable, "gpus": n, "strategy": strategy,
        "device": device, "dtype": dtype, "generation_rows": rows, "sequences_per_gpu": seqs,
        "micro_batches": parts, "tokens_per_sequence": S, "fused_loss": fused, "chunk_size": chunk,
        "generation_backend": gen.backend, "shared_prefix": share,
        **{f"{name}_gb": x / GIB for name, x in terms.items()},
        "held_gb": held / GIB,
        "phases": {name: {"total_gb": phase_bytes[name] / GIB, **{f"{p}_gb": x / GIB for p, x in parts_.items()}}
                   for name, parts_ in phases.items()},
        "peak_phase": peak_phase, "overhead_gb": overhead,
        "total_gb": total, "gpu_memory_gb": float(gpu_memory_gb), "fits": total <= gpu_memory_gb,
    }


HELD = ("weights", "optimizer", "teacher", "reference", "ddp_buckets", "gathered", "vllm")


def format_plan(plan: dict[str, Any]) -> str:
    """A readable table of a plan: what is held, each phase, and the peak."""
    where = f"{plan['gpus']} GPUs" if plan["device"] == "cuda" else "1 process on CPU"
    loss = f"fused (chunks of {plan['chunk_size']} tokens)" if plan["fused_loss"] else "unfused (full logits)"
    lines = [
        f"memory plan: {plan['model']}  ({plan['parameters'] / 1e9:.2f} B parameters, {plan['trainable'] / 1e9:.3f} B trainable, "
        f"{plan['dtype']} compute, float32 trainable weights)",
        f"cluster: {where}, {plan['strategy']}; generation {plan['generation_rows']} rows ({plan['generation_backend']}); "
        f"{plan['sequences_per_gpu']} sequences × {plan['tokens_per_sequence']} tokens per forward "
        f"({plan['micro_batches']} micro-batch{'es' if plan['micro_batches'] > 1 else ''}); loss {loss}",
        "  held through the step",
    ]
    for key in HELD:
        if plan[key + "_gb"] or key in ("weights", "optimizer", "teacher"):
            lines.append(f"    {key:<22} {plan[key + '_gb']:9.2f} GiB")
    lines.append("  phases (each on top of the above; the step peaks in the largest)")
    for name, ph in plan["phases"].items():
        mark = "  <- peak" if name == plan["peak_phase"] else ""
        detail = ", ".join(f"{k[:-3].replace('_', ' ')} {v:.2f}" for k, v in ph.items() if k != "total_gb" and v)
        lines.append(f"    {name:<22} {ph['total_gb']:9.2f} GiB{mark}   ({detail or 'nothing'})")
    if plan["overhead_gb"]:
        lines.append(f"  {'overhead (CUDA)':<24} {plan['overhead_gb']:9.2f} GiB")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT (fewer prompts_per_step, micro_batch_size, more GPUs, LoRA or gradient checkpointing)"
    unit = "GiB per GPU" if plan["device"] == "cuda" else "GiB of host memory"
    lines.append(f"  {'total':<24} {plan['total_gb']:9.2f} GiB of {plan['gpu_memory_gb']:.0f} {unit}: {verdict}")
    return "\n".join(lines)
