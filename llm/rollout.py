"""Rollouts: prompts → sampled completions → judge → feedback → teacher contexts → a packed :class:`~llm.batch.Batch`.

The first half of :meth:`llm.trainer.Trainer.step`, in the order the toy world's loop uses (docs/design.md §4)."""

from __future__ import annotations

import math
import random
from typing import Optional

import torch

from sdpo_sim.core.method import MethodConfig

from .batch import Batch, pack_rows
from .context import build_contexts, context_ids_for_batch, prompt_ids
from .feedback import noisy_score, render_feedback
from .generation import FEEDBACK, GENERATION, sample_seed


def rollout(trainer, step: int) -> tuple[Batch, dict]:
    """One step's rollouts on this process (``trainer``: a :class:`~llm.trainer.Trainer`): sample a group of completions per
    prompt, judge them, render feedback, build each completion's teacher context and pack it all into a :class:`Batch`."""
    training, m, spec = trainer.training, trainer.method, trainer.recipe
    world, rank, g = trainer.acc.num_processes, trainer.acc.process_index, m.num_generations
    per_rank = training.prompts_per_step // world
    first = rank * per_rank
    rows = trainer.prompts.rows_for_step(training.seed, step, training.prompts_per_step)[first:first + per_rank]
    chat = spec.generation.chat_template_kwargs
    # 1. sample a group of completions per prompt
    p_ids = [prompt_ids(trainer.tokenizer, r.prompt, training.max_prompt_length, r.messages, chat) for r in rows]
    seeds = [sample_seed(training.seed, step, GENERATION, first + i) for i in range(per_rank)]
    groups = trainer.generate(trainer.unwrapped, p_ids, g, seeds)  # vLLM: the current weights are synced into it first
    completion_ids = [c for grp in groups for c in grp.completion_ids]
    texts = [trainer.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
    row_of = [r for r in rows for _ in range(g)]
    row_prompts = [r.prompt for r in row_of]
    # 2. judge: every reward function once for the batch (a failing one costs only its items their score)
    rewards = trainer.rewards(row_prompts, texts, {c: [r.columns.get(c) for r in row_of] for c in trainer.prompts.column_names})
    judgements = rewards.judgements
    truncated = [is_truncated(c, training.max_new_tokens, trainer.tokenizer.eos_token_id) for c in completion_ids]
    keep = [not (t and training.mask_truncated_completions) for t in truncated]  # TRL's mask_truncated_completions
    # 3. render feedback (plus the row's privileged context, if the dataset has one)
    scores, feedback = [], []
    for i, j in enumerate(judgements):
        if j is None:
            scores.append(None)
            feedback.append(row_of[i].context)
            continue
        noise_seed = sample_seed(training.seed, step, FEEDBACK, first * g + i)  # same ε for the score and its text
        scores.append(noisy_score(j.score, spec.task.noise, random.Random(noise_seed)))
        rendered = None if spec.task.feedback == "none" else render_feedback(
            j, spec.task.feedback, noise=spec.task.noise, rng=random.Random(noise_seed), threshold=spec.task.threshold)
        feedback.append("\n".join(t for t in (rendered, row_of[i].context) if t) or None)
    # 4. teacher contexts: feedback and/or the best successful sibling, never itself
    if trainer.method.distills:  # a masked (truncated) completion neither distills nor demonstrates
        kept_scores = [s if k else None for s, k in zip(scores, keep)]
        contexts = build_contexts(row_prompts, texts, kept_scores, [f if k else None for f, k in zip(feedback, keep)], g, spec.context)
        ctx_ids = context_ids_for_batch(trainer.tokenizer, row_prompts, texts, contexts, feedback, spec.context,
                                        [r.messages for r in row_of], chat)
        ctx_ids = [c if k else None for c, k in zip(ctx_ids, keep)]
    else:
        contexts, ctx_ids = [], [None] * len(texts)
    student_prefix = [p for p in p_ids for _ in range(g)]
    teacher_prefix = [c if c is not None else s for c, s in zip(ctx_ids, student_prefix)]
    advantages = global_advantages(scores, m, trainer.acc)
    success, distill_weight = completion_variants(m, scores, keep, spec.context.success_threshold, step, training.steps)
    dev, pad = trainer.acc.device, trainer.tokenizer.pad_token_id
    ids, mask = pack_rows(student_prefix, completion_ids, pad, dev)
    t_ids, t_mask = pack_rows(teacher_prefix, completion_ids, pad, dev)
    comp, comp_mask = pack_rows([[]] * len(completion_ids), completion_ids, pad, dev)
    batch = Batch(
        input_ids=ids, attention_mask=mask, teacher_input_ids=t_ids, teacher_attention_mask=t_mask,
        completion_ids=comp, completion_mask=comp_mask.float(),
        distill_mask=torch.tensor([float(c is not None) for c in ctx_ids], device=dev),
        judged=torch.tensor([float(s is not None and k) for s, k in zip(scores, keep)], device=dev),
        advantages=advantages.to(dev),
        success=None if success is None else success.to(dev),
        distill_weight=None if distill_weight is None else distill_weight.to(dev),
    )
    true_scores = [j.score for j in judgements if j is not None]
    info = {
        "reward_sum": sum(true_scores), "judged": len(true_scores), "judge_failures": len(judgements) - len(true_scores),
        "reward_failures": rewards.failures, "truncated": sum(truncated),
        "judge_unparseable": sum(getattr(f, "last_unparseable", 0) for f in trainer.rewards.funcs),  # LLM judges' answers without a score
        # each reward function's score sum and count on this process (the metrics reduce them over processes)
        "per_function": {k: (rewards.per_function[k] * n if n else 0.0, n) for k, n in rewards.scored.items()},
        "completions": len(texts), "length_sum": float(comp_mask.sum()), "texts": texts, "prompts": row_prompts,
        "completion_ids": completion_ids, "distill_rows": [c is not None for c in ctx_ids],
        "distilled": float(batch.distill_mask.sum()), "demos": sum(c.demo_index is not None for c in contexts),
    }
    return batch, info


def is_truncated(completion_ids: list[int], max_new_tokens: int, eos_id: Optional[int]) -> bool:
    """A completion cut off at ``max_new_tokens`` without an end-of-sequence token."""
    return len(completion_ids) >= max_new_tokens and (eos_id is None or not completion_ids or completion_ids[-1] != eos_id)


def filled_scores(scores: list[Optional[float]], group_size: int) -> torch.Tensor:
    """Scores ``[B]`` (float32) with each failed judgement (``None``) filled by its group's mean score (0 for a group
    with none), so that it has advantage 0 against its siblings' mean and never passes the gate."""
    r = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)
    groups = r.view(-1, group_size)
    fill = torch.nanmean(groups, dim=1, keepdim=True).nan_to_num(0.0).expand_as(groups)
    return torch.where(groups.isnan(), fill, groups).reshape(-1)


def completion_variants(m: MethodConfig, scores: list[Optional[float]], keep: list[bool], success_threshold: float,
                        step: int, total_steps: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The per-completion quantities of the variants (docs/variants.md), on this process's ``B`` completions (whole
    groups, so group statistics need no other process): ``(success [B] bool, distill_weight [B] float32)``, each
    ``None`` when the method does not read it (the default path is untouched).

    - ``success_i = judged_i ∧ kept_i ∧ score_i ≥ context.success_threshold`` (the demonstrations' rule; a truncated
      completion masked by ``training.mask_truncated_completions`` never succeeds);
    - ``distill_weight_i = s(step)·g_i·p_i`` from :meth:`MethodConfig.distill_weights` without its token weight
      (``teacher_confidence`` is per token and needs the teacher: the trainer multiplies it in), on the scores of
      :func:`filled_scores`.
    """
    success = torch.tensor([s is not None and k and s >= success_threshold for s, k in zip(scores, keep)], dtype=torch.bool)
    per_completion = m.replace(distill_token_weight="uniform") if m.distills else m
    weight = None
    if m.distills and per_completion.weights_distillation:
        weight = per_completion.distill_weights(scores=filled_scores(scores, m.num_generations), mask=torch.ones(len(scores), 1),
                                                success=success, step=step, total_steps=total_steps)[:, 0]
    return (success if m.needs_success else None), weight


def global_advantages(scores: list[Optional[float]], m: MethodConfig, acc) -> torch.Tensor:
    """GRPO: group-normalised; REINFORCE and hybrid: ``r − batch mean`` over the *global* batch.

    A completion whose judge failed is filled with its group's mean score and gets no policy-gradient loss.
    """
    r = filled_scores(scores, m.num_generations)
    all_r = acc.gather(r.to(acc.device)).cpu() if acc.num_processes > 1 else r
    adv = m.advantages(all_r)
    n = r.numel()
    return adv[acc.process_index * n:(acc.process_index + 1) * n]
