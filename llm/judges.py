"""Judges: the callables that score a completion, ``judge(prompt, completion) -> Judgement``.

:func:`load_judge` builds one from a task name (its rule-based judge), a local reward-model directory
(:class:`RewardModelJudge`) or ``"module:callable"``. Batched judges, ``judge(prompts, completions, **columns)
-> list[Optional[Judgement]]`` (TRL's reward-function convention, used by :class:`llm.rewards.RewardFunctions`):
:meth:`RewardModelJudge.batch` and :class:`LLMJudge`, a local causal LM prompted to write a score and a critique.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import string
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers import GenerationConfig as HFGenerationConfig

from .feedback import Judge, Judgement
from .tasks import TASKS, get_task

logger = logging.getLogger(__name__)


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
        return Judgement(float(self._squash(logits[None])[0]))

    @staticmethod
    def _squash(logits: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` in [0, 1] from logits ``[B, num_labels]`` (sigmoid of one logit, else the last label's softmax)."""
        return torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, -1]

    def batch(self, prompts: list[str], completions: list[str], **columns) -> list[Judgement]:
        """One forward for the whole batch (right padding; the model reads its score at the last non-pad token, found
        from ``config.pad_token_id``); a model without a pad token id scores item by item. Dataset columns are ignored."""
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts but {len(completions)} completions")
        texts = [p + c for p, c in zip(prompts, completions)]
        if not texts:
            return []
        if self.model.config.pad_token_id is None or self.tokenizer.pad_token_id is None:
            return [self(p, c) for p, c in zip(prompts, completions)]
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
        return [Judgement(float(s)) for s in self._squash(logits).clamp(0.0, 1.0)]


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


# ----------------------------------------------------------------------------- LLM as judge
DEFAULT_JUDGE_TEMPLATE = (
    "You are a strict grader. Read the task and the answer, then reply with exactly two lines:\n"
    "score: <a number from 0 to 10>/10\n"
    "critique: <one sentence on what to fix>\n\n"
    "Task:\n{prompt}\n\nAnswer:\n{completion}\n\n"
)

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCORE_RE = re.compile(rf"score\s*[:=]?\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?", re.IGNORECASE)
_CRITIQUE_RE = re.compile(r"critique\s*:", re.IGNORECASE)
_STRIP = " \t\r\n;,.:-*"


def parse_judgement(text: str) -> Optional[Judgement]:
    """The score and critique in a judge's output text, or None when no score in [0, 1] can be read.

    The first ``score: X`` (case-insensitive; ``:`` or ``=`` optional) with ``X`` in [0, 1], or ``score: X/D`` read as
    ``X / D`` (``7/10`` → 0.7; ``D > 0``), is the score; a value outside [0, 1] (``score: 7``, ``score: 12/10``, a negative
    one) makes the text unparseable rather than being clipped. The critique is the text after ``critique:`` if present,
    else the whole text without the score; stripped of surrounding whitespace and punctuation; None if empty.
    """
    if not isinstance(text, str):
        return None
    m = _SCORE_RE.search(text)
    if m is None:
        return None
    value = float(m.group(1))
    if m.group(2) is not None:
        denominator = float(m.group(2))
        if not denominator > 0:
            return None
        value /= denominator
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return None
    rest = text[: m.start()] + "\n" + text[m.end():]
    c = _CRITIQUE_RE.search(rest)
    critique = (rest[c.end():] if c else rest).strip(_STRIP)
    return Judgement(value, critique or None)


def template_fields(template: str) -> list[str]:
    """The placeholder names of a ``str.format`` template (``"{prompt} {reference!r}"`` → ``["prompt", "reference"]``);
    ``ValueError`` for a malformed template, a positional ``{}`` / ``{0}`` field or an attribute/index field."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"judge template is malformed ({err}); write literal braces as '{{{{' and '}}}}'") from None
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(f"judge template field {{{field}}} is not allowed; use named fields such as {{prompt}}, "
                             "{completion} or a dataset column name")
        if field not in names:
            names.append(field)
    return names


class LLMJudge:
    """Any LOCAL causal LM as a judge: fill ``template`` per item, greedy-generate, parse a score and a critique.

    ``template`` is a ``str.format`` string with ``{prompt}`` and ``{completion}`` and optionally any dataset column
    (``{reference}``; literal braces doubled). With a chat template in the tokenizer, the filled text is sent as one user
    message (generation prompt added, thinking disabled where the template supports it); else as plain text. One
    left-padded ``generate`` call per batch, at most ``max_new_tokens`` new tokens, prompts truncated from the left to
    fit the model's positions. Outputs are read by :func:`parse_judgement`; an unparseable one gives None for that item,
    counted in ``last_unparseable`` (this batch) and ``unparseable`` (since construction), with one warning per batch.

    Batched, as a TRL reward function: ``judge(prompts, completions, **columns) -> list[Optional[Judgement]]``;
    ``required_columns`` lists the template's dataset columns (checked by ``RewardFunctions.check_columns``).
    """

    def __init__(self, path: Union[str, Path], template: Optional[str] = None, *, max_new_tokens: int = 64,
                 device: str = "cpu") -> None:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"LLM judge path {str(path)!r} does not exist or is not a directory")
        template = DEFAULT_JUDGE_TEMPLATE if template is None else template
        if not isinstance(template, str):
            raise ValueError(f"judge template must be a string, got {type(template).__name__}")
        fields = template_fields(template)
        missing = [f for f in ("prompt", "completion") if f not in fields]
        if missing:
            raise ValueError(f"judge template lacks {', '.join('{' + f + '}' for f in missing)}; it must contain "
                             "{prompt} and {completion} (and may name dataset columns, e.g. {reference})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"judge max_new_tokens={max_new_tokens!r} must be a positive integer")
        self.template, self.max_new_tokens, self.device = template, max_new_tokens, device
        self.required_columns = tuple(f for f in fields if f not in ("prompt", "completion"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        self.tokenizer.padding_side = "left"
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if pad is None:
            raise ValueError(f"LLM judge {str(path)!r}: its tokenizer has neither a pad nor an eos token")
        eos = self.model.generation_config.eos_token_id
        self.generation_config = HFGenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id,
        )
        positions = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_prompt_tokens = max(1, min(int(positions), int(self.tokenizer.model_max_length)) - max_new_tokens)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.unparseable, self.last_unparseable, self.last_outputs = 0, 0, []
        self.__name__ = f"llm_judge({path})"

    def render(self, prompt: str, completion: str, **columns) -> str:
        """The judge's input text for one item (the filled template, in the chat format when the tokenizer has one)."""
        missing = [c for c in self.required_columns if c not in columns]
        if missing:
            raise ValueError(f"{self.__name__}: its template needs column(s) {', '.join(missing)}, which were not given")
        text = self.template.format(prompt=prompt, completion=completion, **columns)
        if not self.chat:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)

    def generate(self, texts: list[str]) -> list[str]:
        """Greedy outputs (decoded new tokens, special tokens dropped) of ``texts``, one ``generate`` call."""
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "left", "left"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_prompt_tokens, add_special_tokens=not self.chat)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            out = self.model.generate(**enc, generation_config=self.generation_config)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[Optional[Judgement]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            self.last_unparseable, self.last_outputs = 0, []
            return []
        cols = {c: columns[c] for c in self.required_columns if c in columns}
        texts = [self.render(p, c, **{k: v[i] for k, v in cols.items()})
                 for i, (p, c) in enumerate(zip(prompts, completions))]
        self.last_outputs = self.generate(texts)
        judgements = [parse_judgement(o) for o in self.last_outputs]
        bad = [i for i, j in enumerate(judgements) if j is None]
        self.last_unparseable = len(bad)
        self.unparseable += len(bad)
        if bad:
            logger.warning("%s: %d of %d outputs had no score in [0, 1] (unscored), e.g. item %d: %r",
                           self.__name__, len(bad), len(judgements), bad[0], self.last_outputs[bad[0]][:200])
        return judgements
