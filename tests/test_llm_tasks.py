"""The built-in open-ended task: prompts, the rule-based judge's graded score and critique."""

from __future__ import annotations

import random

import pytest

from llm.feedback import Judgement
from llm.tasks import TASKS, WordConstraints, get_task, judge_word, parse_word_prompt, word_prompt

PROMPT = word_prompt(WordConstraints(length=4, required="r", forbidden="e", ending="t"))


def test_registry_and_errors():
    task = get_task("word-constraints")
    assert task.name == "word-constraints" and "word-constraints" in TASKS
    with pytest.raises(ValueError, match="word-constraints"):
        get_task("nope")


def test_prompts_are_reproducible_and_parse_back():
    task = get_task("word-constraints")
    a, b = task.sample_prompts(random.Random(5), 20), task.sample_prompts(random.Random(5), 20)
    assert a == b and len(set(a)) > 10
    for p in a:
        spec = parse_word_prompt(p)
        assert 3 <= spec.length <= 6 and len({spec.required, spec.forbidden, spec.ending}) == 3
        assert word_prompt(spec) == p
    with pytest.raises(ValueError, match="not a word-constraints prompt"):
        parse_word_prompt("hello")


def test_perfect_answer_scores_one():
    j = judge_word(PROMPT, "part")
    assert j == Judgement(1.0, "all constraints met")
    assert judge_word(PROMPT, "  trot\n").score == 1.0  # surrounding whitespace ignored


@pytest.mark.parametrize(
    "answer, score, phrases",
    [
        ("parts", (0.75 + 1 + 1 + 0) / 4, ["too long (5 letters): drop 1", "ends in 's': end with 't'"]),
        ("pat", (0.75 + 0 + 1 + 1) / 4, ["too short (3 letters): add 1", "missing 'r': add it"]),
        ("rest", (1 + 1 + 0 + 1) / 4, ["has 'e': remove it"]),
        ("ab1t", 0.75 * (1 + 0 + 1 + 1) / 4, ["use lowercase letters only", "missing 'r'"]),
        ("", 0.0, ["empty answer"]),
    ],
)
def test_graded_score_and_critique_names_each_violation(answer, score, phrases):
    j = judge_word(PROMPT, answer)
    assert j.score == pytest.approx(score)
    for phrase in phrases:
        assert phrase in j.critique
    assert "all constraints met" not in j.critique


def test_sample_answer_quality_controls_reward():
    task = get_task("word-constraints")
    rng = random.Random(0)
    prompts = task.sample_prompts(rng, 300)
    mean = lambda q: sum(task.judge(p, task.sample_answer(p, rng, q)).score for p in prompts) / len(prompts)
    assert mean(1.0) == 1.0
    lo, mid = mean(0.0), mean(0.5)
    assert lo < 0.3 < mid < 0.9
