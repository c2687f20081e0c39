"""The LLM trainer: one training step, read top to bottom, for sdpo / grpo / reinforce / hybrid.

``Trainer.step`` follows the same order as the toy world's loop (docs/design.md §6)::

    sample a group per prompt → judge (safe) → render feedback → teacher contexts
    → teacher & student forwards → shared loss from sdpo_sim.core.losses → optimiser step (+ teacher update)

Every loss comes from :mod:`sdpo_sim.core.losses`; this module only moves tensors into their shapes.
Distributed runs use accelerate (DDP, FSDP2, DeepSpeed): each process handles ``prompts_per_step /
num_processes`` prompts, and losses are normalised by *global* token/sequence counts so that the
gradient equals a single-process run on the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from sdpo_sim.core.io import atomic_write_text, check_output_dir
from sdpo_sim.core.losses import (
    aggregate,
    fused_linear_sdpo_loss,
    hybrid_loss,
    policy_gradient_token_loss,
    sdpo_token_loss,
    truncated_importance_weight,
)
from sdpo_sim.core.method import MethodConfig
from sdpo_sim.core.statistics import token_statistics

from .checkpoint import is_sharded, latest_checkpoint, load_checkpoint, save_checkpoint
from .context import build_contexts, context_ids_for_batch, prompt_ids
from .feedback import noisy_score, render_feedback, safe_judge
from .generation import TransformersGenerator, VLLMGenerator, require_vllm, sample_seed
from .judges import load_judge
from .logging import MetricsLogger
from .prefix import plan_shared_prefix, positions, shared_prefix_outputs
from .recipe import Recipe, check_model_path
from .tasks import get_task
from .teacher import make_teacher
from .tiny import untrained_warning

log = logging.getLogger(__name__)
PROMPTS, GENERATION, FEEDBACK = 0, 1, 2  # streams of sample_seed(seed, step, stream, ...)


class NonFiniteLossError(RuntimeError):
    """Raised when ``training.max_consecutive_nonfinite`` steps in a row had a non-finite loss."""


# ----------------------------------------------------------------------------- model loading

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
        from peft import LoraConfig, get_peft_model

        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
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


# ----------------------------------------------------------------------------- batch tensors

@dataclass
class Batch:
    """One step's rollouts on this process. ``B`` completions, ``T`` = longest completion.

    Student rows are ``[left-padded prompt | completion | right padding]``; teacher rows the same
    with the teacher context in place of the prompt.
    """

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    teacher_input_ids: torch.Tensor  # [B, C+T]
    teacher_attention_mask: torch.Tensor  # [B, C+T]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] float, 1 on real completion tokens
    distill_mask: torch.Tensor  # [B] float, 1 when the completion has a teacher context
    judged: torch.Tensor  # [B] float, 1 when the judge returned a verdict
    advantages: torch.Tensor  # [B]
    old_logp: Optional[torch.Tensor] = None  # [B, T] behaviour log-probs (set when rollouts are reused)

    def split(self, size: int) -> list["Batch"]:
        """Micro-batches of at most ``size`` completions (``size`` 0: the whole batch)."""
        n = self.completion_ids.shape[0]
        if not size or size >= n:
            return [self]
        return [Batch(**{f: (None if getattr(self, f) is None else getattr(self, f)[i:i + size]) for f in self.__dataclass_fields__})
                for i in range(0, n, size)]


def pack_rows(prefixes: list[list[int]], completions: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[left-padded prefix | right-padded completion]`` ids and attention mask, ``[B, P+T]``."""
    p_len = max(len(p) for p in prefixes)
    t_len = max(len(c) for c in completions)
    ids = torch.full((len(prefixes), p_len + t_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prefixes, completions)):
        ids[i, p_len - len(p):p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len:p_len + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, p_len - len(p):p_len + len(c)] = 1
    return ids.to(device), mask.to(device)


def select_rows(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows [b]`` of a left-padded batch ``ids``/``mask [B, L]``, without the leading columns none of them
    uses: ``[b, L']``. The whole batch as it is when ``rows`` are all of its rows."""
    if rows.numel() == ids.shape[0]:
        return ids, mask
    ids, mask = ids[rows], mask[rows]
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else 0
    return ids[:, start:], mask[:, start:]


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


# ----------------------------------------------------------------------------- losses (all from sdpo_sim.core.losses)

def per_token_sdpo_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, completion_ids: torch.Tensor, method: MethodConfig) -> torch.Tensor:
    """SDPO's per-token loss ``D(student_t, stopgrad(teacher_t))`` of a batch, ``[B, T]``, from ``[B, T, V]`` logits
    (already divided by the temperature). Unreduced and unmasked: the function to compare with peers."""
    return sdpo_token_loss(student_logits, teacher_logits, alpha=method.alpha, support=method.support, topk=method.topk,
                           add_tail=method.add_tail, tokens=completion_ids)


def fused_token_weights(mask: torch.Tensor, loss_type: str, max_len: int) -> torch.Tensor:
    """Weights ``w [B, T]`` with ``Σ loss·mask·w / Σ mask == aggregate(loss, mask, loss_type, max_len)``."""
    n_sel = mask.sum().clamp(min=1.0)
    if loss_type == "token_mean":
        return torch.ones_like(mask)
    if loss_type == "sequence_mean":
        return (n_sel / (mask.sum(-1, keepdim=True).clamp(min=1.0) * mask.shape[0])).expand_as(mask)
    return torch.full_like(mask, float(n_sel) / (mask.shape[0] * max_len))  # dr_grpo


def sdpo_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    method: MethodConfig,
    *,
    max_len: int,
    weight: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The SDPO term, reduced by ``method.loss_type`` over ``mask [B, T]``.

    Unfused: ``student``/``teacher`` are logits ``[B, T, V]``. Fused (``weight`` given): they are final
    hidden states ``[B, T, H]`` (already divided by the temperature) and ``weight [V, H]`` the LM head;
    ``fused_linear_sdpo_loss`` computes the same value chunk by chunk, never holding ``[B·T, V]``.
    ``token_weights [B, T]`` (detached), e.g. truncated importance ratios, multiply the per-token loss.
    """
    if weight is None:
        per_tok = per_token_sdpo_loss(student, teacher, completion_ids, method)
        if token_weights is not None:
            per_tok = per_tok * token_weights
        return aggregate(per_tok, mask, method.loss_type, max_len)
    w = fused_token_weights(mask, method.loss_type, max_len)
    if token_weights is not None:
        w = w * token_weights
    h = student.shape[-1]
    return fused_linear_sdpo_loss(
        student.reshape(-1, h), teacher.reshape(-1, h), weight, mask.reshape(-1), teacher_weight=teacher_weight,
        alpha=method.alpha, support=method.support, topk=method.topk, add_tail=method.add_tail, chunk_size=chunk_size,
        tokens=completion_ids.reshape(-1), token_weights=w.reshape(-1).detach(),
    )


def _chunk_token_logp(h: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((h @ weight.T).float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(student: torch.Tensor, completion_ids: torch.Tensor, weight: Optional[torch.Tensor] = None, chunk_size: int = 1024) -> torch.Tensor:
    """``log π(y_t)`` ``[B, T]`` from logits ``[B, T, V]``, or from hidden states and the LM head chunk by
    chunk (recomputed in backward, so ``[B·T, V]`` never exists)."""
    if weight is None:
        return torch.log_softmax(student.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    b, t, h = student.shape
    flat, toks = student.reshape(-1, h), completion_ids.reshape(-1)
    parts = [checkpoint(_chunk_token_logp, flat[s:s + chunk_size], weight, toks[s:s + chunk_size], use_reentrant=False)
             for s in range(0, flat.shape[0], chunk_size)]
    return torch.cat(parts).reshape(b, t)


@torch.no_grad()
def token_stats(student, teacher, completion_ids, alpha: float, weight=None, teacher_weight=None, chunk_size: int = 1024):
    """Per-token ``entropy``, teacher–student ``divergence`` (full vocabulary, the method's alpha) and the credit
    ``log p_T(y_t) − log p_θ(y_t)``, each ``[B, T]``; from logits, or from hidden states chunk by chunk."""
    b, t = completion_ids.shape
    s_rows = student.reshape(b * t, -1)
    t_rows = None if teacher is None else teacher.reshape(b * t, -1)
    toks = completion_ids.reshape(-1)
    ent, div, ratio = (torch.zeros(b * t) for _ in range(3))
    tw = weight if teacher_weight is None else teacher_weight
    for s in range(0, b * t, chunk_size):  # one [chunk, V] block of logits at a time (core.statistics defines each statistic)
        sl = slice(s, s + chunk_size)
        s_logits = s_rows[sl] if weight is None else s_rows[sl] @ weight.T
        t_logits = None if t_rows is None else (t_rows[sl] if weight is None else t_rows[sl] @ tw.T)
        e, d, r = token_statistics(s_logits, t_logits, toks[sl], alpha)
        ent[sl] = e.cpu()
        if t_logits is not None:
            div[sl], ratio[sl] = d.cpu(), r.cpu()
    return ent.reshape(b, t), div.reshape(b, t), ratio.reshape(b, t)


def merge_stats(parts: list[dict]) -> dict:
    """Statistics of a batch from those of its micro-batches: sums add, per-row tensors concatenate."""
    out = dict(parts[0])
    for stats in parts[1:]:
        for k, v in stats.items():
            out[k] = torch.cat([out[k], v]) if isinstance(v, torch.Tensor) else out[k] + v if k != "alpha_mix" else v
    return out


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Runs a :class:`~llm.recipe.Recipe` under accelerate. ``Trainer(recipe).train()``."""

    def __init__(self, recipe: Recipe, *, accelerator=None, task=None, judge: Optional[Callable] = None):
        self.recipe = recipe.validate()
        self.method, self.cfg = recipe.method, recipe.training
        check_output_dir(self.cfg.output_dir, "training.output_dir")  # before any weights load
        self.task = task if task is not None else get_task(recipe.task.name)
        if judge is not None:
            self.judge = judge
        elif recipe.task.judge:
            self.judge = load_judge(recipe.task.judge)
        else:
            self.judge = self.task.judge
        # cpu=True when there is no GPU: a torchrun/gloo launch on CPU then becomes accelerate's MULTI_CPU
        self.acc = accelerator if accelerator is not None else Accelerator(cpu=not torch.cuda.is_available())
        world = self.acc.num_processes
        if self.cfg.prompts_per_step % world:
            raise ValueError(f"training.prompts_per_step={self.cfg.prompts_per_step} must be divisible by the number of processes ({world})")
        if recipe.generation.backend == "vllm":
            require_vllm()  # fail before loading any weights
        check_trainable_precision(recipe, self.acc.distributed_type.name)

        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        model, self.tokenizer = load_model_and_tokenizer(recipe)
        check_trainable_precision(recipe, self.acc.distributed_type.name, model)  # what 'auto' resolved to
        vocab = model.get_output_embeddings().weight.shape[0]
        fused = self.cfg.fused_loss
        self.fused = self.method.distills and (fused is True or (fused == "auto" and vocab >= self.cfg.fused_min_vocab))
        if self.fused and self.method.teacher_kind == "trust_region":
            if fused is True:
                raise ValueError("training.fused_loss=true is not available with method.teacher_kind='trust_region' "
                                 "(its teacher mixes two LM heads); use fused_loss: auto or false")
            self.fused = False
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay,
                                      betas=tuple(self.cfg.adam_betas))
        if self.acc.distributed_type.name == "DEEPSPEED":  # no dataloader is prepared, so say the batch size
            self.acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        no_forward_buffer_sync(self.model)
        self.sharded = is_sharded(self.unwrapped)
        self.teacher = make_teacher(self.method.teacher_kind, self.method.teacher_rate, self.unwrapped)
        self.controller = self.method.make_controller()
        dist = self.acc.distributed_type.name
        share = self.cfg.share_prompt_prefix
        if share is True and (recipe.model.gradient_checkpointing or self.sharded):
            raise ValueError("training.share_prompt_prefix=true needs model.gradient_checkpointing=false (checkpointed layers "
                             "return no key/value cache) and an unsharded model (a two-rank FSDP2 run crashed with it); "
                             "use share_prompt_prefix: auto or false")
        self.share_prefix = share is True or (share == "auto" and not recipe.model.gradient_checkpointing and not self.sharded)
        if recipe.generation.backend == "vllm":
            self.generate = VLLMGenerator(recipe.generation, self.method.temperature, self.cfg.max_new_tokens, recipe.model.path, recipe.model.dtype)
        else:
            self.generate = TransformersGenerator(recipe.generation, self.method.temperature, self.cfg.max_new_tokens,
                                                  self.tokenizer, synced_gpus=dist in ("FSDP", "DEEPSPEED") and world > 1)
        self.start_step, self.nonfinite_steps, self.nonfinite_run = 0, 0, 0
        self.steps_done = 0  # steps completed so far in this run (read when it is interrupted)
        self.out = Path(self.cfg.output_dir)

    # -- small helpers ---------------------------------------------------------------------------
    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def _sum(self, value: float) -> float:
        """Sum of a number over all processes."""
        if self.acc.num_processes == 1:
            return float(value)
        return float(self.acc.reduce(torch.tensor(float(value), device=self.acc.device), reduction="sum"))

    def _share(self, local_count: float, global_count: float) -> float:
        """``world · local/global``: turns a (micro-)batch mean into its part of the global mean (DDP averages)."""
        return 0.0 if global_count == 0 else self.acc.num_processes * local_count / global_count

    def _counts(self, batch: Batch) -> dict:
        """Global normalisers of the two loss terms: tokens (token_mean) or completions (sequence_mean, dr_grpo)."""
        per_token = self.method.loss_type == "token_mean"
        d_mask = batch.completion_mask * batch.distill_mask.unsqueeze(-1)
        pg_mask = batch.completion_mask * batch.judged.unsqueeze(-1)
        return {"sdpo": self._sum(float(d_mask.sum()) if per_token else d_mask.shape[0]),
                "pg": self._sum(float(pg_mask.sum()) if per_token else pg_mask.shape[0])}

    def _alpha_mix(self, stats: dict) -> torch.Tensor:
        """Advance the hybrid controller with the global batch's mean entropy and divergence."""
        entropy = torch.tensor(self._sum(stats["entropy_sum"]) / max(1.0, self._sum(stats["tokens"])))
        mean_div = torch.tensor(self._sum(stats["divergence_sum"]) / max(1.0, self._sum(stats["distilled_tokens"])))
        return self.controller.update(divergence=mean_div, entropy=entropy)

    # -- 1-4: sample, judge, feedback, teacher contexts --------------------------------------------
    def rollout(self, step: int) -> tuple[Batch, dict]:
        """Sample this process's groups, judge them, render feedback and build the teacher contexts."""
        cfg, m, spec = self.cfg, self.method, self.recipe
        world, rank, g = self.acc.num_processes, self.acc.process_index, m.num_generations
        all_prompts = self.task.sample_prompts(random.Random(sample_seed(cfg.seed, step, PROMPTS)), cfg.prompts_per_step)
        per_rank = cfg.prompts_per_step // world
        first = rank * per_rank
        prompts = all_prompts[first:first + per_rank]
        # 1. sample a group of completions per prompt
        p_ids = [prompt_ids(self.tokenizer, p, cfg.max_prompt_length) for p in prompts]
        seeds = [sample_seed(cfg.seed, step, GENERATION, first + i) for i in range(per_rank)]
        if isinstance(self.generate, VLLMGenerator):  # the engine samples from the current weights
            self.generate.load_weights(self._full_state().items())
        groups = self.generate(self.unwrapped, p_ids, g, seeds)
        completion_ids = [c for grp in groups for c in grp.completion_ids]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        row_prompts = [p for p in prompts for _ in range(g)]
        # 2. judge (a failing judge costs only that sample its feedback) and 3. render feedback
        judgements = [safe_judge(self.judge, p, t) for p, t in zip(row_prompts, texts)]
        scores, feedback = [], []
        for i, j in enumerate(judgements):
            if j is None:
                scores.append(None)
                feedback.append(None)
                continue
            noise_seed = sample_seed(cfg.seed, step, FEEDBACK, first * g + i)  # same ε for the score and its text
            scores.append(noisy_score(j.score, spec.task.noise, random.Random(noise_seed)))
            feedback.append(None if spec.task.feedback == "none" else
                            render_feedback(j, spec.task.feedback, noise=spec.task.noise, rng=random.Random(noise_seed), threshold=spec.task.threshold))
        # 4. teacher contexts: feedback and/or the best successful sibling, never itself
        if self.method.distills:
            contexts = build_contexts(row_prompts, texts, scores, feedback, g, spec.context)
            ctx_ids = context_ids_for_batch(self.tokenizer, row_prompts, texts, contexts, feedback, spec.context)
        else:
            contexts, ctx_ids = [], [None] * len(texts)
        student_prefix = [p for p in p_ids for _ in range(g)]
        teacher_prefix = [c if c is not None else s for c, s in zip(ctx_ids, student_prefix)]
        advantages = self._advantages(scores)
        dev, pad = self.acc.device, self.tokenizer.pad_token_id
        ids, mask = pack_rows(student_prefix, completion_ids, pad, dev)
        t_ids, t_mask = pack_rows(teacher_prefix, completion_ids, pad, dev)
        comp, comp_mask = pack_rows([[]] * len(completion_ids), completion_ids, pad, dev)
        batch = Batch(
            input_ids=ids, attention_mask=mask, teacher_input_ids=t_ids, teacher_attention_mask=t_mask,
            completion_ids=comp, completion_mask=comp_mask.float(),
            distill_mask=torch.tensor([float(c is not None) for c in ctx_ids], device=dev),
            judged=torch.tensor([float(s is not None) for s in scores], device=dev),
            advantages=advantages.to(dev),
        )
        true_scores = [j.score for j in judgements if j is not None]
        info = {
            "reward_sum": sum(true_scores), "judged": len(true_scores), "judge_failures": len(judgements) - len(true_scores),
            "completions": len(texts), "length_sum": float(comp_mask.sum()), "texts": texts, "prompts": row_prompts,
            "completion_ids": completion_ids, "distill_rows": [c is not None for c in ctx_ids],
            "distilled": float(batch.distill_mask.sum()), "demos": sum(c.demo_index is not None for c in contexts),
        }
        return batch, info

    def _advantages(self, scores: list[Optional[float]]) -> torch.Tensor:
        """GRPO: group-normalised; REINFORCE and hybrid: ``r − batch mean`` over the *global* batch.

        A completion whose judge failed is filled with its group's mean score and gets no policy-gradient loss.
        """
        m, g = self.method, self.method.num_generations
        r = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)
        groups = r.view(-1, g)
        fill = torch.nanmean(groups, dim=1, keepdim=True).nan_to_num(0.0).expand_as(groups)
        r = torch.where(groups.isnan(), fill, groups).reshape(-1)
        all_r = self.acc.gather(r.to(self.acc.device)).cpu() if self.acc.num_processes > 1 else r
        adv = m.advantages(all_r)
        n = r.numel()
        return adv[self.acc.process_index * n:(self.acc.process_index + 1) * n]

    # -- 5: forwards and the shared loss -----------------------------------------------------------
    def compute_loss(self, batch: Batch, counts: Optional[dict] = None, alpha_mix: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """Teacher forward (no gradient), student forward, and the method's loss from ``sdpo_sim.core.losses``.

        ``counts``: global normalisers of the step's whole batch (default: this batch's, see :meth:`_counts`);
        ``alpha_mix``: the hybrid's mixing weight when already known (else the controller advances on this batch).
        """
        counts = self._counts(batch) if counts is None else counts
        m, temp, T = self.method, self.method.temperature, batch.completion_ids.shape[1]
        max_len = self.cfg.max_new_tokens
        head = self.unwrapped.get_output_embeddings().weight if self.fused else None
        stats: dict[str, Any] = {}
        teacher_out = teacher_head = None
        if self.method.distills:  # the teacher reads its context, then the same completion; its weights are swapped in and out
            # rows without a context get no distillation loss, so the teacher reads only the others (a sharded
            # model runs the forward on every process even with none: its collectives must match)
            rows = batch.distill_mask.nonzero().squeeze(-1)
            if rows.numel() == 0 and self.sharded:
                rows = rows.new_zeros(1)
            t_ids, t_mask = select_rows(batch.teacher_input_ids, batch.teacher_attention_mask, rows)

            def teacher_forward():
                out = completion_outputs(self.model, t_ids, t_mask, T, hidden=self.fused, share_prefix=self.share_prefix)
                return (out, head.detach().clone()) if self.fused and self.teacher.has_copy else (out, None)

            if rows.numel():
                terms = self.teacher.outputs(self.unwrapped, teacher_forward)
                teacher_out = sum(c * out for c, (out, _) in terms) / temp
                teacher_head = terms[0][1][1]  # the teacher's own LM head when it has stored weights (fused path)
        student_out = completion_outputs(self.model, batch.input_ids, batch.attention_mask, T, hidden=self.fused,
                                         share_prefix=self.share_prefix) / temp
        if self.method.distills and rows.numel() < student_out.shape[0]:  # rows the teacher skipped: the student's own outputs
            teacher_out = student_out.detach().index_copy(0, rows, teacher_out) if rows.numel() else student_out.detach()
        comp_mask = batch.completion_mask
        ent, div, ratio = token_stats(student_out.detach(), None if teacher_out is None else teacher_out.detach(),
                                      batch.completion_ids, m.alpha, weight=head, teacher_weight=teacher_head)
        # log π(y_t) feeds the policy gradient and the importance ratios of reused rollouts; plain SDPO with one
        # update per batch never reads it, so it is not computed (saves a log-softmax, or chunked LM-head matmuls)
        needs_logp = self.method.uses_policy_gradient or self.cfg.updates_per_batch > 1 or batch.old_logp is not None
        logp = token_logprobs(student_out, batch.completion_ids, head) if needs_logp else None
        if batch.old_logp is None and self.cfg.updates_per_batch > 1:
            batch.old_logp = logp.detach()  # behaviour policy = the policy that sampled (first update)
        terms_loss = {}
        if self.method.distills:
            d_mask = comp_mask * batch.distill_mask.unsqueeze(-1)
            isw = None if batch.old_logp is None else truncated_importance_weight(logp, batch.old_logp, m.is_clip)
            sd = sdpo_loss(student_out, teacher_out, batch.completion_ids, d_mask, m, max_len=max_len, weight=head,
                           teacher_weight=teacher_head, token_weights=isw, chunk_size=self.cfg.chunk_size)
            count = d_mask.sum() if m.loss_type == "token_mean" else d_mask.shape[0]
            terms_loss["sdpo"] = sd * self._share(float(count), counts["sdpo"])
            stats["divergence_sum"], stats["distilled_tokens"] = float((div * d_mask.cpu()).sum()), float(d_mask.sum())
            stats["log_ratio"] = ratio
        if self.method.uses_policy_gradient:
            pg_mask = comp_mask * batch.judged.unsqueeze(-1)
            pg_tok = policy_gradient_token_loss(logp, batch.advantages, batch.old_logp, epsilon=m.epsilon)
            pg = aggregate(pg_tok, pg_mask, m.loss_type, max_len)
            count = pg_mask.sum() if m.loss_type == "token_mean" else pg_mask.shape[0]
            terms_loss["pg"] = pg * self._share(float(count), counts["pg"])
        stats["entropy_sum"], stats["tokens"] = float((ent * comp_mask.cpu()).sum()), float(comp_mask.sum())
        if m.method == "hybrid":
            alpha_mix = self._alpha_mix(stats) if alpha_mix is None else alpha_mix
            stats["alpha_mix"] = float(alpha_mix)
            loss = hybrid_loss(terms_loss["sdpo"], terms_loss["pg"], alpha_mix)
        else:
            loss = terms_loss["sdpo"] if self.method.distills else terms_loss["pg"]
        return loss, stats

    # -- the step ----------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """One training step: rollouts, then ``updates_per_batch`` optimiser updates on them, each
        accumulating gradients over micro-batches of ``micro_batch_size`` completions."""
        t0 = time.time()
        batch, info = self.rollout(step)
        parts, counts = batch.split(self.cfg.micro_batch_size), self._counts(batch)
        adaptive = self.method.method == "hybrid" and self.method.controller != "constant" and len(parts) > 1
        for _ in range(self.cfg.updates_per_batch):
            alpha_mix = None
            if adaptive:  # the controller needs the whole batch's statistics before any gradient
                with torch.no_grad():
                    alpha_mix = self._alpha_mix(merge_stats([self.compute_loss(p, counts, torch.tensor(0.5))[1] for p in parts]))
            losses, part_stats = [], []
            for i, part in enumerate(parts):
                loss, stats = self.compute_loss(part, counts, alpha_mix)
                sync = i == len(parts) - 1 or self.acc.distributed_type.name not in ("MULTI_CPU", "MULTI_GPU")
                with contextlib.nullcontext() if sync else self.acc.no_sync(self.model):
                    self.acc.backward(loss)
                losses.append(loss.detach())
                part_stats.append(stats)
            loss, stats = torch.stack(losses).sum(), merge_stats(part_stats)
            finite = self._sum(float(not torch.isfinite(loss).item())) == 0
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm) if finite else math.nan
            grad_norm = math.nan if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
            finite = finite and (norm is None or math.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
                self.teacher.update(self.unwrapped)
                self.nonfinite_run = 0
            else:
                self.nonfinite_steps += 1
                self.nonfinite_run += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.nonfinite_run)
            self.optimizer.zero_grad(set_to_none=True)
            if not finite:
                break
        return self._metrics(step, loss, stats, info, grad_norm, time.time() - t0)

    def _metrics(self, step: int, loss, stats: dict, info: dict, grad_norm: float, seconds: float) -> dict:
        S = self._sum
        tokens, completions = S(stats["tokens"]), S(info["completions"])
        out = {
            "reward": S(info["reward_sum"]) / max(1.0, S(info["judged"])),
            "entropy": S(stats["entropy_sum"]) / max(1.0, tokens),
            "divergence": S(stats["divergence_sum"]) / max(1.0, S(stats["distilled_tokens"])) if self.method.distills else math.nan,
            "alpha_mix": stats.get("alpha_mix", 1.0 if self.method.method == "sdpo" else (0.0 if not self.method.distills else math.nan)),
            "response_length": S(info["length_sum"]) / max(1.0, completions),
            "loss": S(float(loss.detach())) / self.acc.num_processes,
            "nonfinite_steps": self.nonfinite_steps,
            "distill_fraction": S(info["distilled"]) / max(1.0, completions),
            "demo_fraction": S(info["demos"]) / max(1.0, completions),
            "judge_failures": int(S(info["judge_failures"])),
            "grad_norm": grad_norm,
            "seconds": seconds,
        }
        out["_heatmap"] = (info, stats.get("log_ratio"))
        return out

    # -- the loop ----------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"nonfinite_steps": self.nonfinite_steps, "nonfinite_run": self.nonfinite_run,
                "controller": None if self.controller is None else self.controller.state_dict()}

    def save(self, step: int) -> Path:
        return save_checkpoint(self.out, step, model=self.unwrapped, optimizer=self.optimizer, teacher=self.teacher,
                               trainer_state=self.trainer_state(), rank=self.acc.process_index,
                               barrier=self.acc.wait_for_everyone, accelerator=self.acc)

    def resume(self) -> int:
        """Load the latest checkpoint of ``output_dir`` (if any); returns the step to start from."""
        path = latest_checkpoint(self.out)
        if path is None:
            log.warning("no checkpoint in %s; starting from step 0", self.out)
            return 0
        state = load_checkpoint(path, model=self.unwrapped, optimizer=self.optimizer, teacher=self.teacher,
                                rank=self.acc.process_index, accelerator=self.acc)
        self.nonfinite_steps, self.nonfinite_run = state["nonfinite_steps"], state["nonfinite_run"]
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        self.start_step = int(state["step"])
        return self.start_step

    def train(self, *, resume: bool = False) -> list[dict]:
        """Run ``training.steps`` steps (from the last checkpoint with ``resume``); returns the logged rows."""
        if resume:
            self.resume()
        main = self.acc.is_main_process
        if main:
            self.recipe.save(self.out / "recipe.yaml")
        logger = MetricsLogger(self.out, enabled=main, tensorboard=self.cfg.tensorboard, resume_step=self.start_step)
        rows = []
        self.steps_done = self.start_step
        bar = tqdm(range(self.start_step, self.cfg.steps), disable=not main, desc=f"sdpo-llm {self.method.method}", unit="step")
        try:
            for step in bar:
                metrics = self.step(step)
                info, log_ratio = metrics.pop("_heatmap")
                done = self.steps_done = step + 1
                if done % self.cfg.log_every == 0 or done == self.cfg.steps:
                    logger.log(done, metrics)
                    rows.append({"step": done, **metrics})
                    bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
                if self.cfg.heatmap_every and done % self.cfg.heatmap_every == 0 and log_ratio is not None:
                    self._heatmap(logger, done, info, log_ratio)
                if self.nonfinite_run >= self.cfg.max_consecutive_nonfinite:
                    path = self.save(done)
                    raise NonFiniteLossError(
                        f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (limit "
                        f"training.max_consecutive_nonfinite={self.cfg.max_consecutive_nonfinite}); stopped at step {done}, "
                        f"checkpoint in {path}. Lower training.learning_rate or check the model's dtype.")
                if (self.cfg.save_every and done % self.cfg.save_every == 0) or done == self.cfg.steps:
                    self.save(done)
        finally:
            logger.close()
        self.export(self.out / "final-model")
        if main:
            summary = {"steps": self.cfg.steps, "final": rows[-1] if rows else None, "replica_max_abs_diff": self.replica_difference()}
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        else:
            self.replica_difference()
        return rows

    def _full_state(self, cpu_offload: bool = False) -> dict:
        """The model's full (gathered) state dict; with ``cpu_offload`` only rank 0 receives it."""
        if self.acc.distributed_type.name == "DEEPSPEED":
            return self.acc.get_state_dict(self.model)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(self.unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))

    def export(self, path: Path) -> None:
        """Save the trained model (full weights, or the adapters with LoRA) and tokenizer with ``save_pretrained``."""
        state = self._full_state(cpu_offload=True)  # gathers FSDP2 shards; rank 0 gets them
        if self.acc.is_main_process:
            self.unwrapped.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)
        self.acc.wait_for_everyone()

    def replica_difference(self) -> float:
        """Largest difference between processes of any trainable parameter's sum (0 when replicas are in sync;
        NaN for a sharded model, which has no replicas)."""
        if self.sharded:
            return math.nan
        sums = torch.stack([p.detach().float().sum() for p in self.unwrapped.parameters() if p.requires_grad]).to(self.acc.device)
        if self.acc.num_processes == 1:
            return 0.0
        gathered = self.acc.gather(sums.unsqueeze(0))
        return float((gathered - gathered[0]).abs().max())

    def _heatmap(self, logger: MetricsLogger, step: int, info: dict, log_ratio: torch.Tensor) -> None:
        """Credit heat-map (teacher − student log-ratio per token) of this process's first distilled completion."""
        for row, ids in enumerate(info["completion_ids"]):
            if info["distill_rows"][row]:
                logger.heatmap(step, [self.tokenizer.decode([t]) for t in ids], log_ratio[row, :len(ids)].tolist(),
                               title=f"step {step} · {info['prompts'][row].strip()[:80]}")
                return


def train(recipe: Recipe, *, resume: bool = False, **kwargs) -> list[dict]:
    """Build a :class:`Trainer` for ``recipe`` and run it."""
    return Trainer(recipe, **kwargs).train(resume=resume)
