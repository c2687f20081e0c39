"""The prepared GPU check: one command, one CUDA GPU (H100/H200 class), under 8 minutes; JSON + rows of RESULTS.md.

    bash benchmarks/gpu_check.sh                    # on the GPU machine: every section, then RESULTS.md re-rendered
    python benchmarks/gpu_check.py --dry-run        # CPU, tiny sizes, < 60 s: what tests/test_gpu_check.py runs

Sections, in order of importance (on the GPU each runs in a child process with its own time limit, so a crash, an
out-of-memory or a hang loses that section only; the results file is rewritten atomically after each):

1. ``fused_loss``: the SDPO loss, forward + backward, at N = 16,384 tokens, V = 151,936, H = 4096, bf16: ours fused
   (``fused_linear_sdpo_loss``, default chunk and 1024-row chunks) vs TRL's full-logit helper
   (``compute_full_logit_self_distillation_loss`` on materialised logits): time and peak memory.
2. ``train_qwen3_1_7b`` / ``train_qwen3_8b_lora``: our ``Trainer`` on a randomly initialised model with Qwen3-1.7B's
   published architecture (full fine-tuning) and Qwen3-8B's (LoRA r = 16), built from configs in code and saved
   locally (no hub): one step with generation, then updates on that batch: completion tokens/s, MFU, peak memory
   against ``llm.memory_plan.memory_plan``'s prediction.
3. ``sdpo_vs_trl``: one SDPO update, ours (fused loss, shared prompt prefixes) vs TRL ``SDPOTrainer``'s own
   ``_compute_teacher_student_logits`` + ``_compute_self_distillation_loss`` (as in tests/test_peers_trl_trainer.py),
   same Qwen3-1.7B-architecture model and batch: tokens/s and peak memory.
4. ``vllm`` (when vLLM is installed): a colocated ``VLLMEngine`` fed by ``VLLMGenerator``'s weight sync: generation
   throughput, sync time, and the log-probability gap between vLLM and the trainer on the same sampled tokens —
   after a sync, with a stale engine (the baseline: what an unsynced engine would give), and with LoRA weights merged.
   The dry run serves the same steps with ``TransformersEngine``.

Random token ids and the built-in rule-based task are enough: nothing here measures quality. Peak memory on the GPU is
``torch.cuda.max_memory_allocated`` (and ``_reserved``); on CPU (dry run) peak RSS growth. MFU = model FLOPs of the
update (matmuls and causal attention of the nominal batch; backward ×2 for full fine-tuning, ×1 for LoRA's frozen
weights; the teacher's no-grad forward once) ÷ time ÷ the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, PeakRSS, figure, load_average, trl_sdpo_loss_fn, write_results  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

from llm import memory_plan as plan_module  # noqa: E402
from llm.generation import (  # noqa: E402
    TransformersEngine,
    VLLMEngine,
    VLLMGenerator,
    completion_logprobs,
    logprob_gap,
    require_vllm,
)
from llm.losses import sdpo_loss  # noqa: E402
from llm.models import completion_outputs  # noqa: E402
from llm.recipe import GenerationConfig, Recipe  # noqa: E402
from llm.tiny import build_char_tokenizer  # noqa: E402
from llm.trainer import Trainer  # noqa: E402
from sdpo_sim.core.io import atomic_write_text  # noqa: E402
from sdpo_sim.core.losses import default_chunk_size, fused_linear_sdpo_loss  # noqa: E402
from sdpo_sim.core.method import MethodConfig  # noqa: E402

NAME = "gpu_check"
GIB = 1024 ** 3
SECTIONS = ("fused_loss", "train_qwen3_1_7b", "sdpo_vs_trl", "train_qwen3_8b_lora", "vllm")
# seconds a section may take on the GPU (child process, imports included); the whole run is also capped by --budget-s
CAPS = {"fused_loss": 90, "train_qwen3_1_7b": 150, "sdpo_vs_trl": 100, "train_qwen3_8b_lora": 180, "vllm": 200}
# Qwen3-1.7B's published config.json numbers; Qwen3-8B's are llm.memory_plan.KNOWN_CONFIGS["Qwen/Qwen3-8B"]
QWEN3_1_7B = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}
QWEN3_8B = dict(plan_module.KNOWN_CONFIGS["Qwen/Qwen3-8B"])
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True}
# dense bf16 tensor-core peak (FLOP/s) by device name; MFU is left empty on other devices (or give --peak-tflops)
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}

GPU_SIZES = {
    "fused": {"n": 16384, "v": 151936, "h": 4096, "dtype": "bfloat16", "repeats": 3, "chunk": 1024},
    "train": {"prompts": 8, "generations": 4, "new": 128, "prompt_len": 256, "micro": 8, "repeats": 2, "lora_r": 16},
    "trl": {"prompts": 8, "generations": 4, "prompt_len": 256, "context_len": 512, "completion_len": 128, "repeats": 3},
    "vllm": {"prompts": 64, "generations": 8, "new": 256, "prompt_len": 128, "gap_prompts": 16, "gap_generations": 4,
             "lora_r": 16, "memory": 0.35},
}
DRY_SIZES = {
    "fused": {"n": 256, "v": 2048, "h": 64, "dtype": "float32", "repeats": 1, "chunk": 64},
    "train": {"prompts": 2, "generations": 2, "new": 4, "prompt_len": 48, "micro": 0, "repeats": 1, "lora_r": 4},
    "trl": {"prompts": 2, "generations": 2, "prompt_len": 12, "context_len": 24, "completion_len": 6, "repeats": 1},
    "vllm": {"prompts": 2, "generations": 2, "new": 4, "prompt_len": 8, "gap_prompts": 2, "gap_generations": 2,
             "lora_r": 4, "memory": 0.35},
}


# ------------------------------------------------------------------------------------------- shared pieces
class Ctx(SimpleNamespace):
    """What every section reads: ``dry`` (CPU, tiny), ``device``, ``work`` (scratch directory), ``sizes``."""

    def arch(self, which: str) -> dict:
        if self.dry:
            return dict(TINY, tie_word_embeddings=which != "8b")
        return dict(QWEN3_8B if which == "8b" else QWEN3_1_7B)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.dry else torch.bfloat16

    def name(self, which: str) -> str:
        """How figures name the model: its architecture, or the dry run's tiny stand-in for it."""
        arch = {"1.7b": "Qwen3-1.7B", "8b": "Qwen3-8B"}[which]
        return f"tiny stand-in for {arch}" if self.dry else f"{arch} architecture"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Peak:
    """Peak memory of a block: CUDA's allocator counters on a GPU, RSS growth on CPU (GiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> "Peak":
        gc_collect(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.rss = PeakRSS().start()
        return self

    def read(self) -> dict[str, Optional[float]]:
        """``peak_gib`` (absolute: everything allocated at the peak, GPU only), ``growth_gib`` (above the start),
        ``reserved_gib`` (what the CUDA allocator held at its peak, GPU only)."""
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated()
            return {"peak_gib": peak / GIB, "growth_gib": (peak - self.base) / GIB,
                    "reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        return {"peak_gib": None, "growth_gib": self.rss.growth_mib() / 1024, "reserved_gib": None}


def gc_collect(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def qwen3_config(arch: dict, tokenizer) -> Qwen3Config:
    return Qwen3Config(**arch, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def random_model(ctx: Ctx, arch: dict, seed: int = 0):
    """A randomly initialised Qwen3 causal LM with architecture ``arch``, built directly on the device in its dtype."""
    torch.manual_seed(seed)
    with torch.device(ctx.device):
        return AutoModelForCausalLM.from_config(qwen3_config(arch, ctx.tokenizer), dtype=ctx.dtype)


def saved_model(ctx: Ctx, which: str) -> Path:
    """``ctx.work/model-WHICH``: a random model of that architecture with the character tokenizer, saved once."""
    out = ctx.work / f"model-{which}"
    if not (out / "config.json").is_file():
        model = random_model(ctx, ctx.arch(which))
        model.save_pretrained(out, max_shard_size="5GB")
        ctx.tokenizer.save_pretrained(out)
        del model
        gc_collect(ctx.device)
    return out


def peak_flops(ctx: Ctx) -> Optional[float]:
    if ctx.peak_tflops:
        return ctx.peak_tflops * 1e12
    if ctx.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def forward_flops(arch: dict, lengths: list[int], head_tokens: int) -> float:
    """Matmul FLOPs of a forward over rows of ``lengths`` tokens (projections, MLP, causal attention ``QKᵀ`` and
    ``AV`` at 2 FLOPs per multiply-add) plus the LM head on ``head_tokens`` positions (the fused loss computes it only
    at completion positions); embeddings are a lookup."""
    h, layers, inter = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    heads, kv, hd = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    per_token = layers * (2 * h * heads * hd * 2 + 2 * h * kv * hd * 2 + 2 * 3 * h * inter)
    attention = layers * 2 * heads * hd * sum(n * n for n in lengths)  # 2·2·heads·hd per (query, key) pair, n²/2 pairs
    return per_token * sum(lengths) + attention + 2 * h * arch["vocab_size"] * head_tokens


def trl_sdpo_trainer():
    """TRL's SDPOTrainer class (optional: the peers extra), or None when TRL is not installed."""
    try:
        from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer  # noqa: I001 (optional package: peers extra)
    except ImportError:
        return None
    return SDPOTrainer


def trl_loss_utils():
    try:
        from trl.experimental.sdpo import loss_utils  # optional package (peers extra)
    except ImportError:
        return None
    return loss_utils


# ------------------------------------------------------------------------------------------- 1. fused loss vs TRL
def section_fused_loss(ctx: Ctx) -> dict:
    s, dev = ctx.sizes["fused"], ctx.device
    n, v, h, dtype = s["n"], s["v"], s["h"], getattr(torch, s["dtype"])
    g = torch.Generator(device=dev).manual_seed(0)
    hs = (torch.randn(n, h, generator=g, device=dev) / h ** 0.25).to(dtype).requires_grad_(True)  # logits of O(1)
    ht = (torch.randn(n, h, generator=g, device=dev) / h ** 0.25).to(dtype)
    w = (torch.randn(v, h, generator=g, device=dev) / h ** 0.25).to(dtype).requires_grad_(True)
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    mask[: n // 16] = False
    trl = trl_loss_utils()

    def fused(chunk):
        return lambda: fused_linear_sdpo_loss(hs, ht, w, mask, alpha=1.0, chunk_size=chunk)

    def trl_full():
        logits = hs @ w.T
        with torch.no_grad():
            t_logits = ht @ w.T
        per_tok = trl.compute_full_logit_self_distillation_loss(logits, t_logits, distillation_alpha=1.0)
        return (per_tok * mask).sum() / mask.sum()

    variants = {"ours_fused": fused(None), f"ours_fused_chunk{s['chunk']}": fused(s["chunk"])}
    if trl is not None:
        variants["trl_full"] = trl_full
    rows = {}
    for name, loss_fn in variants.items():
        def step():
            hs.grad, w.grad = None, None
            loss = loss_fn()
            loss.backward()
            return loss

        step()  # warm-up (kernels, allocator)
        hs.grad, w.grad = None, None
        mem = Peak(dev).start()
        times = [timed(step, dev) for _ in range(s["repeats"])]
        loss = float(step().detach())
        rows[name] = {"time_s": min(times), "loss": loss, **mem.read()}
        hs.grad, w.grad = None, None
        gc_collect(dev)
    figures = []
    base = rows.get("trl_full")
    label = f"N={n}, V={v}, H={h}, {s['dtype']}"
    for name in [k for k in rows if k.startswith("ours")]:
        o = rows[name]
        targets = name == "ours_fused"
        chunk = default_chunk_size(v) if name == "ours_fused" else s["chunk"]
        mem = figure(f"fused loss peak memory growth ({chunk}-row chunks) vs TRL full-logit, {label}", o["growth_gib"],
                     base and base["growth_gib"], "GiB", target_ratio=1 / 8 if targets else None)
        tim = figure(f"fused loss time fwd+bwd ({chunk}-row chunks) vs TRL full-logit, {label}", o["time_s"],
                     base and base["time_s"], "s", target_ratio=1.0 if targets else None)
        if base is None:
            mem["note"] = tim["note"] = "TRL is not installed (peers extra): no baseline"
        elif not targets:
            mem["note"] = tim["note"] = "informative: a GPU-sized chunk (the default is sized for 32 MiB fp32 buffers on CPU)"
        figures += [mem, tim]
    losses = [r["loss"] for r in rows.values()]
    rel = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12)
    return {"figures": figures, "raw": {f"fused_loss/{k}": r for k, r in rows.items()},
            "details": {"N": n, "V": v, "H": h, "dtype": s["dtype"], "default_chunk": default_chunk_size(v),
                        "loss_relative_spread": rel, "repeats": s["repeats"]}}


# ------------------------------------------------------------------------------------------- 2. trainer steps vs the plan
def train_recipe(ctx: Ctx, model_dir: Path, out_dir: Path, dtype: str, lora_r: Optional[int]) -> Recipe:
    s = ctx.sizes["train"]
    return Recipe.from_dict({
        "model": {"path": str(model_dir), "dtype": dtype, "gradient_checkpointing": False, "attn_implementation": "sdpa",
                  "lora": None if lora_r is None else {"r": lora_r, "alpha": 2 * lora_r}},
        "task": {"name": "word-constraints", "feedback": "critique"},
        "method": {"name": "sdpo", "alpha": 1.0, "support": "topk", "topk": 100, "add_tail": True, "teacher_kind": "ema",
                   "teacher_rate": 0.01, "num_generations": s["generations"], "temperature": 1.0},
        "context": {"max_context_tokens": 2 * s["prompt_len"]},
        "training": {"steps": 100, "learning_rate": 1e-6, "prompts_per_step": s["prompts"], "max_new_tokens": s["new"],
                     "max_prompt_length": s["prompt_len"], "micro_batch_size": s["micro"], "output_dir": str(out_dir),
                     "save_every": 0, "heatmap_every": 0, "report_to": ["jsonl"], "fused_min_vocab": 256 if ctx.dry else 32768},
    }, source="gpu_check")


def plan_for(recipe: Recipe, ctx: Ctx) -> dict:
    """``llm.memory_plan.memory_plan`` for one unsharded GPU (its current API, read at run time)."""
    strategies = getattr(plan_module, "STRATEGIES", ())
    strategy = "single" if "single" in strategies else "ddp"
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if ctx.device.type == "cuda" else 80.0
    kwargs = {"gpus_per_node": 1, "nodes": 1, "gpu_memory_gb": gpu_gib, "strategy": strategy}
    accepted = inspect.signature(plan_module.memory_plan).parameters
    return plan_module.memory_plan(recipe, **{k: x for k, x in kwargs.items() if k in accepted})


def section_train(ctx: Ctx, which: str) -> dict:
    s, dev = ctx.sizes["train"], ctx.device
    lora_r = s["lora_r"] if which == "8b" else None
    arch, model_dir = ctx.arch(which), saved_model(ctx, which)
    key = f"train_qwen3_{'8b_lora' if which == '8b' else '1_7b'}"
    label = f"{ctx.name(which)}, " + (f"LoRA r={lora_r}" if lora_r else "full fine-tuning")
    dtypes = ["float32"] if ctx.dry else ["bfloat16", "float32"]  # bf16 first; the trainer may refuse bf16 full FT
    refusal, trainer = None, None
    for dtype in dtypes:
        out_dir = ctx.work / f"run-{which}-{dtype}"
        shutil.rmtree(out_dir, ignore_errors=True)
        recipe = train_recipe(ctx, model_dir, out_dir, dtype, lora_r)
        try:
            trainer = Trainer(recipe)
            break
        except ValueError as err:  # e.g. bf16 trainable weights under plain AdamW
            refusal = str(err)
    if trainer is None:
        raise RuntimeError(f"the trainer refused every dtype: {refusal}")
    try:
        plan = plan_for(recipe, ctx)
    except Exception as err:  # the plan is another module's work in progress: its failure loses only the comparison
        plan = {"error": f"{type(err).__name__}: {err}"}
    mem = Peak(dev).start()
    batch, info = None, None

    def rollout():
        nonlocal batch, info
        batch, info = trainer.rollout(0)

    gen_s = timed(rollout, dev)
    gen_mem = mem.read()
    trainer.rollout = lambda step: (batch, info)  # the updates below reuse this batch: time the update alone
    first_update_s = timed(lambda: trainer.step(0), dev)  # also allocates AdamW's moments
    times = [timed(lambda i=i: trainer.step(1 + i), dev) for i in range(s["repeats"])]
    peak = mem.read()
    update_s = min(times)
    completion_tokens = float(batch.completion_mask.sum())
    student_lengths = batch.attention_mask.sum(-1).tolist()
    rows = batch.distill_mask.nonzero().squeeze(-1)
    teacher_lengths = batch.teacher_attention_mask[rows].sum(-1).tolist()
    backward = 1 if lora_r else 2  # LoRA: activation gradients only through the frozen weights
    flops = ((1 + backward) * forward_flops(arch, student_lengths, int(completion_tokens))
             + forward_flops(arch, teacher_lengths, int(batch.completion_mask[rows].sum())))
    peak_f = peak_flops(ctx)
    mfu = flops / update_s / peak_f if peak_f else None
    measured = peak["reserved_gib"] if peak["reserved_gib"] is not None else peak["growth_gib"]
    planned = plan.get("total_gb")
    tput = figure(f"{label}: update throughput (completion tokens/s)", completion_tokens / update_s, None, "tok/s")
    tput["note"] = (f"{int(completion_tokens)} completion tokens per update ({s['prompts']} prompts × {s['generations']}); "
                    f"with this step's generation ({gen_s:.1f} s): {completion_tokens / (gen_s + update_s):.0f} tok/s")
    mfu_fig = figure(f"{label}: MFU of the update", mfu, None, "")
    mfu_fig["note"] = f"{flops / 1e12:.1f} TFLOP per update (model FLOPs, see the docstring); dtype {recipe.model.dtype}"
    plan_fig = figure(f"{label}: peak memory measured vs the plan's prediction", measured, planned, "GiB", target_ratio=1.15)
    plan_fig["note"] = ("measured = torch.cuda.max_memory_reserved over generation + updates (the allocator's pool at its "
                        "peak; the plan's fixed allowance covers the CUDA context, which no counter sees); target: within "
                        "±15% (only the upper bound is encoded)" if dev.type == "cuda" else "dry run: RSS growth on CPU, not comparable")
    if plan_fig["ratio"] is not None and plan_fig["ratio"] < 0.85:
        plan_fig["note"] += f"; the plan over-predicts by {1 / plan_fig['ratio']:.2f}×"
    if "error" in plan:
        plan_fig["note"] = f"the plan failed: {plan['error']}"
    raw = {"time_s": update_s, "first_update_s": first_update_s, "generation_s": gen_s, "tokens_per_s": completion_tokens / update_s,
           "mfu": mfu, "peak_gib": peak["peak_gib"], "reserved_gib": peak["reserved_gib"], "growth_gib": peak["growth_gib"],
           "generation_peak_gib": gen_mem["peak_gib"], "plan_gib": planned}
    details = {"dtype": recipe.model.dtype, "refused_first": refusal if recipe.model.dtype != dtypes[0] else None,
               "parameters": sum(p.numel() for p in trainer.unwrapped.parameters()),
               "trainable": sum(p.numel() for p in trainer.unwrapped.parameters() if p.requires_grad),
               "fused": trainer.fused, "share_prefix": trainer.share_prefix, "update_times_s": times,
               "update_tflop": flops / 1e12, "plan": plan}
    trainer = batch = info = None  # free the GPU before the next section (closures hold these names)
    gc_collect(dev)
    return {"figures": [tput, mfu_fig, plan_fig], "raw": {key: raw}, "details": details}


# ------------------------------------------------------------------------------------------- 3. ours vs TRL SDPOTrainer
def section_sdpo_vs_trl(ctx: Ctx) -> dict:
    SDPOTrainer = trl_sdpo_trainer()
    if SDPOTrainer is None:
        return {"status": "skipped: TRL is not installed (peers extra)"}
    s, dev = ctx.sizes["trl"], ctx.device
    arch = ctx.arch("1.7b")
    model = random_model(ctx, arch)
    model.train()
    g = torch.Generator(device=dev).manual_seed(0)
    b, vocab = s["prompts"] * s["generations"], arch["vocab_size"]

    def ids(*shape):
        return torch.randint(4, vocab, shape, generator=g, device=dev)

    # a GRPO/SDPO batch: each prompt repeated G times; teacher context = prompt + a demonstration shared by the group +
    # the row's own feedback (llm.context's layout), then the same completion
    prompt = ids(s["prompts"], s["prompt_len"]).repeat_interleave(s["generations"], 0)
    demo_len = (s["context_len"] - s["prompt_len"]) // 2
    demo = ids(s["prompts"], demo_len).repeat_interleave(s["generations"], 0)
    context = torch.cat([prompt, demo, ids(b, s["context_len"] - s["prompt_len"] - demo_len)], 1)
    completion = ids(b, s["completion_len"])
    mask = torch.ones(b, s["completion_len"], device=dev)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": mask, "teacher_input_ids": torch.cat([context, completion], 1),
              "teacher_attention_mask": torch.ones(b, s["context_len"] + s["completion_len"], dtype=torch.long, device=dev),
              "self_distillation_mask": torch.ones(b, device=dev)}
    T = s["completion_len"]
    method = MethodConfig(name="sdpo", alpha=1.0, support="full", loss_type="sequence_mean")
    s_ids = torch.cat([prompt, completion], 1)
    s_mask = torch.cat([inputs["prompt_mask"], mask.long()], 1)
    head = model.get_output_embeddings().weight

    def ours():
        with torch.no_grad():
            teacher = completion_outputs(model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], T,
                                         hidden=True, share_prefix=True)
        student = completion_outputs(model, s_ids, s_mask, T, hidden=True, share_prefix=True)
        return sdpo_loss(student, teacher, completion, mask, method, max_len=T, weight=head)

    trl = trl_sdpo_loss_fn(model, inputs)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)

    def update(loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return float(loss.detach())
        return run

    with torch.no_grad():  # the same loss at the same weights, before any update
        at_start = {"ours": float(ours()), "trl": float(trl())}
    model.zero_grad(set_to_none=True)
    sides = {"ours": update(ours), "trl": update(trl)}
    for fn in sides.values():  # warm-up; AdamW's moments allocated
        fn()
    times = {k: [] for k in sides}
    peaks = {}
    for k, fn in sides.items():  # peak memory of one update above the steady state (weights, moments)
        opt.zero_grad(set_to_none=True)
        mem = Peak(dev).start()
        times[k].append(timed(fn, dev))
        peaks[k] = mem.read()
    for _ in range(s["repeats"] - 1):  # then alternately, so that drift hits both alike
        for k, fn in sides.items():
            times[k].append(timed(fn, dev))
    tokens = float(mask.sum())
    raw = {f"sdpo_vs_trl/{k}": {"time_s": min(t), "tokens_per_s": tokens / min(t), "loss": at_start[k], **peaks[k]}
           for k, t in times.items()}
    loss_spread = abs(at_start["ours"] - at_start["trl"]) / max(abs(at_start["trl"]), 1e-30)
    o, t = raw["sdpo_vs_trl/ours"], raw["sdpo_vs_trl/trl"]
    label = f"{b} completions × {T} tokens, {ctx.name('1.7b')}, {ctx.dtype}".replace("torch.", "")
    tput = figure(f"SDPO update throughput (completion tokens/s): ours vs TRL SDPOTrainer, {label}", o["tokens_per_s"],
                  t["tokens_per_s"], "tok/s", target_ratio=1.0, higher_is_better=True)
    mem = figure(f"SDPO update peak memory growth: ours vs TRL SDPOTrainer, {label}", o["growth_gib"], t["growth_gib"],
                 "GiB", target_ratio=1.0)
    tput["note"] = ("ours: fused loss (no [tokens, V] logits) and each shared prompt/demonstration run once; TRL: full "
                    "logits; both full-vocabulary reverse KL, sequence mean, AdamW + clip; fastest update of each side")
    model = opt = None
    gc_collect(dev)
    return {"figures": [tput, mem], "raw": raw, "details": {"loss_at_start": at_start, "loss_relative_difference": loss_spread,
                                                        "update_times_s": times}}


# ------------------------------------------------------------------------------------------- 4. vLLM
def section_vllm(ctx: Ctx) -> dict:
    s, dev = ctx.sizes["vllm"], ctx.device
    if ctx.dry:
        kind = "transformers"
    else:
        try:
            vllm = require_vllm()
        except ValueError:
            return {"status": "skipped: vLLM is not installed (pip install vllm)"}
        kind = f"vllm {getattr(vllm, '__version__', '?')}"
    model_dir = saved_model(ctx, "1.7b")
    dtype_name = str(ctx.dtype).removeprefix("torch.")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=ctx.dtype).to(dev).eval()
    if ctx.dry:
        engine = TransformersEngine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=ctx.dtype).to(dev).eval(),
                                    ctx.tokenizer, str(model_dir))
    else:
        engine = VLLMEngine(str(model_dir), dtype_name, gpu_memory_utilization=s["memory"],
                            max_model_len=s["prompt_len"] + s["new"])
    spec = GenerationConfig(backend="vllm")
    gen = VLLMGenerator(spec, 1.0, s["new"], str(model_dir), dtype_name, engine=engine)
    g = torch.Generator().manual_seed(0)
    known = len(ctx.tokenizer)  # prompt ids the tokenizer knows (vLLM checks prompts against it)
    prompts = [torch.randint(4, known, (s["prompt_len"],), generator=g).tolist() for _ in range(s["prompts"])]
    seeds = list(range(len(prompts)))
    pad = ctx.tokenizer.pad_token_id

    # throughput: the first call includes the first (full) sync; the second is the steady state
    first_s = timed(lambda: gen(hf, prompts, s["generations"], seeds), dev)
    first_sync = dict(gen.last_sync)
    groups = []
    second_s = timed(lambda: groups.extend(gen(hf, prompts, s["generations"], seeds)), dev)
    gen_s = second_s - gen.last_sync["seconds"]
    tokens = sum(len(c) for grp in groups for c in grp.completion_ids)
    # the gap: a stale engine (the trainer moved on, the engine did not) vs after a sync, then with LoRA merged
    small, k = prompts[: s["gap_prompts"]], s["gap_generations"]
    noise = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():  # the trainer "moves": noise as large as each weight's own spread
            p.add_((torch.randn(p.shape, generator=noise, device=dev) * p.float().std()).to(p.dtype))
    comps, stale_lp = engine.generate(small, k, seeds[: len(small)], temperature=1.0, top_k=0, top_p=1.0,
                                      max_tokens=s["new"], greedy=False)
    rows = [p for p in small for _ in range(k)]
    stale = logprob_gap(completion_logprobs(hf, rows, comps, temperature=1.0, pad_id=pad), stale_lp)
    gen(hf, small, k, seeds[: len(small)])
    synced = gen.logprob_gap(hf, pad_id=pad)
    sync_after_update = dict(gen.last_sync)
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # peft starts B at 0 (merge = no-op): give the adapters something to merge
                p.copy_(0.02 * torch.randn(p.shape, generator=noise, device=dev))
    lora_gen = VLLMGenerator(spec, 1.0, s["new"], str(model_dir), dtype_name, engine=engine)
    lora_gen(lora, small, k, seeds[: len(small)])
    lora_full_sync = dict(lora_gen.last_sync)
    lora_gen(lora, small, k, seeds[: len(small)])
    lora_gap = lora_gen.logprob_gap(lora, pad_id=pad)
    lora_sync = dict(lora_gen.last_sync)
    label = f"engine {kind}, {ctx.name('1.7b')}, {dtype_name}"
    tput = figure(f"generation throughput (completion tokens/s), {len(prompts)} prompts × {s['generations']}, {label}",
                  tokens / gen_s, None, "tok/s")
    tput["note"] = f"{tokens} tokens in {gen_s:.2f} s (the sync before it excluded: {gen.last_sync['seconds']:.2f} s)"
    gap = figure(f"log-prob gap mean |Δ| after the weight sync vs a stale engine, {label}", synced["logprob_gap_mean_abs"],
                 stale["logprob_gap_mean_abs"], "nats", target_ratio=0.1)
    gap["note"] = (f"max |Δ| {synced['logprob_gap_max_abs']:.3g}, mean Δ {synced['logprob_gap_mean']:.3g} over "
                   f"{synced['logprob_gap_tokens']} tokens (trainer: transformers, same dtype); stale engine: "
                   f"{stale['logprob_gap_mean_abs']:.3g}")
    lgap = figure(f"log-prob gap mean |Δ| with LoRA weights merged and synced vs a stale engine, {label}",
                  lora_gap["logprob_gap_mean_abs"], stale["logprob_gap_mean_abs"], "nats", target_ratio=0.1)
    sync_fig = figure(f"weight sync seconds: full model (first) vs LoRA after the first (merged adapted layers), {label}",
                      lora_sync["seconds"], first_sync["seconds"], "s")
    sync_fig["note"] = (f"full: {first_sync['tensors']} tensors, {first_sync['bytes'] / GIB:.2f} GiB; LoRA later syncs: "
                        f"{lora_sync['tensors']} tensors, {lora_sync['bytes'] / GIB:.2f} GiB")
    raw = {"vllm/generate": {"time_s": gen_s, "tokens_per_s": tokens / gen_s, "first_call_s": first_s},
           "vllm/gap_synced": {"gap_mean_abs": synced["logprob_gap_mean_abs"], "gap_max_abs": synced["logprob_gap_max_abs"]},
           "vllm/gap_stale": {"gap_mean_abs": stale["logprob_gap_mean_abs"], "gap_max_abs": stale["logprob_gap_max_abs"]},
           "vllm/gap_lora": {"gap_mean_abs": lora_gap["logprob_gap_mean_abs"], "gap_max_abs": lora_gap["logprob_gap_max_abs"]},
           "vllm/sync_full": {"time_s": first_sync["seconds"], "gib": first_sync["bytes"] / GIB},
           "vllm/sync_lora": {"time_s": lora_sync["seconds"], "gib": lora_sync["bytes"] / GIB}}
    details = {"engine": kind, "gaps": {"synced": synced, "stale": stale, "lora": lora_gap},
               "syncs": {"first": first_sync, "after_update": sync_after_update, "lora_first": lora_full_sync, "lora": lora_sync}}
    gen = lora_gen = engine = hf = lora = None
    gc_collect(dev)
    return {"figures": [tput, gap, lgap, sync_fig], "raw": raw, "details": details}


RUNNERS: dict[str, Callable[[Ctx], dict]] = {
    "fused_loss": section_fused_loss,
    "train_qwen3_1_7b": lambda ctx: section_train(ctx, "1.7b"),
    "sdpo_vs_trl": section_sdpo_vs_trl,
    "train_qwen3_8b_lora": lambda ctx: section_train(ctx, "8b"),
    "vllm": section_vllm,
}


# ------------------------------------------------------------------------------------------- orchestration
def make_ctx(args) -> Ctx:
    device = torch.device("cpu" if args.dry_run else "cuda")
    return Ctx(dry=args.dry_run, device=device, work=Path(args.work_dir), sizes=DRY_SIZES if args.dry_run else GPU_SIZES,
               tokenizer=build_char_tokenizer(), peak_tflops=args.peak_tflops)


def run_section(name: str, ctx: Ctx) -> dict:
    """One section in this process; a failure becomes its status (with the last line of the traceback)."""
    t0 = time.perf_counter()
    try:
        out = RUNNERS[name](ctx)
        out.setdefault("status", "ok")
    except Exception as err:  # one section's failure must not lose the others
        out = {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": "),
               "traceback": traceback.format_exc()[-4000:]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def run_isolated(name: str, args, timeout_s: float) -> dict:
    """One section in a child process (fresh CUDA context and allocator), killed after ``timeout_s``."""
    result = Path(args.work_dir) / f"{name}.result.json"
    log_path = Path(args.work_dir) / f"{name}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result-file", str(result),
           "--work-dir", str(args.work_dir)] + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
    cmd += ["--dry-run"] if args.dry_run else []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.perf_counter() - t0, 2)
    tail = log_path.read_text(errors="replace")[-3000:]
    if result.is_file():
        out = json.loads(result.read_text())
        out["seconds"] = seconds
        return out
    status = f"timed out after {timeout_s:.0f} s" if rc is None else f"failed: exit {rc}"
    return {"status": status, "seconds": seconds, "log_tail": tail}


def write_all(args, sections: dict, started: float, ctx_settings: dict) -> Path:
    figures = [f for s in sections.values() for f in s.get("figures") or []]
    raw: dict = {}
    for s in sections.values():
        raw.update(s.get("raw") or {})
    settings = {**ctx_settings, "sections": {k: f"{v['status']} ({v.get('seconds', 0):.0f} s)" for k, v in sections.items()},
                "details": {k: v.get("details") for k, v in sections.items() if v.get("details")},
                "failures": {k: v.get("traceback") or v.get("log_tail") for k, v in sections.items() if not v["status"].startswith(("ok", "skipped"))},
                "load_average_after": load_average()}
    name = f"{NAME}_dry_run" if args.dry_run else NAME
    title = ("GPU check dry run (CPU, tiny sizes: checks that the check runs, measures nothing)" if args.dry_run else
             "GPU check: fused loss vs TRL at 152k vocabulary, Qwen3-1.7B/8B training steps vs the memory plan, ours vs "
             "TRL SDPOTrainer, vLLM throughput and log-prob gap")
    return write_results(name, title, figures, settings, raw, time.perf_counter() - started, results_dir=Path(args.out_dir))


def device_settings(args) -> dict:
    out = {"dry_run": args.dry_run, "budget_s": args.budget_s, "torch": torch.__version__,
           "sizes": DRY_SIZES if args.dry_run else GPU_SIZES, "load_average_before": load_average()}
    if torch.cuda.is_available() and not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        out.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / GIB, 1),
                    "cuda": torch.version.cuda, "peak_bf16_tflops": (args.peak_tflops or
                                                                      next((v / 1e12 for k, v in PEAK_BF16.items() if k in props.name), None))})
    try:
        out["vllm"] = require_vllm().__version__
    except (ValueError, AttributeError):
        out["vllm"] = None
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, every section in this process (< 60 s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--out-dir", default=None, help="results directory (default: benchmarks/results; dry run: outputs/gpu-check-dry-run)")
    p.add_argument("--work-dir", default=None, help="scratch directory for the saved random models (default: a temporary one)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check (sections past it are skipped)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for MFU (default: known by name)")
    p.add_argument("--in-process", action="store_true", help="run the sections in this process (the dry run's default)")
    p.add_argument("--isolate", action="store_true", help="run each section in a child process (the GPU run's default)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: a child process runs one section
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = [x for x in args.sections.split(",") if x]
    bad = sorted(set(chosen) - set(SECTIONS))
    if bad or not chosen:
        p.error(f"--sections: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: this check needs one GPU (use --dry-run on a CPU to check that it runs)")
    if args.section:  # child: one section, result written atomically for the parent
        out = run_section(args.section, make_ctx(args))
        atomic_write_text(args.result_file, json.dumps(out, default=str))
        return 0
    args.out_dir = args.out_dir or str(ROOT / ("outputs/gpu-check-dry-run" if args.dry_run else "benchmarks/results"))
    own_work = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu-check-")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    started, settings, sections = time.perf_counter(), device_settings(args), {}
    isolate = args.isolate or not (args.dry_run or args.in_process)
    ctx = None if isolate else make_ctx(args)
    try:
        for name in chosen:
            left = args.budget_s - (time.perf_counter() - started)
            if left < 20:
                sections[name] = {"status": f"skipped: time budget ({args.budget_s:.0f} s) spent", "seconds": 0}
            else:
                print(f"[gpu_check] {name} ...", flush=True)
                sections[name] = run_isolated(name, args, min(CAPS[name], left)) if isolate else run_section(name, ctx)
            print(f"[gpu_check] {name}: {sections[name]['status']} ({sections[name].get('seconds', 0):.0f} s)", flush=True)
            path = write_all(args, sections, started, settings)  # after every section: nothing finished is lost
    finally:
        if own_work:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    for f in (f for s in sections.values() for f in s.get("figures") or []):
        ratio = "" if f["ratio"] is None else f"  ratio {f['ratio']:.3g}" + (f" ({f['target']}: {'met' if f['met'] else 'MISSED'})" if f["target"] else "")
        value = "–" if f["value"] is None else f"{f['value']:.4g}"
        print(f"  {f['figure']}: {value} {f['unit']}{ratio}")
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return 0 if all(s["status"].startswith(("ok", "skipped")) for s in sections.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
