"""Reward functions as plain Python callables (TRL's convention), several at once with weights.

A reward function is called once per batch, by keyword as TRL does: ``fn(prompts=[...], completions=[...], **columns)``
where ``columns[name]`` holds one value per item of a dataset column (a function that takes no ``**kwargs`` receives
only the columns it names). It returns one value per item: a number in [0, 1], a :class:`~llm.feedback.Judgement`
``(score, critique)``, or None (this function does not score this item). Scores must lie in [0, 1] because the feedback
channels quantise on [0, 1] (binary threshold, 1–5 stars); a value outside is that item's failure.

:class:`RewardFunctions` combines the functions per item by the weighted mean over the functions that scored it,

    score = Σ_i w_i s_i / Σ_i w_i      (i over the functions that scored the item),

and joins their critiques with ``"; "``. TRL instead sums the weighted rewards (``nansum`` skipping None); we normalise
by the weights present so that the combined score stays in [0, 1]. An item no function scored is unscored (None).

Failures never lose the batch or the run: a failing function costs only the items it fails on (see
:meth:`RewardFunctions.__call__`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .feedback import Judgement
from .judges import LLMJudge, RewardModelJudge

logger = logging.getLogger(__name__)

SPEC_FORMS = ("'module:function'", "'path/to/file.py:function'",
              "a local sequence-classification reward-model directory", "a local causal-LM directory (LLM judge)")
_CAUSAL_LM = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_SEQ_CLS = frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
_MAX_REASONS = 5  # failure reasons spelled out per function and batch in one warning line


@dataclass
class RewardBatch:
    """The combined verdicts of one batch of ``N`` items.

    ``judgements[n]``: item n's combined judgement, None when no function scored it (or every one failed on it);
    ``per_function[name]``: mean score of that function over the items it scored (NaN if none), logged as
    ``reward/<name>``; ``failures``: items × functions that failed; ``unscored``: items with no combined judgement;
    ``scored[name]``: how many items that function scored (to average ``per_function`` over batches or processes:
    ``Σ mean·scored / Σ scored``).
    """

    judgements: list[Optional[Judgement]]
    per_function: dict[str, float]
    failures: int
    unscored: int
    scored: dict[str, int] = field(default_factory=dict)


class _Failure:
    """One item's failure for one function (the reason, for the log)."""

    __slots__ = ("reason", "logged")

    def __init__(self, reason: str, logged: bool = False) -> None:
        self.reason, self.logged = reason, logged  # logged: already warned about on its own line


class _Timeout(Exception):
    """A call ran past ``timeout_s`` (or the function is still stuck in an earlier call that did)."""


def _name_of(fn: Callable) -> str:
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name or name == "<lambda>":
        name = "<lambda>" if name == "<lambda>" else type(fn).__name__
    return name


def _unique(names: list[str]) -> list[str]:
    """``names`` with repeats suffixed ``_2``, ``_3``, ... (in order)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


class _Signature:
    """What a function accepts by keyword: ``var_kw`` (takes ``**kwargs``), the named keyword-passable parameters,
    the required ones other than prompts/completions, and required positional-only ones (which we cannot pass)."""

    def __init__(self, fn: Callable) -> None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: pass everything, check nothing
            self.var_kw, self.names, self.required, self.positional_only = True, set(), [], []
            return
        self.var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        self.names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.required = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                         and p.default is p.empty and p.name not in ("prompts", "completions")]
        self.positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
        self.required += list(getattr(fn, "required_columns", ()))  # e.g. an LLM judge's template columns

    def kwargs(self, prompts: list, completions: list, columns: Mapping[str, list]) -> dict[str, Any]:
        every = {"prompts": prompts, "completions": completions, **columns}
        return every if self.var_kw else {k: v for k, v in every.items() if k in self.names}


def _call_in_thread(fn: Callable, kwargs: dict, timeout_s: Optional[float]) -> tuple[Any, Optional[concurrent.futures.Future]]:
    """``fn(**kwargs)`` in a daemon worker thread, waiting at most ``timeout_s``; returns (result, None), or raises
    :class:`_Timeout` carrying the still-running future. The caller's CUDA device and no-grad mode are carried into the
    thread (both are per-thread). A daemon thread never blocks interpreter exit; a stuck one cannot be killed."""
    if timeout_s is None:
        with torch.no_grad():
            return fn(**kwargs), None
    future: concurrent.futures.Future = concurrent.futures.Future()
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            with torch.no_grad():
                result = fn(**kwargs)
        except BaseException as err:  # noqa: BLE001 — handed to the caller, which decides
            future.set_exception(err)
        else:
            future.set_result(result)

    threading.Thread(target=work, name=f"reward-{_name_of(fn)}", daemon=True).start()
    try:
        return future.result(timeout=timeout_s), None
    except concurrent.futures.TimeoutError:
        err = _Timeout(f"call took longer than timeout_s={timeout_s:g}s (its thread is left running)")
        err.future = future  # type: ignore[attr-defined]
        raise err from None


def _check_value(value: Any) -> Any:
    """A function's value for one item as a Judgement, None (not scored) or a :class:`_Failure`."""
    if value is None or isinstance(value, Judgement):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _Failure(f"returned a {type(value).__name__}, expected a number in [0, 1], a Judgement or None")
    v = float(value)
    if not math.isfinite(v):
        return _Failure(f"returned {v!r}, not a finite number")
    if not 0.0 <= v <= 1.0:
        return _Failure(f"returned {v!r}, outside [0, 1]: rescale its scores into [0, 1] "
                        "(the feedback channels quantise on [0, 1])")
    return Judgement(v)


def _as_list(out: Any) -> Optional[list]:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1).tolist() if out.dim() <= 1 else None
    if isinstance(out, (str, bytes, Mapping)):
        return None
    try:
        return list(out)
    except TypeError:
        return None


def _positive_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(float(x)) and float(x) > 0


# ----------------------------------------------------------------------------- building from specs
def _import_attr(module: Any, attr: str, spec: str) -> Callable:
    obj = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"reward spec {spec!r}: {module.__name__!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r} names a {type(obj).__name__}, which is not callable")
    return obj


def load_file_module(path: Path) -> Any:
    """The module of a ``.py`` file, loaded with importlib under a name derived from its resolved path
    (``reward_file_<stem>_<8 hex of the path's sha256>``), registered in ``sys.modules`` (loaded once per path)."""
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"reward_file_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward file {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _model_kind(path: Path, spec: str) -> str:
    """``"reward_model"`` or ``"llm_judge"`` from ``config.json``'s ``architectures``; ValueError otherwise."""
    config = path / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"reward spec {spec!r} is a directory without a readable config.json ({err}); allowed: "
                         f"{', '.join(SPEC_FORMS)}") from None
    if any(a in _SEQ_CLS or str(a).endswith("ForSequenceClassification") for a in architectures):
        return "reward_model"
    if any(a in _CAUSAL_LM or str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "llm_judge"
    raise ValueError(f"reward spec {spec!r}: config.json architectures {architectures} are neither a "
                     f"sequence-classification reward model nor a causal LM; allowed: {', '.join(SPEC_FORMS)}")


class RewardFunctions:
    """Several reward functions with weights, called once per batch; combines them per item.

    Combined score of an item: ``Σ_i w_i s_i / Σ_i w_i`` over the functions ``i`` that scored it (weights default 1,
    each finite and > 0) — normalised by the weights present, unlike TRL's weighted sum, so it stays in [0, 1];
    critiques of the functions that gave one, joined with ``"; "``.

    Each call of a function runs in a daemon worker thread and is waited for at most ``timeout_s`` seconds (None: no
    thread, no limit). A call that runs longer fails its items; its thread cannot be killed and runs on in the
    background, and until it returns that function is not called again (its items fail as "still running"), so a stuck
    judge neither piles up threads nor runs twice at once. Functions run under ``torch.no_grad()``.
    """

    def __init__(self, funcs: Sequence[Callable], weights: Optional[Sequence[float]] = None, *,
                 names: Optional[Sequence[str]] = None, timeout_s: Optional[float] = 60.0) -> None:
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else funcs
        if not isinstance(funcs, list) or not funcs:
            raise ValueError(f"reward funcs must be a non-empty list of callables, got {funcs!r}")
        for i, f in enumerate(funcs):
            if not callable(f):
                raise ValueError(f"reward funcs[{i}] is a {type(f).__name__}, not a callable")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = list(weights)
        if len(weights) != len(funcs):
            raise ValueError(f"reward weights: {len(weights)} given for {len(funcs)} functions; give one per function")
        for i, w in enumerate(weights):
            if not _positive_number(w):
                raise ValueError(f"reward weights[{i}]={w!r} must be a finite number > 0")
        if names is None:
            names = _unique([_name_of(f) for f in funcs])
        names = list(names)
        if len(names) != len(funcs) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"reward names {names!r} must be {len(funcs)} non-empty strings, one per function")
        if len(set(names)) != len(names):
            raise ValueError(f"reward names {names!r} repeat a name; each is logged as reward/<name> and must be unique")
        if timeout_s is not None and not _positive_number(timeout_s):
            raise ValueError(f"reward timeout_s={timeout_s!r} must be a finite number of seconds > 0 (or None)")
        self.funcs, self.weights, self.names = funcs, [float(w) for w in weights], names
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self._signatures = [_Signature(f) for f in funcs]
        self._stuck: list[Optional[concurrent.futures.Future]] = [None] * len(funcs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Optional[Sequence[float]] = None, *,
                   timeout_s: Optional[float] = 60.0, judge_template: Optional[str] = None,
                   judge_max_new_tokens: int = 64, device: str = "cpu") -> "RewardFunctions":
        """Functions from string specs: ``"module:function"`` (imported), ``"path/to/file.py:function"`` (loaded
        from that file, see :func:`load_file_module`), a local directory of a sequence-classification reward model
        (:meth:`RewardModelJudge.batch`) or of a causal LM (:class:`LLMJudge` with ``judge_template`` and
        ``judge_max_new_tokens``), told apart by ``config.json``'s ``architectures``. Models load on ``device``."""
        if isinstance(specs, str) or not isinstance(specs, (list, tuple)) or not specs:
            raise ValueError(f"reward specs must be a non-empty list of strings, got {specs!r}")
        funcs, names = [], []
        for spec in specs:
            fn, name = cls._from_spec(spec, judge_template, judge_max_new_tokens, device)
            funcs.append(fn)
            names.append(name)
        return cls(funcs, weights, names=_unique(names), timeout_s=timeout_s)

    @staticmethod
    def _from_spec(spec: Any, judge_template: Optional[str], judge_max_new_tokens: int,
                   device: str) -> tuple[Callable, str]:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"reward spec {spec!r} must be a non-empty string: one of {', '.join(SPEC_FORMS)}")
        path = Path(spec)
        if path.is_dir():
            if _model_kind(path, spec) == "reward_model":
                return RewardModelJudge(path, device=device).batch, path.name or spec
            judge = LLMJudge(path, judge_template, max_new_tokens=judge_max_new_tokens, device=device)
            return judge, path.name or spec
        target, colon, attr = spec.rpartition(":")
        if colon and attr and target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise ValueError(f"reward spec {spec!r}: file {target!r} does not exist")
            return _import_attr(load_file_module(file), attr, spec), attr.rpartition(".")[2]
        if colon and attr and target and not target.startswith((".", "/")) and "/" not in target:
            try:
                module = importlib.import_module(target)
            except ImportError as err:
                raise ValueError(f"reward spec {spec!r}: cannot import module {target!r} ({err})") from None
            return _import_attr(module, attr, spec), attr.rpartition(".")[2]
        if "/" in spec or spec.startswith("."):
            raise ValueError(f"reward spec {spec!r} looks like a path, but no such directory exists (or a file spec "
                             f"lacks ':function'); allowed: {', '.join(SPEC_FORMS)}")
        raise ValueError(f"reward spec {spec!r} is not understood; allowed: {', '.join(SPEC_FORMS)}")

    @classmethod
    def from_judge(cls, judge: Callable[[str, str], Judgement], name: str, *,
                   timeout_s: Optional[float] = 60.0) -> "RewardFunctions":
        """A per-item judge ``(prompt, completion) -> Judgement | number`` (e.g. a built-in task's) as one batched
        function called ``name``; an item it raises on fails alone (the batch is retried item by item)."""
        if not callable(judge):
            raise ValueError(f"judge {judge!r} is not callable")

        def batched(prompts: list[str], completions: list[str], **columns) -> list:
            return [judge(p, c) for p, c in zip(prompts, completions)]

        batched.__name__ = name
        return cls([batched], names=[name], timeout_s=timeout_s)

    # ------------------------------------------------------------------ checks
    def check_columns(self, columns: Sequence[str], source: str) -> None:
        """Refuse (ValueError naming function, column and ``source``) a function with a required parameter other
        than prompts/completions (no default, not ``*args``/``**kwargs``) that is not among ``columns``, or a
        required positional-only one (we pass everything by keyword). Call it before any model loads."""
        have = set(columns)
        for name, sig in zip(self.names, self._signatures):
            if sig.positional_only:
                raise ValueError(f"reward function {name!r} has positional-only parameter {sig.positional_only[0]!r}; "
                                 "reward functions are called by keyword: fn(prompts=..., completions=..., **columns)")
            for param in sig.required:
                if param not in have:
                    raise ValueError(
                        f"reward function {name!r} needs column {param!r}, which {source} does not have (its columns: "
                        f"{', '.join(sorted(have)) or 'none'}); add the column or give the parameter a default")

    # ------------------------------------------------------------------ calling
    def __call__(self, prompts: list[str], completions: list[str],
                 columns: Optional[Mapping[str, list]] = None) -> RewardBatch:
        """Score a batch of ``N`` items with every function and combine per item (see the class docstring).

        Failures are per item and function, never the batch's: a batched call that raises is retried item by item
        (each failing item logged with function name, item index and error); a NaN/inf, out-of-[0, 1] or wrongly
        typed value fails that item; a wrong number of values, a result that is not a list, or a timed-out call
        fails every item of that call. ``columns[name]`` must hold ``N`` values each.
        """
        prompts, completions, columns = list(prompts), list(completions), dict(columns or {})
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"rewards: {n} prompts but {len(completions)} completions; give one completion per prompt")
        for key, values in columns.items():
            if key in ("prompts", "completions"):
                raise ValueError(f"rewards: column name {key!r} is reserved for the arguments prompts/completions")
            if len(values) != n:
                raise ValueError(f"rewards: column {key!r} has {len(values)} values for {n} items; give one per item")
        scored: list[list[tuple[float, Judgement]]] = [[] for _ in range(n)]
        per_function: dict[str, float] = {}
        counts: dict[str, int] = {}
        failures = 0
        for k, name in enumerate(self.names):
            values = self._run(k, prompts, completions, columns)
            scores = []
            reasons = []
            for i, v in enumerate(values):
                if isinstance(v, _Failure):
                    failures += 1
                    if not v.logged:
                        reasons.append(f"item {i}: {v.reason}")
                elif v is not None:
                    scored[i].append((self.weights[k], v))
                    scores.append(v.score)
            if reasons:
                more = f"; +{len(reasons) - _MAX_REASONS} more" if len(reasons) > _MAX_REASONS else ""
                logger.warning("reward function %r failed on %d of %d items: %s%s", name, len(reasons), n,
                               "; ".join(reasons[:_MAX_REASONS]), more)
            per_function[name] = sum(scores) / len(scores) if scores else math.nan
            counts[name] = len(scores)
        judgements = [self._combine(s) for s in scored]
        return RewardBatch(judgements, per_function, failures, sum(j is None for j in judgements), counts)

    @staticmethod
    def _combine(scored: list[tuple[float, Judgement]]) -> Optional[Judgement]:
        if not scored:
            return None
        total = sum(w for w, _ in scored)
        score = min(1.0, max(0.0, sum(w * j.score for w, j in scored) / total))  # clamp only float rounding
        critiques = [j.critique for _, j in scored if j.critique]
        return Judgement(score, "; ".join(critiques) if critiques else None)

    def _invoke(self, k: int, prompts: list, completions: list, columns: Mapping[str, list]) -> Any:
        """One call of function ``k``; raises :class:`_Timeout` when it is stuck or runs past the limit."""
        stuck = self._stuck[k]
        if stuck is not None:
            if not stuck.done():
                raise _Timeout("still running from an earlier call that timed out (not called again until it returns)")
            self._stuck[k] = None
        kwargs = self._signatures[k].kwargs(prompts, completions, columns)
        try:
            return _call_in_thread(self.funcs[k], kwargs, self.timeout_s)[0]
        except _Timeout as err:
            self._stuck[k] = err.future  # type: ignore[attr-defined]
            raise

    def _run(self, k: int, prompts: list, completions: list, columns: Mapping[str, list]) -> list:
        """Function ``k``'s checked value per item: Judgement, None or :class:`_Failure`."""
        n, name = len(prompts), self.names[k]
        if n == 0:
            return []
        try:
            out = self._invoke(k, prompts, completions, columns)
        except _Timeout as err:
            return [_Failure(str(err))] * n
        except Exception as err:  # noqa: BLE001 — isolate the failing items, below
            if n == 1:
                logger.warning("reward function %r raised on item 0: %s: %s", name, type(err).__name__, err)
                return [_Failure(f"raised {type(err).__name__}: {err}", logged=True)]
            return self._item_by_item(k, prompts, completions, columns, err)
        values = _as_list(out)
        if values is None:
            return [_Failure(f"returned a {type(out).__name__}, expected a list of one value per item")] * n
        if len(values) != n:
            return [_Failure(f"returned {len(values)} values for {n} items (one per item expected)")] * n
        return [_check_value(v) for v in values]

    def _item_by_item(self, k: int, prompts: list, completions: list, columns: Mapping[str, list],
                      batch_err: Exception) -> list:
        name = self.names[k]
        logger.warning("reward function %r raised on a batch of %d (%s: %s); calling it item by item",
                       name, len(prompts), type(batch_err).__name__, batch_err)
        values = []
        for i in range(len(prompts)):
            try:
                out = self._invoke(k, prompts[i:i + 1], completions[i:i + 1], {c: v[i:i + 1] for c, v in columns.items()})
            except _Timeout as err:
                values.append(_Failure(str(err)))
                continue
            except Exception as err:  # noqa: BLE001 — this item alone fails
                logger.warning("reward function %r raised on item %d: %s: %s", name, i, type(err).__name__, err)
                values.append(_Failure(f"raised {type(err).__name__}: {err}", logged=True))
                continue
            got = _as_list(out)
            if got is None or len(got) != 1:
                values.append(_Failure(f"returned {type(out).__name__ if got is None else len(got)} values for 1 item"))
            else:
                values.append(_check_value(got[0]))
        return values
