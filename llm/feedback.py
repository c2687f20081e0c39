"""Open-ended feedback: judges return a ``Judgement``; renderers turn it into feedback text.

The four text kinds mirror the toy world's feedback channels (docs/design.md §3), with the noise
``ε ~ N(0, noise²)`` added to the score *before* quantisation:

- ``binary``:     ``1[score + ε > threshold]``          → ``"verdict: pass"`` / ``"verdict: fail"``
- ``ordinal``:    1–5 stars, equal-width bins of ``score + ε`` on [0, 1] → ``"rating: 3/5"``
- ``continuous``: ``score + ε``                          → ``"score: 0.62"``
- ``critique``:   the continuous score plus the judge's critique text → ``"score: 0.62; too long ..."``

(The toy world's fifth channel, ``demo`` — the best sibling — is built by the trainer's teacher
context, not by a judge.) A judge is any callable ``(prompt, completion) -> Judgement``;
:func:`llm.judges.load_judge` builds one from a task name, a local reward-model directory or ``"module:callable"``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

logger = logging.getLogger(__name__)

FEEDBACK_KINDS = ("binary", "ordinal", "continuous", "critique")
ORDINAL_LEVELS = 5


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one completion: ``score`` in [0, 1] and an optional critique text."""

    score: float
    critique: Optional[str] = None

    def __post_init__(self) -> None:
        s = self.score
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
            raise ValueError(f"Judgement.score={s!r} must be a finite number in [0, 1]")
        if self.critique is not None and not isinstance(self.critique, str):
            raise ValueError(f"Judgement.critique must be a string or None, got {type(self.critique).__name__}")


Judge = Callable[[str, str], Judgement]


def safe_judge(judge: Judge, prompt: str, completion: str) -> Optional[Judgement]:
    """Call ``judge``; on any exception (or a bad return value) log it with the sample and return ``None``.

    ``None`` means: this sample gets no feedback (no distillation target from it); training goes on.
    A plain number in [0, 1] returned by the judge is accepted as ``Judgement(score)``.
    """
    try:
        out = judge(prompt, completion)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            out = Judgement(float(out))
        if not isinstance(out, Judgement):
            raise TypeError(f"judge returned {type(out).__name__}, expected Judgement")
        return out
    except Exception as err:  # noqa: BLE001 — any judge failure costs only this sample its feedback
        logger.warning("judge %r failed on prompt=%r completion=%r: %s: %s",
                       getattr(judge, "__name__", judge), prompt[:200], completion[:200], type(err).__name__, err)
        return None


def noisy_score(score: float, noise: float = 0.0, rng: Optional[random.Random] = None) -> float:
    """``score + ε``, ``ε ~ N(0, noise²)`` (unclipped, as the toy world's channels)."""
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise={noise!r} must be a finite number >= 0")
    if noise == 0:
        return float(score)
    if rng is None:
        raise ValueError("rng must be a random.Random when noise > 0 (feedback noise must be reproducible)")
    return float(score) + rng.gauss(0.0, float(noise))


def ordinal_stars(value: float, levels: int = ORDINAL_LEVELS) -> int:
    """Stars 1..levels from equal-width bins of ``value`` on [0, 1] (values outside clip to the ends)."""
    return int(min(levels, max(1, math.floor(value * levels) + 1)))


def render_feedback(
    judgement: Judgement,
    kind: str,
    *,
    noise: float = 0.0,
    rng: Optional[random.Random] = None,
    threshold: float = 0.5,
) -> str:
    """Feedback text of one ``kind`` (``binary | ordinal | continuous | critique``) for a judgement.

    Noise is added to the score before quantisation; ``threshold`` is the binary channel's τ.
    A ``critique`` without critique text from the judge renders as the continuous score alone.
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"kind={kind!r} is not a feedback kind; choose one of {', '.join(map(repr, FEEDBACK_KINDS))}")
    if not isinstance(judgement, Judgement):
        raise ValueError(f"judgement must be a Judgement, got {type(judgement).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r} must be a finite number")
    value = noisy_score(judgement.score, noise, rng)
    if kind == "binary":
        return "verdict: pass" if value > threshold else "verdict: fail"
    if kind == "ordinal":
        return f"rating: {ordinal_stars(value)}/{ORDINAL_LEVELS}"
    text = f"score: {value:.2f}"
    if kind == "critique" and judgement.critique:
        text += f"; {judgement.critique}"
    return text
