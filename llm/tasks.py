"""Built-in open-ended text tasks: prompts plus a rule-based judge with a graded score and a critique.

``word-constraints``: "Write a 4-letter word with 'r', without 'e', ending in 't'." Any string is an
answer; the judge scores how well it meets the four constraints and its critique names each
violation with a hint at the fix. Small enough for a tiny character-level model to learn on CPU.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Optional

from .feedback import Judgement

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Task:
    """A task: its ``name``, a prompt sampler and a judge ``(prompt, completion) -> Judgement``.

    ``sample_answer(prompt, rng, quality)`` (optional) makes a synthetic answer in which each of the
    task's constraints holds with probability ``quality``; it is used only to pretrain tiny models
    (``llm.tiny_pretrain``), never by the trainer.
    """

    name: str
    sample_prompts: Callable[[random.Random, int], list[str]]
    judge: Callable[[str, str], Judgement]
    description: str = ""
    sample_answer: Optional[Callable[[str, random.Random, float], str]] = None


# ----------------------------------------------------------------------------- word-constraints
@dataclass(frozen=True)
class WordConstraints:
    """Constraints of one word-constraints prompt."""

    length: int
    required: str
    forbidden: str
    ending: str


_PROMPT = "Write a {length}-letter word with '{required}', without '{forbidden}', ending in '{ending}'.\n"
_PROMPT_RE = re.compile(
    r"Write a (\d+)-letter word with '([a-z])', without '([a-z])', ending in '([a-z])'\.\n?$"
)
MIN_LENGTH, MAX_LENGTH = 3, 6
# Each role draws its letter from its own set, so a letter's role can be read off the letter itself:
# this keeps the task learnable by a tiny character-level model in a few hundred CPU steps.
REQUIRED_LETTERS, FORBIDDEN_LETTERS, ENDING_LETTERS = "aeiou", "bcdfg", "lnrst"
FILLER_LETTERS = "".join(c for c in LETTERS if c not in REQUIRED_LETTERS + FORBIDDEN_LETTERS + ENDING_LETTERS)


def word_prompt(spec: WordConstraints) -> str:
    """The prompt text of a spec (ends with a newline; the answer follows it)."""
    return _PROMPT.format(**vars(spec))


def parse_word_prompt(prompt: str) -> WordConstraints:
    """Inverse of :func:`word_prompt`; ``ValueError`` if ``prompt`` is not a word-constraints prompt."""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"prompt {prompt[-120:]!r} is not a word-constraints prompt (expected {_PROMPT!r})")
    return WordConstraints(int(m.group(1)), m.group(2), m.group(3), m.group(4))


def sample_word_spec(rng: random.Random) -> WordConstraints:
    """Length 3–6, a required vowel, a forbidden letter from ``bcdfg`` and an ending from ``lnrst``."""
    length = rng.randint(MIN_LENGTH, MAX_LENGTH)
    return WordConstraints(length, rng.choice(REQUIRED_LETTERS), rng.choice(FORBIDDEN_LETTERS), rng.choice(ENDING_LETTERS))


def sample_word_prompts(rng: random.Random, n: int) -> list[str]:
    """``n`` word-constraints prompts drawn with ``rng``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    return [word_prompt(sample_word_spec(rng)) for _ in range(n)]


def judge_word(prompt: str, completion: str) -> Judgement:
    """Graded score in [0, 1] and a critique naming every violated constraint.

    ``score = letters · mean(length, required, forbidden, ending)`` where ``length = max(0, 1 − |L − n|/n)``,
    the three letter constraints are 0/1 and ``letters`` is the fraction of a–z characters in the
    answer (surrounding whitespace ignored; an empty answer scores 0).
    """
    spec = parse_word_prompt(prompt)
    word = completion.strip()
    if not word:
        return Judgement(0.0, f"empty answer: write {spec.length} letters ending in '{spec.ending}'")
    problems = []
    n_letters = sum(c in LETTERS for c in word)
    letters = n_letters / len(word)
    if letters < 1.0:
        problems.append("use lowercase letters only")
    length_ok = max(0.0, 1.0 - abs(len(word) - spec.length) / spec.length)
    if len(word) > spec.length:
        problems.append(f"too long ({len(word)} letters): drop {len(word) - spec.length}")
    elif len(word) < spec.length:
        problems.append(f"too short ({len(word)} letters): add {spec.length - len(word)}")
    has_required = spec.required in word
    if not has_required:
        problems.append(f"missing '{spec.required}': add it")
    lacks_forbidden = spec.forbidden not in word
    if not lacks_forbidden:
        problems.append(f"has '{spec.forbidden}': remove it")
    ends_ok = word.endswith(spec.ending)
    if not ends_ok:
        problems.append(f"ends in '{word[-1]}': end with '{spec.ending}'")
    score = letters * (length_ok + has_required + lacks_forbidden + ends_ok) / 4.0
    return Judgement(score, "; ".join(problems) if problems else "all constraints met")


def sample_word_answer(prompt: str, rng: random.Random, quality: float = 0.5) -> str:
    """A synthetic answer; each of the four constraints holds independently with probability ``quality``."""
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality={quality!r} must be in [0, 1]")
    spec = parse_word_prompt(prompt)
    ok = {k: rng.random() < quality for k in ("length", "required", "forbidden", "ending")}
    length = spec.length
    if not ok["length"]:
        length = rng.choice([n for n in (spec.length - 2, spec.length - 1, spec.length + 1, spec.length + 2) if 3 <= n <= 8])
    filler = FILLER_LETTERS
    word = [rng.choice(filler) for _ in range(length)]
    word[-1] = spec.ending if ok["ending"] else rng.choice(filler)
    inner = list(range(length - 1))
    rng.shuffle(inner)
    if ok["required"]:
        word[inner.pop()] = spec.required
    if not ok["forbidden"]:
        word[inner.pop()] = spec.forbidden
    return "".join(word)


WORD_CONSTRAINTS = Task(
    name="word-constraints",
    sample_prompts=sample_word_prompts,
    judge=judge_word,
    description="write a word of a given length with a required letter, without a forbidden one, with a given ending",
    sample_answer=sample_word_answer,
)

TASKS: dict[str, Task] = {WORD_CONSTRAINTS.name: WORD_CONSTRAINTS}


def get_task(name: str) -> Task:
    """The built-in task called ``name``; ``ValueError`` lists the valid names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
