"""The LLM trainer: one training step, read top to bottom, for sdpo / grpo / reinforce / hybrid / blend / srpo
(and the variants of docs/variants.md, the reference-policy terms ``ref_beta`` / ``ref_anchor`` included).

``Trainer.step`` follows the same order as the toy world's loop (docs/design.md §6)::

    sample a group per prompt → judge (safe) → render feedback → teacher contexts
    → teacher & student forwards → shared loss from sdpo_sim.core.losses → optimiser step (+ teacher update)

One step is read in three files: this one (forwards, loss, update, the loop), :mod:`llm.rollout` (prompts →
completions → judge → feedback → teacher contexts → a :class:`~llm.batch.Batch`) and :mod:`sdpo_sim.core.losses`
(every loss; :mod:`llm.losses` only shapes transformer outputs for it). Model loading is :mod:`llm.models`, batch
packing :mod:`llm.batch`, prefix sharing :mod:`llm.prefix`.
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
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from sdpo_sim.core.io import atomic_write_text, check_output_dir
from sdpo_sim.core.losses import (
    advantage_blend_token_loss,
    aggregate,
    hybrid_loss,
    policy_gradient_token_loss,
    reference_kl,
    teacher_confidence_weight,
    truncated_importance_weight,
)

from .batch import Batch, merge_stats, select_rows
from .checkpoint import is_sharded, latest_checkpoint, load_checkpoint, save_checkpoint
from .credit import credit_metrics, feedback_credit
from .evaluation import evaluate
from .generation import TransformersGenerator, VLLMGenerator, require_vllm
from .judges import load_judge
from .logging import MetricsLogger
from .losses import reference_loss, sdpo_loss, token_logprobs, token_stats
from .models import (
    accelerate_mixed_precision,
    autocast,
    check_accelerator_precision,
    check_trainable_precision,
    completion_outputs,
    load_model_and_tokenizer,
    no_forward_buffer_sync,
    resolved_dtype,
    sharded_launch,
    teacher_outputs,
)
from .prompts import fit_prompts, open_prompts
from .recipe import Recipe
from .rewards import RewardFunctions
from .rollout import rollout
from .tasks import get_task
from .teacher_weights import make_reference, make_teacher

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when ``training.max_consecutive_nonfinite`` steps in a row had a non-finite loss."""


def make_rewards(recipe: Recipe, task, judge: Optional[Callable] = None) -> RewardFunctions:
    """The run's scorer: ``task.reward_funcs`` (weighted, batched), else a per-item judge — the one given, ``task.judge``,
    or the built-in task's rule-based judge."""
    spec = recipe.task
    if judge is None and spec.reward_funcs:
        return RewardFunctions.from_specs(spec.reward_funcs, spec.reward_weights, timeout_s=spec.reward_timeout,
                                          judge_template=spec.judge_template)
    judge = judge if judge is not None else (load_judge(spec.judge) if spec.judge else task.judge)
    return RewardFunctions.from_judge(judge, getattr(judge, "__name__", "judge"))


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Runs a :class:`~llm.recipe.Recipe` under accelerate. ``Trainer(recipe).train()``."""
    measure_credit = False  # this step measures the feedback credit (training.feedback_credit_every)

    def __init__(self, recipe: Recipe, *, accelerator=None, task=None, judge: Optional[Callable] = None):
        """Validate, open the data, load and wrap the model; the teacher weights and, only when a reference term is on
        (``ref_beta`` or ``ref_anchor`` > 0), the reference policy (:class:`llm.teacher_weights.Reference`)."""
        self.recipe = recipe.validate()
        self.method, self.training = recipe.method, recipe.training
        check_output_dir(self.training.output_dir, "training.output_dir")  # before any weights load
        self.task = task if task is not None else get_task(recipe.task.name)
        self.prompts, held_out = open_prompts(recipe, self.task)  # datasets are checked before any weights load
        self.rewards = make_rewards(recipe, self.task, judge)
        self.rewards.check_columns(self.prompts.column_names, recipe.task.dataset or f"task {self.task.name!r}")
        # the compute precision is model.dtype's ('auto': the saved config's), read before any weight loads; it sets
        # accelerate's mixed_precision (FSDP/DeepSpeed launches) over the launch config's (llm/models.py docstring)
        self.dtype = resolved_dtype(recipe)
        # cpu=True when there is no GPU: a torchrun/gloo launch on CPU then becomes accelerate's MULTI_CPU
        self.acc = accelerator if accelerator is not None else Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=accelerate_mixed_precision(self.dtype, sharded_launch()))
        check_accelerator_precision(self.acc, self.dtype)
        world = self.acc.num_processes
        if self.training.prompts_per_step % world:
            raise ValueError(f"training.prompts_per_step={self.training.prompts_per_step} must be divisible by the number of processes ({world})")
        if recipe.generation.backend == "vllm" and recipe.generation.vllm_mode == "colocate":
            require_vllm()  # fail before loading any weights (a server holds its own vLLM)
        check_trainable_precision(recipe, self.acc.distributed_type.name, self.dtype)
        self.deepspeed = self.acc.distributed_type.name == "DEEPSPEED"

        torch.manual_seed(self.training.seed)
        random.seed(self.training.seed)
        # float32 master weights for trainable parameters, except under DeepSpeed, whose engine keeps its own
        model, self.tokenizer = load_model_and_tokenizer(recipe, master_weights=not self.deepspeed)
        self.eval_rows, self.dropped_prompts = fit_prompts(self.prompts, held_out, recipe, self.tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        fused = self.training.fused_loss
        self.fused = self.method.distills and (fused is True or (fused == "auto" and vocab >= self.training.fused_min_vocab))
        if self.fused and self.method.teacher_kind == "trust_region":
            if fused is True:
                raise ValueError("training.fused_loss=true is not available with method.teacher_kind='trust_region' "
                                 "(its teacher mixes two LM heads); use fused_loss: auto or false")
            self.fused = False
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.training.learning_rate, weight_decay=self.training.weight_decay,
                                      betas=tuple(self.training.adam_betas))
        if self.deepspeed:
            ds_config = self.acc.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = 1  # no dataloader is prepared, so say the batch size
            # ZeRO-3 keeps parameters under this size gathered on every rank, outside the partitions the teacher
            # swaps: with 0 every parameter is partitioned, so a teacher forward reads the teacher's weights
            ds_config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        no_forward_buffer_sync(self.model)
        self.sharded = is_sharded(self.unwrapped)
        reads_logp = self.method.uses_policy_gradient or self.method.uses_reference or self.training.updates_per_batch > 1
        if self.sharded and self.fused and reads_logp and self.training.feedback_credit_every > 0:
            # the fused path's log π(y_t) recomputes LM-head matmuls in backward; the credit's teacher forward, between
            # the loss and the backward, swaps weights and so reshards that head (a two-rank FSDP2 run crashed)
            raise ValueError(f"training.feedback_credit_every={self.training.feedback_credit_every} is not available with a sharded "
                             f"model, the fused loss and a term that reads log π(y_t) (method {self.method.name!r}, ref_beta/ref_anchor "
                             f"or updates_per_batch > 1): set training.feedback_credit_every: 0 or training.fused_loss: false")
        self.teacher = make_teacher(self.method.teacher_kind, self.method.teacher_rate, self.unwrapped)
        # π_ref = θ_0: LoRA's base without adapters, or a frozen copy (the teacher's when it keeps θ_0); None when off
        self.reference = make_reference(self.method.uses_reference, self.unwrapped, self.teacher, lora=recipe.model.lora is not None)
        self.controller = self.method.make_controller()
        dist = self.acc.distributed_type.name
        share = self.training.share_prompt_prefix
        if share is True and (recipe.model.gradient_checkpointing or self.sharded):
            raise ValueError("training.share_prompt_prefix=true needs model.gradient_checkpointing=false (checkpointed layers "
                             "return no key/value cache) and an unsharded model (a two-rank FSDP2 run crashed with it); "
                             "use share_prompt_prefix: auto or false")
        self.share_prefix = share is True or (share == "auto" and not recipe.model.gradient_checkpointing and not self.sharded)
        if recipe.generation.backend == "vllm":
            self.generate = VLLMGenerator(recipe.generation, self.method.temperature, self.training.max_new_tokens, recipe.model.path,
                                          recipe.model.dtype, max_model_len=self.training.max_prompt_length + self.training.max_new_tokens)
        else:
            self.generate = TransformersGenerator(recipe.generation, self.method.temperature, self.training.max_new_tokens,
                                                  self.tokenizer, synced_gpus=dist in ("FSDP", "DEEPSPEED") and world > 1)
        self.start_step, self.nonfinite_steps, self.nonfinite_run = 0, 0, 0
        self.steps_done = 0  # steps completed so far in this run (read when it is interrupted)
        self.out = Path(self.training.output_dir)

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

    def _count(self, mask: torch.Tensor) -> float:
        """What a loss term over ``mask`` ``[B, T]`` is normalised by on this process: its tokens (token_mean) or its
        completions (sequence_mean, dr_grpo)."""
        return float(mask.sum()) if self.method.loss_type == "token_mean" else float(mask.shape[0])

    def _counts(self, batch: Batch) -> dict:
        """Global normalisers of the loss terms (:meth:`_count` summed over processes)."""
        counts = {"sdpo": self._sum(self._count(batch.completion_mask * batch.distill_mask.unsqueeze(-1))),
                  "pg": self._sum(self._count(batch.completion_mask * batch.judged.unsqueeze(-1)))}
        if self.method.name in ("blend", "srpo"):  # one aggregation over the tokens carrying either term
            counts["combined"] = self._sum(self._count(self._combined_mask(batch)))
        if self.method.uses_reference:  # the reference terms cover the policy-gradient's tokens
            counts["ref"] = counts["pg"]
        return counts

    def _combined_mask(self, batch: Batch) -> torch.Tensor:
        """``[B, T]`` tokens that carry a term of blend or srpo: blend every judged or distilled completion token
        (docs/variants.md §1: one policy-gradient loss over every completion token); srpo's routed mask
        ``c_t·(s_i + (1 − s_i)·m_i)`` (§2, :func:`~sdpo_sim.core.losses.routed_token_loss`)."""
        if self.method.name == "srpo":
            s = batch.success.to(batch.completion_mask.dtype)
            return batch.completion_mask * (s + (1.0 - s) * batch.distill_mask).unsqueeze(-1)
        return batch.completion_mask * torch.maximum(batch.judged, batch.distill_mask).unsqueeze(-1)

    def _alpha_mix(self, stats: dict) -> torch.Tensor:
        """Advance the hybrid controller with the global batch's mean entropy and divergence."""
        entropy = torch.tensor(self._sum(stats["entropy_sum"]) / max(1.0, self._sum(stats["tokens"])))
        mean_div = torch.tensor(self._sum(stats["divergence_sum"]) / max(1.0, self._sum(stats["distilled_tokens"])))
        return self.controller.update(divergence=mean_div, entropy=entropy)

    # -- 1-4: sample, judge, feedback, teacher contexts (llm/rollout.py) ------------------------------
    def autocast(self):
        """The forwards' precision context: bfloat16 autocast for a bfloat16 run, a no-op otherwise (:func:`llm.models.autocast`)."""
        return autocast(self.acc.device.type, self.dtype)

    def rollout(self, step: int) -> tuple[Batch, dict]:
        """This process's rollouts of ``step`` as a packed batch, and what the metrics need (:func:`llm.rollout.rollout`)."""
        with self.autocast():
            return rollout(self, step)

    # -- 5: forwards and the shared loss -----------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """``log π_ref(y_t)`` ``[B, T]`` of the completion tokens under the reference policy (the initial weights,
        :class:`llm.teacher_weights.Reference`), over the temperature as the student's, without gradient: the student's
        forward (:func:`llm.models.completion_outputs`, fused or not) and :func:`llm.losses.token_logprobs` with the
        reference's weights in place, so at step 0 it is the student's own ``log π_θ(y_t)``."""
        T = batch.completion_ids.shape[1]
        with self.reference.active(self.unwrapped):
            out = completion_outputs(self.model, batch.input_ids, batch.attention_mask, T, hidden=self.fused,
                                     share_prefix=self.share_prefix) / self.method.temperature
            head = self.unwrapped.get_output_embeddings().weight if self.fused else None  # the reference's own LM head
            return token_logprobs(out, batch.completion_ids, head)

    def compute_loss(self, batch: Batch, counts: Optional[dict] = None, alpha_mix: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """Teacher forward (no gradient), student forward, and the method's loss from ``sdpo_sim.core.losses``.

        ``counts``: global normalisers of the step's whole batch (default: this batch's, see :meth:`_counts`);
        ``alpha_mix``: the hybrid's mixing weight when already known (else the controller advances on this batch).
        """
        counts = self._counts(batch) if counts is None else counts
        m, temp, T = self.method, self.method.temperature, batch.completion_ids.shape[1]
        max_len = self.training.max_new_tokens
        # π_ref first (normally done by step's pre-pass): its weight swap reshards an FSDP2 model, which must not
        # happen while this loss holds the gathered LM head
        ref_logp = batch.ref_logp if batch.ref_logp is not None or not m.uses_reference else self.reference_logprobs(batch)
        stats: dict[str, Any] = {}
        teacher_out = teacher_head = None
        if self.method.distills:  # the teacher reads its context, then the same completion; its weights are swapped in and out
            # rows without a context get no distillation loss, so the teacher reads only the others (a sharded
            # model runs the forward on every process even with none: its collectives must match)
            rows = batch.distill_mask.nonzero().squeeze(-1)
            if rows.numel() == 0 and self.sharded:
                rows = rows.new_zeros(1)
            if rows.numel():
                teacher_out, teacher_head = teacher_outputs(self, *select_rows(batch.teacher_input_ids, batch.teacher_attention_mask, rows), T)
        student_out = completion_outputs(self.model, batch.input_ids, batch.attention_mask, T, hidden=self.fused,
                                         share_prefix=self.share_prefix) / temp
        # the LM head as the student's forward left it (FSDP2: gathered; a reshard before it would leave a DTensor shard)
        head = self.unwrapped.get_output_embeddings().weight if self.fused else None
        if self.method.distills and rows.numel() < student_out.shape[0]:  # rows the teacher skipped: the student's own outputs
            own = student_out.detach().to(teacher_out.dtype if rows.numel() else student_out.dtype)  # float32 trust-region mix
            teacher_out = own.index_copy(0, rows, teacher_out) if rows.numel() else own
        comp_mask = batch.completion_mask
        ent, div, ratio = token_stats(student_out.detach(), None if teacher_out is None else teacher_out.detach(),
                                      batch.completion_ids, m.alpha, weight=head, teacher_weight=teacher_head,
                                      chunk_size=self.training.chunk_size)
        # log π(y_t) feeds the policy gradient and the importance ratios of reused rollouts; plain SDPO with one
        # update per batch never reads it, so it is not computed (saves a log-softmax, or chunked LM-head matmuls)
        needs_logp = (self.method.uses_policy_gradient or self.method.uses_reference or self.training.updates_per_batch > 1
                      or batch.old_logp is not None)
        logp = token_logprobs(student_out, batch.completion_ids, head) if needs_logp else None
        if batch.old_logp is None and self.training.updates_per_batch > 1:
            batch.old_logp = logp.detach()  # behaviour policy = the policy that sampled (first update)
        terms_loss = {}
        blend_signal = m.name == "blend" and m.support == "sampled"  # the paper's advantage form: the PPO ratio acts
        if self.method.distills:
            d_mask = comp_mask * batch.distill_mask.unsqueeze(-1)
            isw = None if batch.old_logp is None or blend_signal else truncated_importance_weight(logp, batch.old_logp, m.is_clip)
            dw = self._distill_weights(batch, d_mask, teacher_out, teacher_head, head, counts, stats)
            tw = dw if isw is None else (isw if dw is None else isw * dw)
            if m.name in ("blend", "srpo"):
                combined = self._combined_loss(batch, student_out, teacher_out, teacher_head, head, logp, ratio, d_mask, tw, max_len)
                terms_loss["combined"] = combined[0] * self._share(self._count(combined[1]), counts["combined"])
            else:
                sd = sdpo_loss(student_out, teacher_out, batch.completion_ids, d_mask, m, max_len=max_len, weight=head,
                               teacher_weight=teacher_head, token_weights=tw, chunk_size=self.training.chunk_size)
                terms_loss["sdpo"] = sd * self._share(self._count(d_mask), counts["sdpo"])
            stats["divergence_sum"], stats["distilled_tokens"] = float((div * d_mask.cpu()).sum()), float(d_mask.sum())
            stats["log_ratio"], stats["signal_sum"] = ratio, float((ratio * d_mask.cpu()).sum())
            if self.measure_credit:  # the same teacher weights without the context (llm/credit.py)
                credit = feedback_credit(self, batch, rows, teacher_out, T) if rows.numel() else torch.zeros(0, T)
                stats["feedback_credit_sum"] = float((credit * d_mask[rows].cpu()).sum())
        if self.method.uses_policy_gradient and m.name not in ("blend", "srpo"):
            pg_mask = comp_mask * batch.judged.unsqueeze(-1)
            pg_tok = policy_gradient_token_loss(logp, batch.advantages, batch.old_logp, epsilon=m.epsilon)
            pg = aggregate(pg_tok, pg_mask, m.loss_type, max_len)
            terms_loss["pg"] = pg * self._share(self._count(pg_mask), counts["pg"])
        if m.uses_reference:  # docs/variants.md §4 (anchor), §6 (KL): the core's terms over the policy-gradient's tokens
            ref_mask = comp_mask * batch.judged.unsqueeze(-1)
            ref = reference_loss(logp, ref_logp, ref_mask, m, max_len=max_len, old_logp=batch.old_logp)
            ref_share = self._share(self._count(ref_mask), counts["ref"])
            k3 = reference_kl(logp.detach(), ref_logp, bias_correction=False)  # the `kl` metric: KL(π_θ‖π_ref) in expectation
            stats["kl_sum"], stats["kl_tokens"] = float((k3 * ref_mask).sum()), float(ref_mask.sum())
        stats["entropy_sum"], stats["tokens"] = float((ent * comp_mask.cpu()).sum()), float(comp_mask.sum())
        if m.name == "hybrid":
            alpha_mix = self._alpha_mix(stats) if alpha_mix is None else alpha_mix
            stats["alpha_mix"] = float(alpha_mix)
            loss = hybrid_loss(terms_loss["sdpo"], terms_loss["pg"], alpha_mix)
        elif m.name in ("blend", "srpo"):
            loss = terms_loss["combined"]
        else:
            loss = terms_loss["sdpo"] if self.method.distills else terms_loss["pg"]
        if m.uses_reference:  # outside any mixture: alpha_mix·L_SDPO + (1 − alpha_mix)·L_PG + L_ref (docs/variants.md §6)
            loss = loss + ref * ref_share
        return loss, stats

    def _distill_weights(self, batch: Batch, d_mask: torch.Tensor, teacher_out, teacher_head, head, counts: dict,
                         stats: dict) -> Optional[torch.Tensor]:
        """The variants' detached weight ``[B, T]`` on each token's distillation loss (``None`` when none is set):
        the per-completion part from the rollout (schedule · gate · prompt weight, :func:`llm.rollout.completion_variants`)
        times the teacher_confidence token weight ``exp(−H_T,t) / mean(exp(−H_T))``. That mean runs over the tokens
        carrying the distillation term in the *global* batch (``counts["confidence_mean"]``, from the pre-pass of
        :meth:`step`; this batch's own when absent); ``stats`` receives this batch's sum and count for it."""
        m = self.method
        w = None if batch.distill_weight is None else batch.distill_weight.unsqueeze(-1).expand_as(d_mask)
        if m.distill_token_weight != "teacher_confidence":
            return w
        carried = d_mask if m.name != "srpo" else d_mask * (~batch.success).to(d_mask.dtype).unsqueeze(-1)
        t_ent = token_stats(teacher_out.detach(), None, batch.completion_ids, m.alpha, chunk_size=self.training.chunk_size,
                            weight=teacher_head if teacher_head is not None else head)[0].to(d_mask.device)
        conf = torch.exp(-t_ent)
        stats["confidence_sum"], stats["confidence_tokens"] = float((conf * carried).sum()), float(carried.sum())
        mean = counts.get("confidence_mean")
        c = teacher_confidence_weight(t_ent, carried, mean=None if mean is None else torch.tensor(mean, dtype=conf.dtype))
        return c if w is None else w * c

    def _combined_loss(self, batch: Batch, student_out, teacher_out, teacher_head, head, logp, ratio, d_mask, tw,
                       max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """blend's or srpo's loss on this (micro-)batch, aggregated by ``loss_type`` over :meth:`_combined_mask`, and
        that mask. Each is a per-token sum of a policy-gradient and a distillation part over one mask, so it is
        aggregated part by part (the aggregation is linear in the per-token loss for a fixed mask): the distillation
        part through :func:`llm.losses.sdpo_loss` (fused or not) with that mask and the part's per-token weights.

        - blend, support sampled: :func:`~sdpo_sim.core.losses.advantage_blend_token_loss` with the signal
          ``stopgrad(log p_T(y_t) − log p_θ(y_t))`` times the weights (the advantage form);
        - blend, full/topk: ``λ·ℓ^PG_t + (1 − λ)·m_t·w_t·D_t`` (the loss form);
        - srpo: ``s_i·ℓ^PG_t + (1 − s_i)·m_t·w_t·D_t`` (:func:`~sdpo_sim.core.losses.routed_token_loss`'s).

        A completion the judge failed on has no policy-gradient part (its advantage is zeroed), as in the other methods.
        """
        m, mask = self.method, self._combined_mask(batch)
        adv = batch.advantages * batch.judged
        row = batch.distill_mask.unsqueeze(-1)
        if m.name == "blend" and m.support == "sampled":
            signal = ratio.to(logp.device) * d_mask
            tok = advantage_blend_token_loss(logp, adv, m.blend_lambda, distill_mask=d_mask, old_logp=batch.old_logp,
                                             epsilon=m.epsilon, signal=signal if tw is None else signal * tw)
            return aggregate(tok, mask, m.loss_type, max_len), mask
        pg_tok = policy_gradient_token_loss(logp, adv, batch.old_logp, epsilon=m.epsilon)
        if m.name == "blend":
            pg_w, d_w = m.blend_lambda, (1.0 - m.blend_lambda) * row
        else:
            s = batch.success.to(logp.dtype).unsqueeze(-1)
            pg_w, d_w = s, (1.0 - s) * row
        d_w = (d_w * torch.ones_like(mask)) if tw is None else d_w * tw
        sd = sdpo_loss(student_out, teacher_out, batch.completion_ids, mask, m, max_len=max_len, weight=head,
                       teacher_weight=teacher_head, token_weights=d_w, chunk_size=self.training.chunk_size)
        return aggregate(pg_tok * pg_w, mask, m.loss_type, max_len) + sd, mask

    # -- the step ----------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """One training step: rollouts, then ``updates_per_batch`` optimiser updates on them, each
        accumulating gradients over micro-batches of ``micro_batch_size`` completions."""
        t0, every = time.time(), self.training.feedback_credit_every
        self.measure_credit = self.method.distills and every > 0 and step % every == 0
        batch, info = self.rollout(step)
        gap_every = self.recipe.generation.logprob_gap_every
        gap = self.generate.logprob_gap(self.unwrapped, self.tokenizer.pad_token_id or 0) if gap_every and step % gap_every == 0 else {}
        parts, counts = batch.split(self.training.micro_batch_size), self._counts(batch)
        if self.method.uses_reference:  # π_ref is fixed: its log-probabilities once per rollout, for every update
            with self.autocast():
                for part in parts:
                    part.ref_logp = self.reference_logprobs(part)
        adaptive = self.method.name == "hybrid" and self.method.controller != "constant" and len(parts) > 1
        for _ in range(self.training.updates_per_batch):
            alpha_mix = None
            if self.method.distill_token_weight == "teacher_confidence":  # its mean runs over the whole global batch
                with torch.no_grad(), self.autocast():
                    pre = merge_stats([self.compute_loss(p, counts, torch.tensor(0.5))[1] for p in parts])
                counts["confidence_mean"] = self._sum(pre["confidence_sum"]) / max(1.0, self._sum(pre["confidence_tokens"]))
            if adaptive:  # the controller needs the whole batch's statistics before any gradient
                with torch.no_grad(), self.autocast():
                    alpha_mix = self._alpha_mix(merge_stats([self.compute_loss(p, counts, torch.tensor(0.5))[1] for p in parts]))
            losses, part_stats = [], []
            for i, part in enumerate(parts):
                with self.autocast():  # forwards and loss in the run's precision; the backward follows the graph's dtypes
                    loss, stats = self.compute_loss(part, counts, alpha_mix)
                last = i == len(parts) - 1
                if self.deepspeed:  # the engine accumulates over the parts; its step waits for the check below
                    self.model.set_gradient_accumulation_boundary(last)
                    self.model.backward(loss)
                else:
                    sync = last or self.acc.distributed_type.name not in ("MULTI_CPU", "MULTI_GPU")
                    with contextlib.nullcontext() if sync else self.acc.no_sync(self.model):
                        self.acc.backward(loss)
                losses.append(loss.detach())
                part_stats.append(stats)
            loss, stats = torch.stack(losses).sum(), merge_stats(part_stats)
            finite = self._sum(float(not torch.isfinite(loss).item())) == 0
            if self.deepspeed:  # the engine clips (gradient_clipping) and steps; its norm is known after the step
                norm = None
            else:
                norm = self.acc.clip_grad_norm_(self.model.parameters(), self.training.max_grad_norm) if finite else math.nan
            grad_norm = math.nan if norm is None else float(norm)
            finite = finite and (norm is None or math.isfinite(grad_norm))
            if finite:
                if self.deepspeed:
                    self.model.step()
                    engine_norm = self.model.get_global_grad_norm()
                    grad_norm = math.nan if engine_norm is None else float(engine_norm)
                else:
                    self.optimizer.step()
                self.teacher.update(self.unwrapped)
                self.nonfinite_run = 0
            else:
                self.nonfinite_steps += 1
                self.nonfinite_run += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.nonfinite_run)
            if self.deepspeed and not finite:
                self.model.zero_grad()  # drops the skipped step's accumulated gradients (a step zeroes them itself)
            self.optimizer.zero_grad(set_to_none=True)
            if not finite:
                break
        return {**self._metrics(step, loss, stats, info, grad_norm, time.time() - t0), **gap}

    def _metrics(self, step: int, loss, stats: dict, info: dict, grad_norm: float, seconds: float) -> dict:
        S = self._sum
        tokens, completions = S(stats["tokens"]), S(info["completions"])
        out = {
            "reward": S(info["reward_sum"]) / max(1.0, S(info["judged"])),
            "entropy": S(stats["entropy_sum"]) / max(1.0, tokens),
            "divergence": S(stats["divergence_sum"]) / max(1.0, S(stats["distilled_tokens"])) if self.method.distills else math.nan,
            "alpha_mix": stats.get("alpha_mix", 1.0 if self.method.name == "sdpo" else (0.0 if not self.method.distills else math.nan)),
            "response_length": S(info["length_sum"]) / max(1.0, completions),
            "loss": S(float(loss.detach())) / self.acc.num_processes,
            "nonfinite_steps": self.nonfinite_steps,
            "distill_fraction": S(info["distilled"]) / max(1.0, completions),
            "demo_fraction": S(info["demos"]) / max(1.0, completions),
            "judge_failures": int(S(info["judge_failures"])),
            "reward_failures": int(S(info["reward_failures"])),
            "judge_unparseable": int(S(info["judge_unparseable"])),
            "truncated_fraction": S(info["truncated"]) / max(1.0, completions),
            **{f"reward/{name}": S(total) / S(n) if S(n) else math.nan for name, (total, n) in info["per_function"].items()},
            "grad_norm": grad_norm,
            **({"kl": S(stats["kl_sum"]) / max(1.0, S(stats["kl_tokens"]))} if self.method.uses_reference else {}),
            **credit_metrics(S, stats),
            "seconds": seconds,
        }
        out["_heatmap"] = (info, stats.get("log_ratio"))
        return out

    # -- the loop ----------------------------------------------------------------------------------
    def trainer_state(self, step: int) -> dict:
        """What a checkpoint keeps beside the weights; the data position is a function of the step (it is kept to
        be shown and checked: a resumed run whose dataset changed size is warned)."""
        return {"nonfinite_steps": self.nonfinite_steps, "nonfinite_run": self.nonfinite_run,
                "controller": None if self.controller is None else self.controller.state_dict(),
                "dataset_rows": len(self.prompts) if hasattr(self.prompts, "position") else None,
                "data_position": self.prompts.position(step, self.training.prompts_per_step) if hasattr(self.prompts, "position") else None}

    def save(self, step: int) -> Path:
        return save_checkpoint(self.out, step, model=self.unwrapped, optimizer=self.optimizer, teacher=self.teacher,
                               trainer_state=self.trainer_state(step), rank=self.acc.process_index,
                               barrier=self.acc.wait_for_everyone, accelerator=self.acc,
                               save_total_limit=self.training.save_total_limit)

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
        rows = state.get("dataset_rows")
        if rows is not None and hasattr(self.prompts, "position") and rows != len(self.prompts):
            log.warning("the checkpoint was made with %d dataset prompts, the dataset now has %d: the prompts from step %d on "
                        "are not those the interrupted run would have used", rows, len(self.prompts), self.start_step)
        return self.start_step

    def train(self, *, resume: bool = False) -> list[dict]:
        """Run ``training.steps`` steps (from the last checkpoint with ``resume``); returns the logged rows."""
        if resume:
            self.resume()
        main = self.acc.is_main_process
        if main:
            self.recipe.save(self.out / "recipe.yaml")
        logger = MetricsLogger(self.out, enabled=main, report_to=self.training.report_to, resume_step=self.start_step,
                               run_name=self.out.name, config=self.recipe.to_dict())
        final_eval = None
        rows = []
        self.steps_done = self.start_step
        bar = tqdm(range(self.start_step, self.training.steps), disable=not main, desc=f"sdpo-llm {self.method.name}", unit="step")
        try:
            for step in bar:
                metrics = self.step(step)
                info, log_ratio = metrics.pop("_heatmap")
                done = self.steps_done = step + 1
                evaluated = self.eval_rows is not None and self.training.eval_steps > 0 and done % self.training.eval_steps == 0
                if evaluated:
                    with self.autocast():
                        final_eval = evaluate(self, self.eval_rows)
                    metrics.update(final_eval)
                if done % self.training.log_every == 0 or done == self.training.steps or evaluated:
                    logger.log(done, metrics)
                    rows.append({"step": done, **metrics})
                    bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
                if self.training.heatmap_every and done % self.training.heatmap_every == 0 and log_ratio is not None:
                    self._heatmap(logger, done, info, log_ratio)
                if self.nonfinite_run >= self.training.max_consecutive_nonfinite:
                    path = self.save(done)
                    raise NonFiniteLossError(
                        f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (limit "
                        f"training.max_consecutive_nonfinite={self.training.max_consecutive_nonfinite}); stopped at step {done}, "
                        f"checkpoint in {path}. Lower training.learning_rate or check the model's dtype.")
                if (self.training.save_every and done % self.training.save_every == 0) or done == self.training.steps:
                    self.save(done)
        finally:
            logger.close()
        if self.eval_rows is not None and (final_eval is None or self.steps_done % max(1, self.training.eval_steps)):
            with self.autocast():
                final_eval = evaluate(self, self.eval_rows)  # the trained policy's, if the last step did not evaluate it
        self.export(self.out / "final-model")
        if main:
            summary = {"steps": self.training.steps, "final": rows[-1] if rows else None, "eval": final_eval,
                       "dropped_prompts": self.dropped_prompts, "replica_max_abs_diff": self.replica_difference()}
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
