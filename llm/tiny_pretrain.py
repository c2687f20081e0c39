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

Speed (``benchmarks/bench_make_tiny.py``): a step is almost all forward + backward (making and
tokenising 32 examples is ~3% of it). Padding each example to the batch's longest wasted ~43% of
the positions, so examples are packed several to a row (same loss, same gradient), and training runs
on one torch thread: at this size two threads gain ~1.7× on an idle machine but lose 5–60× on small
ops as soon as another process holds a core (OpenMP threads wait for each other). 600 steps at a
proportionally larger learning rate replace the earlier 800.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from tqdm.auto import tqdm

from .context import render_reprompt
from .feedback import render_feedback
from .recipe import ContextConfig
from .tasks import Task, get_task
from .tiny import save_pretrained_dir

# 600 steps at lr 6.5e-3 keep the in-context gain near that of the earlier 800 at 5e-3 (held-out, proof templates,
# 3 data seeds: +0.121..+0.126 against +0.124..+0.157) in 3/4 of the time (docs/llm_feedback.md)
DEFAULT_STEPS = 600
EXAMPLE_KINDS = ("plain", "critique", "demo", "score")


@dataclass
class PretrainConfig:
    """Corpus mixture, batching and optimiser settings of :func:`pretrain`.

    ``packing``: each batch's ``batch_size`` examples are packed several to a row (:func:`pack_examples`)
    instead of one to a row padded to the longest; the loss and its gradient are the same (each
    example attends only to itself, its positions start at 0), only the padding is not computed.
    ``num_threads``: torch threads while pretraining (``None``: leave the process's setting); 1 by
    default because a shared CPU makes two threads far slower (module docstring).
    """

    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    learning_rate: float = 6.5e-3  # ≈ 5e-3 · 800/600: about the summed step size of 800 steps at 5e-3
    warmup_steps: int = 10
    base_quality: float = 0.5  # probability that each constraint holds in a plain (student-view) answer
    mix: tuple = (0.35, 0.35, 0.2, 0.1)  # plain, critique, demo, score
    seed: int = 0
    packing: bool = True
    num_threads: Optional[int] = 1

    def validate(self) -> "PretrainConfig":
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"PretrainConfig.{name}={v!r} must be an integer >= {low}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"PretrainConfig.learning_rate={self.learning_rate!r} must be a finite number > 0")
        if not 0.0 <= self.base_quality <= 1.0:
            raise ValueError(f"PretrainConfig.base_quality={self.base_quality!r} must be in [0, 1]")
        if len(self.mix) != len(EXAMPLE_KINDS) or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"PretrainConfig.mix={self.mix!r} must be {len(EXAMPLE_KINDS)} non-negative weights for {EXAMPLE_KINDS}")
        if not isinstance(self.packing, bool):
            raise ValueError(f"PretrainConfig.packing={self.packing!r} must be true or false")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or isinstance(self.num_threads, bool)
                                             or self.num_threads < 1):
            raise ValueError(f"PretrainConfig.num_threads={self.num_threads!r} must be a positive integer or None")
        return self


def make_example(task: Task, rng: random.Random, kind: str, spec: ContextConfig, base_quality: float = 0.5) -> tuple[str, str]:
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


def tokenize_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Each ``(context, answer)`` as ``(context ids, answer ids + [eos])`` (one tokenizer call per side)."""
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    return [(c, a + [tokenizer.eos_token_id]) for c, a in zip(contexts, answers)]


def pad_examples(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, L]``, ``L`` the longest row
    (labels −100 on the context and the padding)."""
    width = max(len(c) + len(a) for c, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (c, a) in enumerate(rows):
        n = len(c) + len(a)
        ids[i, :n] = torch.tensor(c + a)
        labels[i, len(c):n] = torch.tensor(a)
        mask[i, :n] = 1
    return ids, mask, labels


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, L]`` (labels −100 off the answer+eos)."""
    return pad_examples(tokenize_examples(tokenizer, pairs), tokenizer.pad_token_id)


def pack_examples(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several examples per row: ``input_ids``, ``position_ids`` and ``labels`` ``[R, W]``.

    ``W`` is the longest example; rows are filled first-fit in order of decreasing length, and each
    example's positions restart at 0. Without an attention mask, transformers reads a restart of
    ``position_ids`` as a new sequence and lets no token attend across it, so every example sees
    exactly what it sees alone, with RoPE positions as if alone. The row's tail (padding) is one more
    such sequence with labels −100.
    """
    lengths = [len(c) + len(a) for c, a in rows]
    width = max(lengths)
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            bins.append([])
            free.append(width)
            row = len(bins) - 1
        bins[row].append(i)
        free[row] -= lengths[i]
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            c, a = rows[i]
            end = start + lengths[i]
            ids[r, start:end] = torch.tensor(c + a)
            labels[r, start + len(c):end] = torch.tensor(a)
            positions[r, start:end] = torch.arange(lengths[i])
            start = end
        positions[r, start:] = torch.arange(width - start)
    return ids, positions, labels


def corpus_batches(tokenizer, task: Task, config: PretrainConfig, context: ContextConfig, rng: random.Random) -> Iterator[list[tuple[list[int], list[int]]]]:
    """Endless batches of ``batch_size`` fresh tokenised examples ``(context ids, answer ids + eos)``."""
    while True:
        kinds = rng.choices(EXAMPLE_KINDS, weights=config.mix, k=config.batch_size)
        yield tokenize_examples(tokenizer, [make_example(task, rng, k, context, config.base_quality) for k in kinds])


def model_inputs(rows: list[tuple[list[int], list[int]]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Keyword inputs of the model's forward for ``rows``: packed (:func:`pack_examples`) or padded."""
    if packing:
        ids, positions, labels = pack_examples(rows, pad_id)
        return {"input_ids": ids, "position_ids": positions, "labels": labels}
    ids, mask, labels = pad_examples(rows, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_loss(model, rows: list[tuple[list[int], list[int]]], pad_id: int, packing: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over every answer+eos token of ``rows``, packed or padded."""
    return model(**model_inputs(rows, pad_id, packing), use_cache=False).loss


def sorted_answer_logprobs(model, rows: list[tuple[list[int], list[int]]], pad_id: int, packing: bool) -> torch.Tensor:
    """``log p(y_t | y_<t)`` of every answer+eos token of ``rows``, sorted ``[N]`` (the order does not
    depend on the layout, so packed and padded can be compared)."""
    inputs = model_inputs(rows, pad_id, packing)
    labels = inputs.pop("labels")[:, 1:]
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    keep = labels != -100
    logp = torch.log_softmax(logits[keep].float(), dim=-1)
    return logp.gather(-1, labels[keep][:, None]).squeeze(-1).sort().values


def check_packing(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> None:
    """Raise ``RuntimeError`` unless packed and padded ``rows`` give the model the same answer log-probs.

    Packing is correct only if the model isolates the sequences of a packed row (see
    :func:`pack_examples`); a model or transformers version that did not would let examples attend
    to each other and train on another objective without a word. Tolerance 1e-3 (absolute, nats):
    the same float32 log-probs (|log p| ≲ 10) computed in another summation order differ by
    ~10 · 1.2e-7 · (≲ 100 rounded operations) ≈ 1e-4 at worst (measured: 0), while letting packed
    examples see each other moved them by 0.06–0.1 in the untrained tiny model (measured, 166 tokens).
    """
    with torch.no_grad():
        diff = (sorted_answer_logprobs(model, rows, pad_id, True) - sorted_answer_logprobs(model, rows, pad_id, False)).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"packed and padded examples get answer log-probs {diff:.3g} nats apart: this model lets packed "
                           "examples attend to each other; pretrain with PretrainConfig(packing=False)")


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at ``step``: ``min(1, (s+1)/warmup) · ½(1 + cos(π s / steps))``."""
    return min(1.0, (step + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


@contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``None``: unchanged), restoring the previous count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(
    model,
    tokenizer,
    task: Union[str, Task] = "word-constraints",
    config: Optional[PretrainConfig] = None,
    context: Optional[ContextConfig] = None,
    *,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on the synthetic feedback corpus; return the loss per step.

    AdamW with linear warm-up and cosine decay of the learning rate (:func:`lr_factor`); next-token
    cross-entropy on the answer tokens only (:func:`batch_loss`); batches from :func:`corpus_batches`.
    """
    config = (config or PretrainConfig()).validate()
    task = get_task(task) if isinstance(task, str) else task
    context = context or ContextConfig()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config.steps, config.warmup_steps))
    batches = corpus_batches(tokenizer, task, config, context, rng)
    model.train()
    losses = []
    with torch_threads(config.num_threads):
        for _ in tqdm(range(config.steps), desc="pretrain", disable=not progress):
            rows = next(batches)
            if config.packing and not losses:
                check_packing(model, rows, tokenizer.pad_token_id)
            loss = batch_loss(model, rows, tokenizer.pad_token_id, config.packing)
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
    context: Optional[ContextConfig] = None,
    config: Optional[PretrainConfig] = None,
) -> list[float]:
    """Load the model saved in ``path``, :func:`pretrain` it and save it back into ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loaded only when used, as in llm.tiny

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = config or PretrainConfig(steps=steps, seed=seed)
    losses = pretrain(model, tokenizer, task, cfg, context)
    save_pretrained_dir(model, tokenizer, path)
    return losses
