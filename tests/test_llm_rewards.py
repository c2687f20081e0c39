"""Reward functions as plain callables (TRL's convention), several at once with weights, and the LLM judge."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch

from llm.feedback import Judgement
from llm.judges import LLMJudge, RewardModelJudge, parse_judgement, template_fields
from llm.rewards import RewardBatch, RewardFunctions
from llm.tasks import WordConstraints, judge_word, word_prompt
from llm.tiny import build_tiny_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = word_prompt(WordConstraints(length=4, required="r", forbidden="e", ending="t"))
EPS64 = 2.0 ** -52  # float64 machine epsilon


def length_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1 for a 4-character completion, falling by 1/4 per character off."""
    return [max(0.0, 1.0 - abs(len(c) - 4) / 4) for c in completions]


def needs_reference(prompts, completions, reference, bonus=0.0):
    return [float(c == r) for c, r in zip(completions, reference)]


# ----------------------------------------------------------------------------- combination
def test_two_weighted_functions_hand_computed():
    def terse(prompts, completions):
        return [Judgement(0.2, "too long") for _ in completions]

    def picky(prompts, completions, **columns):
        return [Judgement(0.8, "missing 'r'"), None, 0.5]

    rf = RewardFunctions([terse, picky], [1.0, 3.0])
    assert rf.names == ["terse", "picky"]
    out = rf(["p"] * 3, ["a", "b", "c"])
    assert isinstance(out, RewardBatch) and out.failures == 0 and out.unscored == 0
    # item 0: (1·0.2 + 3·0.8) / (1 + 3) = 2.6 / 4 = 0.65; item 1: only terse scored it → 0.2 (weights present only);
    # item 2: (0.2 + 3·0.5) / 4 = 0.425. Three float64 operations, each within half an ulp: 4·eps is ample.
    assert out.judgements[0].score == pytest.approx(0.65, abs=4 * EPS64)
    assert out.judgements[0].critique == "too long; missing 'r'"
    assert out.judgements[1] == Judgement(0.2, "too long")
    assert out.judgements[2].score == pytest.approx(0.425, abs=4 * EPS64)
    assert out.judgements[2].critique == "too long"
    assert out.per_function["terse"] == pytest.approx(0.2, abs=4 * EPS64)
    assert out.per_function["picky"] == pytest.approx((0.8 + 0.5) / 2, abs=4 * EPS64)
    assert out.scored == {"terse": 3, "picky": 2}


def test_none_means_unscored():
    def abstains(prompts, completions):
        return [None if c == "skip" else 1.0 for c in completions]

    def never(prompts, completions):
        return [None] * len(completions)

    out = RewardFunctions([abstains, never])(["p", "p", "p"], ["skip", "x", "skip"])
    assert out.judgements == [None, Judgement(1.0), None]
    assert out.unscored == 2 and out.failures == 0
    assert out.per_function["abstains"] == 1.0 and math.isnan(out.per_function["never"])
    assert out.scored == {"abstains": 1, "never": 0}


def test_from_judge_wraps_a_per_item_judge_and_isolates_its_failures(caplog):
    rf = RewardFunctions.from_judge(judge_word, "word")
    assert rf.names == ["word"]
    out = rf([PROMPT, PROMPT, "not a word prompt"], ["part", "zzzzzzzz", "x"])
    assert out.judgements[:2] == [judge_word(PROMPT, "part"), judge_word(PROMPT, "zzzzzzzz")]
    assert out.judgements[2] is None and out.failures == 1 and out.unscored == 1
    assert "item 2" in caplog.text and "not a word-constraints prompt" in caplog.text


# ----------------------------------------------------------------------------- failures
def test_raising_on_one_item_keeps_the_others(caplog):
    calls = []

    def fragile(prompts, completions):
        calls.append(len(completions))
        if "boom" in completions:
            raise RuntimeError("cannot score boom")
        return [0.5] * len(completions)

    with caplog.at_level(logging.WARNING, logger="llm.rewards"):
        out = RewardFunctions([fragile, length_reward])(["p"] * 3, ["abcd", "boom", "ab"])
    assert calls == [3, 1, 1, 1]  # the batch, then item by item
    assert out.failures == 1 and out.unscored == 0
    assert out.judgements[0].score == pytest.approx((0.5 + 1.0) / 2, abs=4 * EPS64)
    assert out.judgements[1] == Judgement(1.0)  # only length_reward scored "boom" (4 letters)
    assert out.judgements[2].score == pytest.approx((0.5 + 0.5) / 2, abs=4 * EPS64)
    item_lines = [r.getMessage() for r in caplog.records if "raised on item" in r.getMessage()]
    assert item_lines == ["reward function 'fragile' raised on item 1: RuntimeError: cannot score boom"]


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "not a finite number"),
    (float("inf"), "not a finite number"),
    (7.0, "outside [0, 1]: rescale"),
    (-0.1, "outside [0, 1]: rescale"),
    ("good", "returned a str"),
    (True, "returned a bool"),
])
def test_bad_values_fail_only_their_item(bad, message, caplog):
    def sometimes_bad(prompts, completions):
        return [0.25, bad, 1]

    with caplog.at_level(logging.WARNING, logger="llm.rewards"):
        out = RewardFunctions([sometimes_bad])(["p"] * 3, ["a", "b", "c"])
    assert out.judgements == [Judgement(0.25), None, Judgement(1.0)]
    assert out.failures == 1 and out.unscored == 1 and out.per_function["sometimes_bad"] == pytest.approx(0.625)
    assert message in caplog.text and "'sometimes_bad'" in caplog.text and "item 1" in caplog.text


def test_numpy_and_tensor_values_are_numbers():
    np = pytest.importorskip("numpy")
    out = RewardFunctions([lambda prompts, completions: [np.float32(0.5), torch.tensor(0.25)]])(["p", "p"], ["a", "b"])
    assert [j.score for j in out.judgements] == [0.5, 0.25]  # both exact in float32
    assert RewardFunctions([lambda prompts, completions: torch.tensor([0.5, 1.0])])(["p"] * 2, ["a", "b"]).failures == 0


def test_wrong_count_fails_every_item(caplog):
    def short(prompts, completions):
        return [1.0]

    with caplog.at_level(logging.WARNING, logger="llm.rewards"):
        out = RewardFunctions([short, length_reward])(["p"] * 3, ["abcd", "abcd", "abcd"])
    assert out.failures == 3 and out.unscored == 0
    assert all(j == Judgement(1.0) for j in out.judgements)  # length_reward alone
    assert math.isnan(out.per_function["short"])
    assert "'short'" in caplog.text and "returned 1 values for 3 items" in caplog.text
    out = RewardFunctions([lambda prompts, completions: 0.5])(["p"], ["a"])
    assert out.failures == 1 and out.unscored == 1


def test_timeout_fails_the_call_and_does_not_wait(caplog):
    release = threading.Event()

    def slow(prompts, completions):
        release.wait(10.0)  # "sleeps" until the test releases it (10 s only if the test itself breaks)
        return [1.0] * len(completions)

    rf = RewardFunctions([slow, length_reward], timeout_s=0.2)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="llm.rewards"):
        out = rf(["p", "p"], ["abcd", "ab"])
        assert out.failures == 2 and [j.score for j in out.judgements] == [1.0, 0.5]
        assert "timeout_s=0.2" in caplog.text
        again = rf(["p"], ["abcd"])  # the stuck call still runs: not called again, its items fail at once
    assert time.perf_counter() - t0 < 2.0  # 0.2 s of waiting, plus thread start-up
    assert again.failures == 1 and "still running" in caplog.text
    release.set()
    deadline = time.perf_counter() + 5.0
    while rf._stuck[0] is not None and not rf._stuck[0].done() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert rf(["p"], ["abcd"]).failures == 0  # returned: called again


def test_no_timeout_runs_in_the_callers_thread():
    seen = []
    RewardFunctions([lambda prompts, completions: seen.append(threading.current_thread()) or [1.0]],
                    timeout_s=None)(["p"], ["a"])
    assert seen == [threading.current_thread()]


# ----------------------------------------------------------------------------- columns
def test_columns_are_passed_and_checked():
    rf = RewardFunctions([needs_reference, length_reward])
    rf.check_columns(["reference", "other"], "data.jsonl")
    out = rf(["p", "p"], ["cat", "dog"], {"reference": ["cat", "cow"], "other": [1, 2]})
    # needs_reference takes no **kwargs: it receives only the columns it names (no TypeError for "other")
    assert out.failures == 0 and out.per_function["needs_reference"] == 0.5
    with pytest.raises(ValueError) as err:
        rf.check_columns(["prompt", "answer"], "data/train.jsonl")
    msg = str(err.value)
    assert "'needs_reference'" in msg and "'reference'" in msg and "data/train.jsonl" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="positional-only parameter 'p'"):
        RewardFunctions([lambda p, c, /: [1.0]]).check_columns([], "x")
    with pytest.raises(ValueError, match="needs column 'p'"):  # not named prompts/completions: not passed
        RewardFunctions([lambda p, c: [1.0]]).check_columns([], "x")
    with pytest.raises(ValueError, match="column 'reference' has 1 values for 2 items"):
        rf(["p", "p"], ["a", "b"], {"reference": ["a"]})


def test_bad_construction():
    with pytest.raises(ValueError, match="non-empty list"):
        RewardFunctions([])
    with pytest.raises(ValueError, match=r"funcs\[1\]"):
        RewardFunctions([length_reward, 3])
    with pytest.raises(ValueError, match="one per function"):
        RewardFunctions([length_reward], [1.0, 2.0])
    for w in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"weights\[0\]"):
            RewardFunctions([length_reward], [w])
    with pytest.raises(ValueError, match="unique"):
        RewardFunctions([length_reward, needs_reference], names=["a", "a"])
    assert RewardFunctions([length_reward, length_reward]).names == ["length_reward", "length_reward_2"]
    with pytest.raises(ValueError, match="timeout_s"):
        RewardFunctions([length_reward], timeout_s=0)


# ----------------------------------------------------------------------------- specs
def test_spec_module_function():
    rf = RewardFunctions.from_specs(["tests.test_llm_rewards:length_reward"])
    assert rf.names == ["length_reward"] and rf.funcs[0].__module__ == "tests.test_llm_rewards"
    assert rf(["p"], ["abc"]).judgements == [Judgement(0.75)]


def test_spec_python_file(tmp_path):
    file = tmp_path / "my rewards.py"
    file.write_text("def has_t(prompts, completions, **kw):\n    return [float('t' in c) for c in completions]\n")
    rf = RewardFunctions.from_specs([f"{file}:has_t", "tests.test_llm_rewards:length_reward"], [2.0, 1.0])
    assert rf.names == ["has_t", "length_reward"]
    out = rf(["p", "p"], ["part", "pa"])
    # (2·1 + 1·1)/3 = 1 and (2·0 + 1·0.5)/3 = 1/6
    assert out.judgements[0].score == pytest.approx(1.0, abs=4 * EPS64)
    assert out.judgements[1].score == pytest.approx(1 / 6, abs=4 * EPS64)
    assert RewardFunctions.from_specs([f"{file}:has_t"]).funcs[0] is rf.funcs[0]  # the file is loaded once


@pytest.mark.parametrize("spec, message", [
    ("no-such-thing", "not understood"),
    ("./missing/model", "looks like a path"),
    ("tests.test_llm_rewards:nothing_here", "has no attribute 'nothing_here'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("tests.test_llm_rewards:PROMPT", "not callable"),
    ("/nonexistent/rewards.py:f", "does not exist"),
    ("", "non-empty string"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError) as err:
        RewardFunctions.from_specs([spec])
    msg = str(err.value)
    assert message in msg and "\n" not in msg
    if message in ("not understood", "looks like a path"):
        assert repr(spec) in msg and "module:function" in msg and "causal-LM directory" in msg


def test_directory_spec_needs_a_known_architecture(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        RewardFunctions.from_specs([str(tmp_path / "empty")])
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ValueError, match="neither a sequence-classification reward model nor a causal LM"):
        RewardFunctions.from_specs([str(tmp_path / "odd")])


def test_reward_model_directory_is_batched(tmp_path):
    path = build_tiny_reward_model(tmp_path / "rm", seed=1)
    rf = RewardFunctions.from_specs([str(path)])
    assert rf.names == ["rm"]
    completions = ["part", "zzzzzzzz", "e"]  # different lengths: the batch is right-padded
    out = rf([PROMPT] * 3, completions)
    assert out.failures == 0 and out.unscored == 0
    single = RewardModelJudge(path)
    # The batch reads each score at its own last real token; with padding only the reductions' blocking may differ, a
    # few float32 ulps of a logit of size ~1 (sigmoid' ≤ 1/4 shrinks it); reading a pad position instead moves it ≫.
    for j, c in zip(out.judgements, completions):
        assert j.score == pytest.approx(single(PROMPT, c).score, abs=64 * torch.finfo(torch.float32).eps)
    assert len({j.score for j in out.judgements}) == 3


# ----------------------------------------------------------------------------- LLM judge
@pytest.mark.parametrize("text, score, critique", [
    ("score: 0.7", 0.7, None),
    ("Score: 7/10\ncritique: too long, drop a letter", 0.7, "too long, drop a letter"),
    ("SCORE=1", 1.0, None),
    ("critique: missing 'r'. score: 3 / 10", 0.3, "missing 'r'"),
    ("The answer ends wrong. Score: .25", 0.25, "The answer ends wrong"),
    ("score: 4/5 good", 0.8, "good"),
    ("score: 0", 0.0, None),
])
def test_parse_judgement(text, score, critique):
    got = parse_judgement(text)
    assert got is not None
    assert got.score == pytest.approx(score, abs=EPS64) and got.critique == critique


@pytest.mark.parametrize("text", ["", "looks fine", "score: 7", "score: 12/10", "score: -0.2", "score: 3/0",
                                  "scored well", "score: high"])
def test_parse_judgement_unparseable(text):
    assert parse_judgement(text) is None


def test_template_fields():
    assert template_fields("{prompt} {completion!r} {reference:>5} {{literal}}") == ["prompt", "completion", "reference"]
    for bad in ("{} {prompt}", "{0}", "{a.b}", "{prompt"):
        with pytest.raises(ValueError, match="template"):
            template_fields(bad)


def test_llm_judge_on_the_tiny_model(tiny_dir, caplog):
    template = "Task: {prompt}Answer: {completion}\nReference: {reference}\nscore:"
    with pytest.raises(ValueError, match="lacks {completion}"):
        LLMJudge(tiny_dir, "Task: {prompt}")
    judge = LLMJudge(tiny_dir, template, max_new_tokens=8)
    assert judge.required_columns == ("reference",)
    generate_calls = []
    generate = judge.model.generate
    judge.model.generate = lambda **kw: generate_calls.append(kw["input_ids"].shape) or generate(**kw)
    prompts, completions = [PROMPT] * 3, ["part", "zzzzzzzzzz", "e"]
    with caplog.at_level(logging.WARNING, logger="llm.judges"):
        out = judge(prompts, completions, reference=["pant", "pant", "pant"])
    assert len(generate_calls) == 1 and generate_calls[0][0] == 3  # one call for the batch
    assert len(judge.last_outputs) == 3 and all(isinstance(o, str) for o in judge.last_outputs)
    # A random character-level model: its 8 greedy characters are (almost surely) no "score: X"; whatever they are,
    # the counts must match what the parser makes of them.
    parsed = [parse_judgement(o) for o in judge.last_outputs]
    assert out == parsed
    assert judge.last_unparseable == sum(p is None for p in parsed) == judge.unparseable
    assert judge.last_unparseable >= 1
    assert f"{judge.last_unparseable} of 3 outputs" in caplog.text
    first = list(judge.last_outputs)
    judge(prompts, completions, reference=["pant"] * 3)
    assert judge.last_outputs == first  # greedy: deterministic
    assert judge.unparseable == 2 * judge.last_unparseable

    rf = RewardFunctions([judge], names=["judge"])
    with pytest.raises(ValueError, match="needs column 'reference'"):
        rf.check_columns(["prompt"], "train.jsonl")
    batch = rf(prompts, completions, {"reference": ["pant"] * 3})
    assert batch.unscored == judge.last_unparseable and batch.failures == 0


def test_llm_judge_from_spec(tiny_dir):
    rf = RewardFunctions.from_specs([str(tiny_dir), "tests.test_llm_rewards:length_reward"], judge_max_new_tokens=4)
    judge = rf.funcs[0]
    assert isinstance(judge, LLMJudge) and judge.max_new_tokens == 4 and judge.required_columns == ()
    out = rf([PROMPT, PROMPT], ["part", "pa"])
    assert out.unscored == 0 and out.failures == 0  # length_reward scores every item
    assert judge.last_unparseable == sum(parse_judgement(o) is None for o in judge.last_outputs)
