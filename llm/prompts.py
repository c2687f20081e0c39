"""Where a run's prompts come from: the built-in task's sampler or a user's dataset (:mod:`llm.data`), as rows.

Both sources answer ``rows_for_step(seed, step, n)`` with :class:`~llm.data.PromptRow` s, a pure function of its
arguments, so a resumed run reads exactly the prompts the uninterrupted one would have (the data position is the step).
"""

from __future__ import annotations

import logging
import random
from typing import Optional

from .context import format_prompt
from .data import PromptDataset, PromptRow
from .generation import EVAL, PROMPTS, sample_seed
from .recipe import Recipe
from .tasks import Task

log = logging.getLogger(__name__)


class TaskPrompts:
    """A built-in task's prompt sampler as a prompt source (step ``s`` draws from stream ``(seed, s, PROMPTS)``)."""

    def __init__(self, task: Task) -> None:
        self.task, self.column_names = task, []

    def rows_for_step(self, seed: int, step: int, n: int) -> list[PromptRow]:
        return [PromptRow(p) for p in self.task.sample_prompts(random.Random(sample_seed(seed, step, PROMPTS)), n)]

    def eval_rows(self, seed: int, n: int) -> list[PromptRow]:
        """``n`` fresh prompts from the evaluation stream, the same at every evaluation of a run."""
        return [PromptRow(p) for p in self.task.sample_prompts(random.Random(sample_seed(seed, EVAL)), n)]


def prompt_token_counter(tokenizer, chat_kwargs: Optional[dict] = None):
    """``rows -> [token count of each row's formatted prompt]`` (what the student reads), for :meth:`PromptDataset.drop_long`."""
    def count(rows: list[PromptRow]) -> list[int]:
        texts = [format_prompt(tokenizer, r.prompt, r.messages, chat_kwargs) for r in rows]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return count


def open_prompts(recipe: Recipe, task: Task) -> tuple:
    """``(train source, eval dataset or None)``, opened and checked (schema, non-empty) before any model loads."""
    spec = recipe.task
    if spec.dataset is None:
        source = TaskPrompts(task)
    else:
        source = PromptDataset.load(spec.dataset, split=spec.dataset_split, field_name="task.dataset", context_column=spec.context_column)
    held_out = None
    if spec.eval_dataset is not None or spec.eval_split is not None:
        path, name = (spec.eval_dataset, "task.eval_dataset") if spec.eval_dataset is not None else (spec.dataset, "task.dataset")
        held_out = PromptDataset.load(path, split=spec.eval_split, field_name=name, context_column=spec.context_column)
    return source, held_out


def fit_prompts(source, held_out: Optional[PromptDataset], recipe: Recipe, tokenizer) -> tuple:
    """``(eval rows or None, dropped)``: drop dataset prompts longer than ``training.max_prompt_length`` tokens (counted
    and logged, never truncated) and take the eval rows: the first ``training.eval_prompts`` of the eval split, or fresh
    built-in prompts when there is no dataset and ``eval_steps`` > 0."""
    training = recipe.training
    count = prompt_token_counter(tokenizer, recipe.generation.chat_template_kwargs)
    dropped = 0
    if isinstance(source, PromptDataset):
        dropped = source.drop_long(count, training.max_prompt_length)
        if dropped:
            log.warning("task.dataset: %d of %d prompts are longer than training.max_prompt_length=%d tokens and were dropped",
                        dropped, dropped + len(source), training.max_prompt_length)
    if held_out is not None:
        eval_dropped = held_out.drop_long(count, training.max_prompt_length)
        if eval_dropped:
            log.warning("eval prompts: %d longer than training.max_prompt_length=%d tokens were dropped", eval_dropped, training.max_prompt_length)
        return held_out.rows(0, min(training.eval_prompts, len(held_out))), dropped
    if isinstance(source, TaskPrompts) and training.eval_steps > 0:
        return source.eval_rows(training.seed, training.eval_prompts), dropped
    return None, dropped
