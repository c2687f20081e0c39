"""Judges: the callables that score a completion, ``judge(prompt, completion) -> Judgement``.

:func:`load_judge` builds one from a task name (its rule-based judge), a local reward-model directory
(:class:`RewardModelJudge`) or ``"module:callable"``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Union

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .feedback import Judge, Judgement
from .tasks import TASKS, get_task


class RewardModelJudge:
    """A sequence-classification reward model from a LOCAL directory; score squashed into [0, 1].

    One logit: ``score = sigmoid(logit)``; several labels: ``score = softmax(logits)[-1]`` (the last
    label is "good"). The text scored is ``prompt + completion``.
    """

    def __init__(self, path: Union[str, Path], *, max_length: int = 1024, device: str = "cpu") -> None:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"reward model path {str(path)!r} does not exist or is not a directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.max_length, self.device, self.__name__ = max_length, device, f"reward_model({path})"

    def __call__(self, prompt: str, completion: str) -> Judgement:
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
    if spec in TASKS:
        return get_task(spec).judge
    if "/" in spec or spec.startswith("."):
        raise ValueError(f"judge spec {spec!r} looks like a path, but no reward-model directory exists there")
    raise ValueError(
        f"judge spec {spec!r} is not understood; use a built-in task name ({', '.join(sorted(TASKS))}), "
        "a local reward-model directory, or 'module:callable'"
    )
