"""Two reward functions for the "bring your own data" example, in the convention of ``llm.rewards`` (TRL's).

The trainer calls each function once per batch of N items, by keyword::

    constraints(prompts=[...N], completions=[...N], length=[...N], required=[...N], forbidden=[...N],
                ending=[...N])

``prompts``: the prompt texts (for a conversation prompt, its last user message); ``completions``: the decoded
completions; every other dataset column (here ``length``, ``required``, ``forbidden``, ``ending``) arrives as a
keyword argument with one value per item. ``**kwargs`` takes the columns a function does not name (a function
without it receives only the columns it names). The ``privileged_context`` column is not passed: it is the
teacher's. A function returns one value per item: a number in [0, 1], a ``Judgement(score, critique)`` (the
critique is rendered into the teacher's feedback with ``task.feedback: critique``), or None when it cannot score
that item (the item is then scored by the other functions alone; by none, it is unscored and gets no feedback).
A value outside [0, 1], NaN, a wrong type or an exception fails only that item (counted in ``reward_failures``).

Use them in a recipe as ``examples/byod/rewards.py:constraints`` and ``examples/byod/rewards.py:brevity``.
"""

from __future__ import annotations

import string
from typing import Optional, Sequence

from llm.feedback import Judgement

LETTERS = frozenset(string.ascii_lowercase)


def constraints(prompts: Sequence[str], completions: Sequence[str], length: Sequence[Optional[int]],
                required: Sequence[Optional[str]], forbidden: Sequence[Optional[str]], ending: Sequence[Optional[str]],
                **kwargs) -> list[Optional[Judgement]]:
    """How well each completion (surrounding whitespace stripped) meets its row's four constraints, with a critique
    naming every violated one.

    ``score = letters · (length_ok + has_required + lacks_forbidden + ends_ok) / 4`` where ``letters`` is the
    fraction of a–z characters in the answer, ``length_ok = max(0, 1 − |L − length| / length)`` (L characters) and
    the three letter constraints are 0 or 1; an empty answer scores 0. None for a row whose constraint columns are
    missing (null), or whose length is not a positive integer. The critique uses the built-in task's wording (what
    the tiny model was pretrained to act on), e.g. ``"too long (5 letters): drop 1; missing 'a': add it"``.
    """
    out: list[Optional[Judgement]] = []
    for completion, n, req, forb, end in zip(completions, length, required, forbidden, ending):
        if n is None or req is None or forb is None or end is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            out.append(None)  # nothing to check this answer against
            continue
        word = completion.strip()
        if not word:
            out.append(Judgement(0.0, f"empty answer: write {n} letters ending in '{end}'"))
            continue
        problems = []
        letters = sum(c in LETTERS for c in word) / len(word)
        if letters < 1.0:
            problems.append("use lowercase letters only")
        if len(word) > n:
            problems.append(f"too long ({len(word)} letters): drop {len(word) - n}")
        elif len(word) < n:
            problems.append(f"too short ({len(word)} letters): add {n - len(word)}")
        has_required = req in word
        if not has_required:
            problems.append(f"missing '{req}': add it")
        lacks_forbidden = forb not in word
        if not lacks_forbidden:
            problems.append(f"has '{forb}': remove it")
        ends_ok = word.endswith(end)
        if not ends_ok:
            problems.append(f"ends in '{word[-1]}': end with '{end}'")
        length_ok = max(0.0, 1.0 - abs(len(word) - n) / n)
        score = letters * (length_ok + has_required + lacks_forbidden + ends_ok) / 4.0
        out.append(Judgement(score, "; ".join(problems) if problems else "all constraints met"))
    return out


def brevity(prompts: Sequence[str], completions: Sequence[str], length: Sequence[Optional[int]],
            **kwargs) -> list[Optional[float]]:
    """``min(1, length / L)`` for an answer of L characters (whitespace stripped): 1 up to the asked length, less the
    longer it runs past it. None for an empty answer (``constraints`` already gives it 0) or a row without a positive
    integer length. A plain number, so it adds to the score but nothing to the critique."""
    out: list[Optional[float]] = []
    for completion, n in zip(completions, length):
        word = completion.strip()
        if not word or n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            out.append(None)
            continue
        out.append(min(1.0, n / len(word)))
    return out
