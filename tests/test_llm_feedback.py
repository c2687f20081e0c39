"""Judges and feedback rendering: the toy world's channel semantics, in text."""

from __future__ import annotations

import logging
import random

import pytest

from llm.feedback import FEEDBACK_KINDS, Judgement, render_feedback, safe_judge
from llm.judges import RewardModelJudge, load_judge
from llm.tasks import WordConstraints, judge_word, word_prompt

PROMPT = word_prompt(WordConstraints(length=4, required="r", forbidden="e", ending="t"))


def test_judgement_validates_score():
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="score"):
            Judgement(bad)
    assert Judgement(1).score == 1


def test_render_kinds_without_noise():
    j = Judgement(0.62, "missing 'r': add it")
    assert render_feedback(j, "binary") == "verdict: pass"
    assert render_feedback(j, "binary", threshold=0.7) == "verdict: fail"
    assert render_feedback(j, "ordinal") == "rating: 4/5"  # [0.6, 0.8) is the 4th of 5 equal bins
    assert render_feedback(j, "continuous") == "score: 0.62"
    assert render_feedback(j, "critique") == "score: 0.62; missing 'r': add it"
    assert render_feedback(Judgement(0.62), "critique") == "score: 0.62"
    assert render_feedback(Judgement(0.0), "ordinal") == "rating: 1/5"
    assert render_feedback(Judgement(1.0), "ordinal") == "rating: 5/5"


def test_unknown_kind_lists_allowed():
    with pytest.raises(ValueError) as err:
        render_feedback(Judgement(0.5), "demo")
    for kind in FEEDBACK_KINDS:
        assert kind in str(err.value)


def test_noise_is_added_before_quantisation():
    j = Judgement(0.55)
    rng = random.Random(0)
    verdicts = [render_feedback(j, "binary", noise=0.3, rng=rng) for _ in range(2000)]
    frac_pass = verdicts.count("verdict: pass") / len(verdicts)
    # P(0.55 + ε > 0.5) with ε ~ N(0, 0.3²) = Φ(0.05/0.3) ≈ 0.566: noise flips verdicts, it is not applied after.
    assert 0.52 < frac_pass < 0.61
    stars = {render_feedback(j, "ordinal", noise=0.3, rng=rng) for _ in range(500)}
    assert len(stars) >= 4
    scores = [float(render_feedback(j, "continuous", noise=0.1, rng=rng).split()[1]) for _ in range(2000)]
    mean = sum(scores) / len(scores)
    sd = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    assert abs(mean - 0.55) < 0.01 and 0.09 < sd < 0.11
    a = [render_feedback(j, "continuous", noise=0.1, rng=random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]  # reproducible from the rng
    with pytest.raises(ValueError, match="rng"):
        render_feedback(j, "continuous", noise=0.1)
    with pytest.raises(ValueError, match="noise"):
        render_feedback(j, "continuous", noise=-1.0, rng=rng)


def test_safe_judge_logs_and_returns_none(caplog):
    def broken(prompt, completion):
        raise RuntimeError("judge exploded")

    with caplog.at_level(logging.WARNING, logger="llm.feedback"):
        assert safe_judge(broken, "the prompt", "the completion") is None
    assert "judge exploded" in caplog.text and "the completion" in caplog.text
    assert safe_judge(lambda p, c: 0.25, "p", "c") == Judgement(0.25)
    assert safe_judge(lambda p, c: 7.0, "p", "c") is None  # out-of-range score: no feedback
    assert safe_judge(lambda p, c: "good", "p", "c") is None
    assert safe_judge(judge_word, PROMPT, "part") == Judgement(1.0, "all constraints met")


def my_judge(prompt: str, completion: str) -> Judgement:
    return Judgement(1.0 if completion == prompt else 0.0)


def test_load_judge_by_task_module_and_callable():
    assert load_judge("word-constraints") is judge_word
    j = load_judge("tests.test_llm_feedback:my_judge")
    assert j("a", "a").score == 1.0 and j("a", "b").score == 0.0
    assert load_judge(my_judge) is my_judge
    with pytest.raises(ValueError, match="word-constraints"):
        load_judge("no-such-task")
    with pytest.raises(ValueError, match="cannot import"):
        load_judge("tests.test_llm_feedback:nothing_here")
    with pytest.raises(ValueError, match="no reward-model directory"):
        load_judge("./missing/model")


def test_reward_model_judge_from_local_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    from llm.tiny import build_tiny_reward_model

    path = build_tiny_reward_model(tmp_path / "rm", seed=1)
    judge = load_judge(str(path))
    assert isinstance(judge, RewardModelJudge)
    scores = [judge(PROMPT, c).score for c in ("part", "zzzzzzzz", "e")]
    assert all(0.0 < s < 1.0 for s in scores)
    assert len(set(scores)) == 3  # the model reads the text
    assert judge(PROMPT, "part") == judge(PROMPT, "part")
    two = build_tiny_reward_model(tmp_path / "rm2", num_labels=2, seed=1)
    assert 0.0 < load_judge(str(two))(PROMPT, "part").score < 1.0
