"""Supervised pretraining that gives a tiny model a real in-context ability: using feedback.

The synthetic corpus is built from a task's prompts, its judge and the trainer's own teacher-context
renderer (:func:`llm.context.render_reprompt`), so pretraining sees exactly the text the self-teacher
will read later. Each example is ``context → answer<eos>`` (loss on the answer and eos only):

- ``plain``     (student view): prompt → an answer of ``base_quality`` (each constraint holds w.p. 0.5):
  the policy starts mediocre, with room to learn;
- ``critique``: reprompt(prompt, critique of a mediocre attempt) → an answer meeting every constraint;
- ``demo``:     reprompt(prompt, a correct solution [, critique]) → that solution (half the time)
  or another correct answer;
- ``score``:    reprompt(prompt, binary/ordinal/continuous feedback on an unseen attempt) → a mediocre
  answer: a bare score about an attempt the model cannot see carries no information, and the model
  must not learn that any feedback at all means "do better".

So the model conditioned on a critique or demonstration puts its mass on the corrected tokens, which
is what SDPO's self-teacher needs; conditioned on a bare score it does not improve (DESIGN.md §3).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from .context import render_reprompt
from .feedback import render_feedback
from .recipe import ContextSpec
from .tasks import Task, get_task

DEFAULT_STEPS = 800  # the proof's full scale; its held-out check: 0.49 alone → 0.62 with critique in context
EXAMPLE_KINDS = ("plain", "critique", "demo", "score")


@dataclass
class PretrainConfig:
    """Corpus mixture and optimiser settings of :func:`pretrain`."""

    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    base_quality: float = 0.5  # probability that each constraint holds in a plain (student-view) answer
    mix: tuple = (0.35, 0.35, 0.2, 0.1)  # plain, critique, demo, score
    seed: int = 0

    def validate(self) -> "PretrainConfig":
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "steps" else 1):
                raise ValueError(f"PretrainConfig.{name}={v!r} must be a {'non-negative' if name == 'steps' else 'positive'} integer")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"PretrainConfig.learning_rate={self.learning_rate!r} must be > 0")
        if not 0.0 <= self.base_quality <= 1.0:
            raise ValueError(f"PretrainConfig.base_quality={self.base_quality!r} must be in [0, 1]")
        if len(self.mix) != len(EXAMPLE_KINDS) or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"PretrainConfig.mix={self.mix!r} must be {len(EXAMPLE_KINDS)} non-negative weights for {EXAMPLE_KINDS}")
        return self


def make_example(task: Task, rng: random.Random, kind: str, spec: ContextSpec, base_quality: float = 0.5) -> tuple[str, str]:
    """One ``(context, answer)`` pair of the given ``kind`` (see the module docstring)."""
    if task.sample_answer is None:
        raise ValueError(f"task {task.name!r} has no sample_answer, so it cannot make pretraining data")
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(EXAMPLE_KINDS)}")
    prompt = task.sample_prompts(rng, 1)[0]
    mediocre = lambda: task.sample_answer(prompt, rng, base_quality)  # noqa: E731
    good = lambda: task.sample_answer(prompt, rng, 1.0)  # noqa: E731
    if kind == "plain":
        return prompt, mediocre()
    attempt = mediocre()
    judgement = task.judge(prompt, attempt)
    if kind == "critique":
        return render_reprompt(prompt, None, render_feedback(judgement, "critique"), spec), good()
    if kind == "demo":
        demo = good()
        feedback = render_feedback(judgement, "critique") if rng.random() < 0.5 else None
        return render_reprompt(prompt, demo, feedback, spec), (demo if rng.random() < 0.5 else good())
    scalar = render_feedback(judgement, rng.choice(("binary", "ordinal", "continuous")))
    return render_reprompt(prompt, None, scalar, spec), mediocre()


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, L]`` (labels −100 off the answer+eos)."""
    rows, labels = [], []
    for context, answer in pairs:
        c = tokenizer(context, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(c + a)
        labels.append([-100] * len(c) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, lab


def pretrain(
    model,
    tokenizer,
    task: Union[str, Task] = "word-constraints",
    config: Optional[PretrainConfig] = None,
    context: Optional[ContextSpec] = None,
    *,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on the synthetic feedback corpus; return the loss per step.

    AdamW with linear warm-up and cosine decay of the learning rate; next-token cross-entropy on
    the answer tokens only.
    """
    config = (config or PretrainConfig()).validate()
    task = get_task(task) if isinstance(task, str) else task
    context = context or ContextSpec()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    # lr_s = lr · min(1, s/warmup) · ½(1 + cos(π s / steps))
    schedule = lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * s / max(1, config.steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for _ in tqdm(range(config.steps), desc="pretrain", disable=not progress):
        kinds = rng.choices(EXAMPLE_KINDS, weights=config.mix, k=config.batch_size)
        ids, mask, labels = encode_examples(tokenizer, [make_example(task, rng, k, context, config.base_quality) for k in kinds])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def pretrain_dir(
    path: Union[str, Path],
    task: Union[str, Task] = "word-constraints",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    context: Optional[ContextSpec] = None,
    config: Optional[PretrainConfig] = None,
) -> list[float]:
    """Load the model saved in ``path``, :func:`pretrain` it and save it back into ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny import save_pretrained_dir

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = config or PretrainConfig(steps=steps, seed=seed)
    losses = pretrain(model, tokenizer, task, cfg, context)
    save_pretrained_dir(model, tokenizer, path)
    return losses
