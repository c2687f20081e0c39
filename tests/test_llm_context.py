"""Teacher contexts: sibling choice (best, never itself), masking, truncation that never cuts the completion."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from llm.context import (
    TeacherContext,
    build_contexts,
    choose_demo,
    context_ids_for_batch,
    format_prompt,
    remove_thinking,
    teacher_context_ids,
)
from llm.recipe import ContextConfig
from llm.tiny import build_char_tokenizer
from llm.batch import pack_rows


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_best_successful_sibling_never_itself():
    scores = [0.9, 0.95, 0.2, None, 0.99, 0.1, 0.1, 0.1]  # two groups of 4
    assert choose_demo(scores, 0, 4, 0.8) == 1  # best sibling
    assert choose_demo(scores, 1, 4, 0.8) == 0  # the best completion gets the next best, never itself
    assert choose_demo(scores, 2, 4, 0.8) == 1
    assert choose_demo(scores, 3, 4, 0.8) == 1  # a failed judge does not stop it receiving a demo
    assert choose_demo(scores, 4, 4, 0.8) is None  # only itself succeeded
    assert choose_demo(scores, 5, 4, 0.8) == 4  # groups do not mix
    assert choose_demo([0.9, 0.9, 0.9], 2, 3, 0.5) == 0  # ties: lowest index
    assert choose_demo([None, 0.9], 1, 2, 0.5) is None  # a failed judge is never a demo


def test_masking_feedback_and_demo_flags():
    spec = ContextConfig(success_threshold=0.8)
    prompts = ["p"] * 4
    comps = ["a", "b", "c", "d"]
    scores = [0.9, 0.1, None, 0.2]
    feedback = ["fb-a", "fb-b", None, None]
    ctx = build_contexts(prompts, comps, scores, feedback, 2, spec)
    assert [c.active for c in ctx] == [True, True, False, False]  # completions 2, 3: no feedback, no successful sibling
    assert ctx[0].demo_index is None and ctx[0].used_feedback  # its only sibling failed
    assert ctx[1].demo_index == 0 and "a" in ctx[1].text and "fb-b" in ctx[1].text
    only_demo = build_contexts(prompts, comps, scores, feedback, 2, ContextConfig(success_threshold=0.8, feedback_only_without_demo=True))
    assert only_demo[1].demo_index == 0 and not only_demo[1].used_feedback and "fb-b" not in only_demo[1].text
    no_fb = build_contexts(prompts, comps, scores, feedback, 2, ContextConfig(success_threshold=0.8, use_feedback=False))
    assert [c.active for c in no_fb] == [False, True, False, False]
    with pytest.raises(ValueError, match="group_size"):
        build_contexts(prompts, comps, scores, feedback, 3, spec)


def test_truncation_respects_budget_and_never_cuts_the_completion(tok):
    spec = ContextConfig(max_context_tokens=150)
    prompt = "Write a 5-letter word with 'a', without 'f', ending in 'r'.\n"
    demo = "x" * 200
    feedback = "score: 0.20; " + "missing letter 'a'; " * 10
    ids = teacher_context_ids(tok, prompt, demo, feedback, spec)
    assert len(ids) <= 150
    text = tok.decode(ids)
    assert text.startswith(prompt)  # the demonstration went first; the prompt is whole
    assert text.endswith("Correctly solve the original task.\n")  # the instruction right before the completion stays
    assert "A correct solution" not in text and "score: 0.20; miss" in text  # demo dropped, feedback cut at its end
    tiny = teacher_context_ids(tok, prompt, demo, feedback, ContextConfig(max_context_tokens=20))
    assert len(tiny) == 20 and tok.decode(tiny).endswith("original task.\n")  # last resort: keep the end
    short = teacher_context_ids(tok, prompt, "abcde", None, ContextConfig(max_context_tokens=500))
    assert tok.decode(short) == spec.reprompt_template.format(prompt=prompt, demo=spec.demo_template.format(demo="abcde"), feedback="")
    completion = tok("leverage", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows, mask = pack_rows([ids, short], [completion, completion[:3]], tok.pad_token_id, "cpu")
    width = max(len(ids), len(short))
    assert rows[0, width:].tolist() == completion  # the completion follows the context whole
    assert rows[1, width:width + 3].tolist() == completion[:3] and mask[1, width + 3:].sum() == 0
    assert mask[1, :width - len(short)].sum() == 0  # left padding is masked


def test_batch_ids_follow_contexts(tok):
    spec = ContextConfig(success_threshold=0.5, max_context_tokens=80)
    ctx = build_contexts(["p:"] * 2, ["good", "bad"], [0.9, 0.1], [None, None], 2, spec)
    ids = context_ids_for_batch(tok, ["p:"] * 2, ["good", "bad"], ctx, [None, None], spec)
    assert ids[0] is None and "good" in tok.decode(ids[1]) and "bad" not in tok.decode(ids[1])


def test_chat_template_kwargs_reach_the_template_and_conversation_turns_come_first():
    class Tok:  # a tokenizer's chat-template interface, rendered with transformers' own Jinja renderer
        chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}<assistant>")

        def apply_chat_template(self, turns, tokenize, add_generation_prompt, **kwargs):
            return render_jinja_template([turns], chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, **kwargs)[0][0]

    tok = Tok()
    system = [{"role": "system", "content": "be brief"}]
    assert format_prompt(tok, "hi", system) == "<system>be brief<user>hi<assistant>"
    assert format_prompt(tok, "hi", system, {"enable_thinking": False}) == "<system>be brief<user>hi<nothink><assistant>"
    assert format_prompt(build_char_tokenizer(), "hi", system) == "be brief\nhi"  # no template: the turns, one per line


def test_thinking_blocks_are_removed_from_a_demonstration_only_when_asked():
    assert remove_thinking("<think>a\nb</think> answer <think>c</think>") == "answer"
    tok = build_char_tokenizer()
    completions = ["<think>long</think>salt", "mine"]
    ctx = [TeacherContext("x", demo_index=None), TeacherContext("x", demo_index=0)]
    for remove in (False, True):
        spec = ContextConfig(remove_thinking_from_demonstration=remove, max_context_tokens=500)
        ids = context_ids_for_batch(tok, ["p", "p"], completions, ctx, [None, None], spec)
        assert ("<think>" in tok.decode(ids[1])) is not remove and "salt" in tok.decode(ids[1])
