"""Held-out evaluation: greedy and sampled completions of the eval prompts, scored by the run's reward functions.

For ``n`` eval prompts, one greedy completion and ``k = training.eval_num_generations`` sampled ones each::

    eval_reward         = mean over prompts and samples of the score          (mean@k; the training metric ``reward``)
    eval_reward_greedy  = mean over prompts of the greedy completion's score
    eval_pass@k         = fraction of prompts with at least one sample scoring ≥ training.eval_pass_threshold
    eval_unscored       = completions no reward function scored (they count in no mean)

The samples use the fixed stream ``(seed, EVAL, 1, prompt index)``: every evaluation of a run draws the same noise, so
two evaluations differ by the policy only. Prompts are split over processes (``rows[rank::world]``), sums all-reduced.
"""

from __future__ import annotations

import math

import torch

from .context import prompt_ids
from .data import PromptRow
from .generation import EVAL, sample_seed


@torch.no_grad()
def evaluate(trainer, rows: list[PromptRow]) -> dict:
    """The eval metrics above for ``rows`` (``trainer``: a :class:`~llm.trainer.Trainer`)."""
    training, chat = trainer.training, trainer.recipe.generation.chat_template_kwargs
    world, rank, k = trainer.acc.num_processes, trainer.acc.process_index, training.eval_num_generations
    mine = list(range(rank, len(rows), world))
    p_ids = [prompt_ids(trainer.tokenizer, rows[i].prompt, training.max_prompt_length, rows[i].messages, chat) for i in mine]
    seeds = [sample_seed(training.seed, EVAL, 1, i) for i in mine]
    greedy = trainer.generate(trainer.unwrapped, p_ids, 1, seeds, greedy=True)
    sampled = trainer.generate(trainer.unwrapped, p_ids, k, seeds)
    sums = {"greedy": 0.0, "greedy_n": 0, "sampled": 0.0, "sampled_n": 0, "passed": 0, "prompts": len(mine), "unscored": 0}
    for decoded, g in ((greedy, 1), (sampled, k)):
        texts = [trainer.tokenizer.decode(c, skip_special_tokens=True) for grp in decoded for c in grp.completion_ids]
        row_of = [rows[i] for i in mine for _ in range(g)]
        columns = {c: [r.columns.get(c) for r in row_of] for c in trainer.prompts.column_names}
        judgements = trainer.rewards([r.prompt for r in row_of], texts, columns).judgements
        scores = [None if j is None else j.score for j in judgements]
        name = "greedy" if g == 1 else "sampled"
        sums[name] += sum(s for s in scores if s is not None)
        sums[f"{name}_n"] += sum(s is not None for s in scores)
        sums["unscored"] += sum(s is None for s in scores)
        if name == "sampled":
            sums["passed"] += sum(any(s is not None and s >= training.eval_pass_threshold for s in scores[i * k:(i + 1) * k])
                                  for i in range(len(mine)))
    total = {key: trainer._sum(v) for key, v in sums.items()}
    return {"eval_reward": _ratio(total["sampled"], total["sampled_n"]), "eval_reward_greedy": _ratio(total["greedy"], total["greedy_n"]),
            f"eval_pass@{k}": _ratio(total["passed"], total["prompts"]), "eval_unscored": int(total["unscored"])}


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan
