"""Open-ended feedback: judges return a ``Judgement``; renderers turn it into feedback text.

The four text kinds mirror the toy world's feedback channels (DESIGN.md §3), with the noise
``ε ~ N(0, noise²)`` added to the score *before* quantisation:

- ``binary``:     ``1[score + ε > threshold]``          → ``"verdict: pass"`` / ``"verdict: fail"``
- ``ordinal``:    1–5 stars, equal-width bins of ``score + ε`` on [0, 1] → ``"rating: 3/5"``
- ``continuous``: ``score + ε``                          → ``"score: 0.62"``
- ``critique``:   the continuous score plus the judge's critique text → ``"score: 0.62; too long ..."``

(The toy world's fifth channel, ``demo`` — the best sibling — is built by the trainer's teacher
context, not by a judge.) A judge is any callable ``(prompt, completion) -> Judgement``;
:func:`load_judge` builds one from a task name, a local reward-model directory or ``"module:callable"``.
"""

from __future__ import annotations

import importlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

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


# ----------------------------------------------------------------------------- judges
class RewardModelJudge:
    """A sequence-classification reward model from a LOCAL directory; score squashed into [0, 1].

    One logit: ``score = sigmoid(logit)``; several labels: ``score = softmax(logits)[-1]`` (the last
    label is "good"). The text scored is ``prompt + completion``.
    """

    def __init__(self, path: Union[str, Path], *, max_length: int = 1024, device: str = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"reward model path {str(path)!r} does not exist or is not a directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.max_length, self.device, self.__name__ = max_length, device, f"reward_model({path})"

    def __call__(self, prompt: str, completion: str) -> Judgement:
        import torch

        enc = self.tokenizer(prompt + completion, return_tensors="pt", truncation=True, max_length=self.max_length)
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[0].float()
        score = torch.sigmoid(logits[0]) if logits.numel() == 1 else torch.softmax(logits, -1)[-1]
        return Judgement(float(score))


def load_judge(spec: Union[str, Judge]) -> Judge:
    """A judge from ``spec``: a callable (returned as is), ``"module:callable"``, a local
    reward-model directory, or a built-in task name (its rule-based judge)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"judge spec {spec!r} must be a callable or a non-empty string")
    if Path(spec).is_dir():
        return RewardModelJudge(spec)
    if ":" in spec and not spec.startswith((".", "/")):
        module_name, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"judge spec {spec!r}: cannot import {attr!r} from module {module_name!r} ({err})") from None
        if not callable(obj):
            raise ValueError(f"judge spec {spec!r} names a {type(obj).__name__}, which is not callable")
        return obj
    from .tasks import TASKS, get_task

    if spec in TASKS:
        return get_task(spec).judge
    if "/" in spec or spec.startswith("."):
        raise ValueError(f"judge spec {spec!r} looks like a path, but no reward-model directory exists there")
    raise ValueError(
        f"judge spec {spec!r} is not understood; use a built-in task name ({', '.join(sorted(TASKS))}), "
        "a local reward-model directory, or 'module:callable'"
    )
