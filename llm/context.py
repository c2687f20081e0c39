"""Teacher contexts: what the self-teacher reads before re-scoring a completion.

For completion ``i`` of a group the teacher sees the prompt, the rendered feedback on ``i`` and/or
the best successful sibling of ``i`` (a demonstration; never ``i`` itself), then the *same*
completion tokens. A completion with neither feedback nor a sibling has no teacher context and gets
no distillation loss (its mask is 0). Truncation only ever shortens the context, never the completion,
which is appended as token ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .recipe import ContextConfig


@dataclass
class TeacherContext:
    """The teacher context of one completion (``text`` is None when it gets no distillation loss)."""

    text: Optional[str]
    demo_index: Optional[int] = None  # index (in the batch) of the sibling shown as a demonstration
    used_feedback: bool = False

    @property
    def active(self) -> bool:
        return self.text is not None


def choose_demo(scores: Sequence[Optional[float]], index: int, group_size: int, threshold: float) -> Optional[int]:
    """Best successful sibling of ``index`` within its group, never ``index`` itself.

    ``scores[j]`` is None when the judge failed on ``j`` (never a demonstration). Successful means
    ``score ≥ threshold``; ties go to the lowest index. Returns None when no sibling qualifies.
    """
    start = (index // group_size) * group_size
    best, best_score = None, -float("inf")
    for j in range(start, start + group_size):
        s = scores[j]
        if j == index or s is None or s < threshold:
            continue
        if s > best_score:
            best, best_score = j, s
    return best


def build_contexts(
    prompts: Sequence[str],
    completions: Sequence[str],
    scores: Sequence[Optional[float]],
    feedback: Sequence[Optional[str]],
    group_size: int,
    spec: ContextConfig,
) -> list[TeacherContext]:
    """One :class:`TeacherContext` per completion (all lists have length ``B``; groups are consecutive)."""
    n = len(completions)
    if not (len(prompts) == len(scores) == len(feedback) == n):
        raise ValueError(f"prompts, completions, scores and feedback must have the same length, got "
                         f"{len(prompts)}, {n}, {len(scores)}, {len(feedback)}")
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive integer dividing the batch size {n}")
    contexts = []
    for i in range(n):
        demo = choose_demo(scores, i, group_size, spec.success_threshold) if spec.use_demo else None
        fb = feedback[i] if spec.use_feedback and feedback[i] and feedback[i].strip() else None
        if fb is not None and demo is not None and spec.feedback_only_without_demo:
            fb = None
        if demo is None and fb is None:
            contexts.append(TeacherContext(None))
            continue
        contexts.append(TeacherContext(
            render_reprompt(prompts[i], None if demo is None else completions[demo], fb, spec),
            demo_index=demo, used_feedback=fb is not None,
        ))
    return contexts


def render_reprompt(prompt: str, demo: Optional[str], feedback: Optional[str], spec: ContextConfig) -> str:
    """Fill the reprompt template: ``{prompt}{demo}{feedback}`` + instruction."""
    return spec.reprompt_template.format(
        prompt=prompt,
        demo="" if demo is None else spec.demo_template.format(demo=demo),
        feedback="" if feedback is None else spec.feedback_template.format(feedback=feedback),
    )


def format_prompt(tokenizer, text: str, messages: Sequence[Mapping] = (), chat_kwargs: Optional[Mapping] = None) -> str:
    """``text`` as the last user turn after ``messages`` (earlier turns of a conversation prompt), rendered with the
    tokenizer's chat template and ``chat_kwargs`` (e.g. ``enable_thinking=False``) if it has one; without a template,
    the turns' contents then ``text``, one per line."""
    if getattr(tokenizer, "chat_template", None):
        turns = [*messages, {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, **(chat_kwargs or {}))
    return "".join(f"{m['content']}\n" for m in messages) + text


THINKING = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def remove_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks (stripped), as TRL's SDPO does for demonstrations."""
    return THINKING.sub("", text).strip()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _keep_head(tokenizer, text: str, drop: int) -> str:
    ids = _ids(tokenizer, text)
    return tokenizer.decode(ids[: max(0, len(ids) - drop)], skip_special_tokens=False)


def _keep_tail(tokenizer, text: str, drop: int) -> str:
    ids = _ids(tokenizer, text)
    return tokenizer.decode(ids[min(len(ids), drop):], skip_special_tokens=False)


def prompt_ids(tokenizer, prompt: str, max_tokens: int, messages: Sequence[Mapping] = (), chat_kwargs: Optional[Mapping] = None) -> list[int]:
    """Student prompt token ids (chat-formatted when possible, see :func:`format_prompt`), left-truncated to ``max_tokens``."""
    return _ids(tokenizer, format_prompt(tokenizer, prompt, messages, chat_kwargs))[-max_tokens:]


def teacher_context_ids(
    tokenizer,
    prompt: str,
    demo: Optional[str],
    feedback: Optional[str],
    spec: ContextConfig,
    messages: Sequence[Mapping] = (),
    chat_kwargs: Optional[Mapping] = None,
) -> list[int]:
    """Token ids of the teacher context, at most ``spec.max_context_tokens`` long (``messages``: earlier turns of a
    conversation prompt, kept whole; the reprompt is the last user turn).

    When too long, the demonstration loses its end first (or goes entirely, template included, if
    nothing would be left), then the feedback likewise, then the prompt its beginning; a last
    left-truncation guarantees the budget. The completion is not part of this
    and is never cut.
    """
    budget = spec.max_context_tokens
    parts = {"demo": demo, "feedback": feedback, "prompt": prompt}
    for name in ("demo", "feedback", "prompt"):
        ids = _ids(tokenizer, format_prompt(tokenizer, render_reprompt(parts["prompt"], parts["demo"], parts["feedback"], spec), messages, chat_kwargs))
        excess = len(ids) - budget
        if excess <= 0:
            return ids
        if parts[name]:
            if name != "prompt" and excess >= len(_ids(tokenizer, parts[name])):
                parts[name] = None  # nothing would be left: drop the part with its template
            else:
                cut = _keep_tail if name == "prompt" else _keep_head
                parts[name] = cut(tokenizer, parts[name], excess)
    ids = _ids(tokenizer, format_prompt(tokenizer, render_reprompt(parts["prompt"], parts["demo"], parts["feedback"], spec), messages, chat_kwargs))
    return ids[-budget:]


def context_ids_for_batch(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    contexts: Sequence[TeacherContext],
    feedback: Sequence[Optional[str]],
    spec: ContextConfig,
    messages: Optional[Sequence[Sequence[Mapping]]] = None,
    chat_kwargs: Optional[Mapping] = None,
) -> list[Optional[list[int]]]:
    """Teacher context ids per completion (None for inactive contexts); ``messages[i]``: row ``i``'s earlier turns.
    With ``spec.remove_thinking_from_demonstration`` a demonstration loses its ``<think>`` blocks."""
    out: list[Optional[list[int]]] = []
    for i, ctx in enumerate(contexts):
        if not ctx.active:
            out.append(None)
            continue
        demo = None if ctx.demo_index is None else completions[ctx.demo_index]
        if demo is not None and spec.remove_thinking_from_demonstration:
            demo = remove_thinking(demo)
        out.append(teacher_context_ids(tokenizer, prompts[i], demo, feedback[i] if ctx.used_feedback else None, spec,
                                       () if messages is None else messages[i], chat_kwargs))
    return out
