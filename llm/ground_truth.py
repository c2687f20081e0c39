"""Ground-truth credit of completion tokens, for tasks whose judge is a program (docs/llm_feedback.md, "Ground-truth credit").

Two per-token quantities of a sampled completion ``y = (y_0 … y_{T−1})`` of prompt ``x`` with judge score ``R``:

- the judge's **counterfactual contribution** (:func:`counterfactual_contributions`)
  ``c_t = R(y) − mean_{v ∈ S} R(y with y_t := v)``, ``S`` the whole vocabulary or a uniform sample of it (without
  replacement, ``vocab_sample`` ids, seeded); the edited ids are decoded as the rollout decodes (special tokens
  skipped, so an edit to eos or pad deletes the token) and judged in one batch per completion;
- the **advantage under the current policy** (:func:`mc_advantages`) ``A_t = Q(y_≤t) − V(y_<t)`` with
  ``V(y_<t) = E_{y'_t… ~ π}[R | x, y_<t]`` and ``Q(y_≤t) = V(y_≤t)``, estimated by ``n`` Monte Carlo continuations
  from every prefix (the continuation of ``y_<t`` resamples ``y_t`` too), with the standard error
  ``SE(A_t) = sqrt(SE(V̂_{t+1})² + SE(V̂_t)²)`` (independent continuations per prefix; ``SE(V̂) = s/√n``).
  A prefix that ended (eos, or ``max_new_tokens`` reached) has its exact value ``R(prefix)`` and SE 0.

Continuations are sampled as the trainer samples (:class:`~llm.generation.GumbelSampler`, temperature, top-k, top-p):
all prefixes with the same remaining budget in one ``model.generate`` call, each prefix's key/value cache computed once
and shared by its ``n`` continuations (:func:`sample_continuations`, ``share_prefix=True``; ``False``:
:class:`~llm.generation.TransformersGenerator` on the prefixes repeated ``n`` times, the same samples up to rounding).

:func:`exact_values` enumerates every continuation with the model's exact probabilities (tiny vocabularies only: the
tests' reference). :func:`correlation` and :func:`bootstrap_correlation` compare a credit with a ground truth, the
Monte Carlo noise of ``Â_t`` accounted for by disattenuation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList

from .feedback import Judgement
from .generation import GumbelSampler, TransformersGenerator, sample_seed, strip_completion, warp_logits
from .prefix import cache_keyword, positions
from .recipe import GenerationConfig
from .rewards import RewardFunctions

Decode = Callable[[Sequence[int]], str]


# ----------------------------------------------------------------------------- judging

class Scorer:
    """Scores texts for the rows of a batch in one call of a :class:`~llm.rewards.RewardFunctions`: ``scorer(rows, texts)``
    → ``[len(texts)]`` float64 scores, ``texts[k]`` judged against prompt ``prompts[rows[k]]`` with that row's dataset
    ``columns``; NaN where no function scored it (a failed judge). ``rewards``: the run's reward functions (a built-in
    task's judge: ``RewardFunctions.from_judge(task.judge, name)``, as the trainer builds it)."""

    def __init__(self, rewards: RewardFunctions, prompts: Sequence[str], columns: Optional[Mapping[str, Sequence]] = None):
        self.rewards, self.prompts = rewards, list(prompts)
        self.columns = {k: list(v) for k, v in (columns or {}).items()}
        for k, v in self.columns.items():
            if len(v) != len(self.prompts):
                raise ValueError(f"column {k!r} has {len(v)} values for {len(self.prompts)} prompts; give one per prompt")
        self.calls = 0  # judged texts so far

    def __call__(self, rows: Sequence[int], texts: Sequence[str]) -> np.ndarray:
        rows, texts = list(rows), list(texts)
        if len(rows) != len(texts):
            raise ValueError(f"{len(rows)} rows for {len(texts)} texts; give one row per text")
        if not texts:
            return np.zeros(0)
        self.calls += len(texts)
        out = self.rewards([self.prompts[r] for r in rows], texts, {k: [v[r] for r in rows] for k, v in self.columns.items()})
        return np.array([math.nan if j is None else float(j.score) for j in out.judgements])


def judge_scorer(judge: Callable[[str, str], Judgement], prompts: Sequence[str]) -> Scorer:
    """A :class:`Scorer` of one per-item judge ``(prompt, completion) -> Judgement`` (e.g. :func:`llm.tasks.judge_word`)."""
    return Scorer(RewardFunctions.from_judge(judge, getattr(judge, "__name__", "judge")), prompts)


# ----------------------------------------------------------------------------- counterfactual contribution

def _check_positive_int(name: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    return int(value)


def vocabulary_sample(vocab_size: int, vocab_sample: Optional[int], seed: int) -> torch.Tensor:
    """The substitute ids ``S``: ``arange(vocab_size)`` when ``vocab_sample`` is None or ≥ ``vocab_size``, else
    ``vocab_sample`` ids drawn uniformly without replacement (``torch.randperm`` seeded ``seed``), sorted."""
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    if vocab_sample is not None:
        _check_positive_int("vocab_sample", vocab_sample)
    if vocab_sample is None or vocab_sample >= vocab_size:
        return torch.arange(vocab_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=g)[:vocab_sample].sort().values


def counterfactual_contributions(completions: Sequence[Sequence[int]], rows: Sequence[int], score: Scorer, decode: Decode,
                                 vocab_size: int, *, vocab_sample: Optional[int] = None, seed: int = 0,
                                 rewards: Optional[Sequence[float]] = None) -> list[np.ndarray]:
    """``c_t = R(y) − mean_{v∈S} R(y with y_t := v)`` for every token of every completion: one ``[T_i]`` array each.

    ``completions[i]``: token ids (eos kept if sampled), judged against row ``rows[i]`` of ``score``; ``decode``: ids →
    text as the rollout decodes (special tokens skipped); ``S``: :func:`vocabulary_sample` (``vocab_sample`` None: the
    whole vocabulary; else that many ids, one sample for all tokens, seeded ``seed``). ``rewards[i]``: ``R(y_i)`` when
    known (else judged here). The ``T_i·|S|`` edited texts of a completion are judged in one call; NaN scores (failed
    judges) are left out of the mean.
    """
    if len(completions) != len(rows):
        raise ValueError(f"{len(completions)} completions for {len(rows)} rows; give one row per completion")
    subs = vocabulary_sample(vocab_size, vocab_sample, seed).tolist()
    base = score(rows, [decode(list(c)) for c in completions]) if rewards is None else np.asarray(rewards, dtype=float)
    out = []
    for i, (c, r) in enumerate(zip(completions, rows)):
        c = list(c)
        texts = [decode(c[:t] + [v] + c[t + 1:]) for t in range(len(c)) for v in subs]
        edited = score([r] * len(texts), texts).reshape(len(c), len(subs)) if c else np.zeros((0, len(subs)))
        with np.errstate(invalid="ignore"):
            out.append(base[i] - np.nanmean(edited, axis=1) if c else np.zeros(0))
    return out


# ----------------------------------------------------------------------------- Monte Carlo continuations

@dataclass(frozen=True)
class Sampling:
    """How the policy samples: the method's temperature, the generation block's top-k/top-p, the completion budget and
    the tokenizer's eos/pad ids (as :class:`~llm.generation.TransformersGenerator` uses them)."""

    temperature: float
    max_new_tokens: int
    eos_id: Optional[int]
    pad_id: Optional[int]
    top_k: int = 0
    top_p: float = 1.0


class _Ids:
    """The two token ids :class:`~llm.generation.TransformersGenerator` reads off a tokenizer."""

    def __init__(self, eos_id: Optional[int], pad_id: Optional[int]):
        self.eos_token_id, self.pad_token_id = eos_id, pad_id


@torch.no_grad()
def sample_continuations(model, prefixes: Sequence[Sequence[int]], n: int, seeds: Sequence[int], max_new_tokens: int,
                         sampling: Sampling, *, share_prefix: bool = True) -> list[list[list[int]]]:
    """``n`` sampled continuations of at most ``max_new_tokens`` tokens of each prefix (prompt ids then the completion's
    first tokens), ``[len(prefixes)][n]`` token lists (cut after eos, kept). Continuation ``j`` of prefix ``i`` draws from
    the stream ``sample_seed(seeds[i], j)``, exactly as :class:`~llm.generation.TransformersGenerator` would.

    ``share_prefix``: the ``U`` prefixes, left-padded, run once (all but their last token) and their key/value cache is
    repeated to the ``U·n`` rows, then ``model.generate`` continues from it, so a prefix's positions are computed ``U``
    times instead of ``U·n``; otherwise the prefixes go to :class:`~llm.generation.TransformersGenerator` (each row
    runs its own prefix). Both sample the same tokens up to float rounding of the batched forwards.
    """
    n = _check_positive_int("n", n)
    if len(seeds) != len(prefixes):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prefixes)} prefixes; give one seed per prefix")
    if not prefixes:
        return []
    width = max(len(p) for p in prefixes)
    if not share_prefix or width < 2:
        gen = TransformersGenerator(GenerationConfig(top_k=sampling.top_k, top_p=sampling.top_p), sampling.temperature,
                                    max_new_tokens, _Ids(sampling.eos_id, sampling.pad_id))
        return [g.completion_ids for g in gen(model, [list(p) for p in prefixes], n, list(seeds))]
    device = next(model.parameters()).device
    pad = next(t for t in (sampling.pad_id, sampling.eos_id, 0) if t is not None)  # masked out: any id will do
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prefixes], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
    was_training = model.training
    model.eval()
    try:
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions(mask[:, :-1]), use_cache=True,
                        logits_to_keep=1)
        cache = getattr(prefill, "cache", None)
        cache = prefill.past_key_values if cache is None else cache
        cache.batch_repeat_interleave(n)  # [U, ...] → [U·n, ...], rows [p0 × n, p1 × n, ...]
        sampler = GumbelSampler([sample_seed(s, j) for s in seeds for j in range(n)], sampling.temperature, sampling.top_k, sampling.top_p)
        out = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                             do_sample=False, logits_processor=LogitsProcessorList([sampler]), max_new_tokens=max_new_tokens,
                             pad_token_id=sampling.pad_id, eos_token_id=sampling.eos_id,
                             **{cache_keyword(model): cache})
    finally:
        model.train(was_training)
    rows = [strip_completion(r, sampling.eos_id, sampling.pad_id) for r in out[:, width:].tolist()]
    return [rows[i * n:(i + 1) * n] for i in range(len(prefixes))]


@dataclass
class AdvantageEstimate:
    """Monte Carlo values and advantages of one completion of ``T`` tokens.

    ``values[t] = V̂(y_<t)`` (``t = 0 … T``; ``values[T] = R(y)`` exactly when ``y`` ended) with ``value_se[t]``;
    ``advantages[t] = values[t+1] − values[t] = Q̂(y_≤t) − V̂(y_<t)`` with ``advantage_se[t]``.
    """

    values: np.ndarray  # [T+1]
    value_se: np.ndarray  # [T+1]
    advantages: np.ndarray  # [T]
    advantage_se: np.ndarray  # [T]


def _ended(completion_prefix: Sequence[int], sampling: Sampling) -> bool:
    return len(completion_prefix) >= sampling.max_new_tokens or (
        sampling.eos_id is not None and len(completion_prefix) > 0 and completion_prefix[-1] == sampling.eos_id)


def mc_advantages(model, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], rows: Sequence[int],
                  score: Scorer, decode: Decode, sampling: Sampling, *, n_continuations: int, seed: int = 0,
                  share_prefix: bool = True, stats: Optional[dict] = None) -> list[AdvantageEstimate]:
    """Monte Carlo ``A_t = Q(y_≤t) − V(y_<t)`` of every token of every completion under ``model`` (the current policy).

    ``prompt_ids[i]``/``completions[i]``: completion ``i``'s prompt and completion ids, judged against row ``rows[i]``
    of ``score``. Every distinct unfinished prefix ``x_i, y_<t`` gets ``n_continuations`` continuations up to the
    completion budget ``sampling.max_new_tokens − t``; all prefixes with the same budget are sampled in one call of
    :func:`sample_continuations` and judged in one batch. ``V̂`` = mean score, ``SE = std(ddof=1)/√n`` (NaN scores of
    failed judges left out). Prefix ``(i, t)`` draws from ``sample_seed(seed, *prefix ids)``: equal prefixes (e.g. the
    prompt, ``t = 0``, of a group) share one estimate. ``stats`` (if given) receives ``continuation_tokens``,
    ``continuations`` and ``prefixes``.
    """
    n = n_continuations
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n_continuations={n!r} must be an integer >= 2 (the standard error needs two continuations)")
    if not (len(prompt_ids) == len(completions) == len(rows)):
        raise ValueError(f"prompt_ids, completions and rows must have the same length, got {len(prompt_ids)}, "
                         f"{len(completions)}, {len(rows)}")
    exact: dict[tuple, tuple[int, list[int]]] = {}  # ended prefixes: judged once
    todo: dict[int, dict[tuple, tuple[int, list[int], list[int]]]] = {}  # budget → prefix → (row, prompt, completion prefix)
    for p, c, r in zip(prompt_ids, completions, rows):
        for t in range(len(c) + 1):
            key = (r, *p, -1, *c[:t])
            if _ended(c[:t], sampling):
                exact[key] = (r, list(c[:t]))
            else:
                todo.setdefault(sampling.max_new_tokens - t, {})[key] = (r, list(p), list(c[:t]))
    est: dict[tuple, tuple[float, float]] = {}
    if exact:
        keys = list(exact)
        s = score([exact[k][0] for k in keys], [decode(exact[k][1]) for k in keys])
        est.update({k: (float(v), 0.0) for k, v in zip(keys, s)})
    tokens = continuations = 0
    for budget, group in sorted(todo.items()):
        keys = list(group)
        seeds = [sample_seed(seed, *k) for k in keys]
        conts = sample_continuations(model, [group[k][1] + group[k][2] for k in keys], n, seeds, budget, sampling,
                                     share_prefix=share_prefix)
        tokens += sum(len(x) for cs in conts for x in cs)
        continuations += len(keys) * n
        s = score([group[k][0] for k in keys for _ in range(n)],
                  [decode(group[k][2] + x) for k, cs in zip(keys, conts) for x in cs]).reshape(len(keys), n)
        for k, row in zip(keys, s):
            ok = row[~np.isnan(row)]
            est[k] = (float(ok.mean()) if ok.size else math.nan,
                      float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan)
    if stats is not None:
        stats.update(continuation_tokens=tokens, continuations=continuations, prefixes=sum(len(g) for g in todo.values()))
    out = []
    for p, c, r in zip(prompt_ids, completions, rows):
        v = np.array([est[(r, *p, -1, *c[:t])][0] for t in range(len(c) + 1)])
        se = np.array([est[(r, *p, -1, *c[:t])][1] for t in range(len(c) + 1)])
        out.append(AdvantageEstimate(v, se, np.diff(v), np.sqrt(se[1:] ** 2 + se[:-1] ** 2)))
    return out


# ----------------------------------------------------------------------------- exact values (tiny vocabularies)

@torch.no_grad()
def next_token_probs(model, rows: Sequence[Sequence[int]], sampling: Sampling) -> torch.Tensor:
    """The sampling distribution ``softmax(warp(logits))`` of the next token after each row (left-padded into one
    forward), ``[len(rows), V]`` float64: what :class:`~llm.generation.GumbelSampler` draws from."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    pad = next(t for t in (sampling.pad_id, sampling.eos_id, 0) if t is not None)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, logits_to_keep=1).logits[:, -1]
    return warp_logits(logits.double(), sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)


def exact_values(model, prompt_ids: Sequence[int], completion: Sequence[int], row: int, score: Scorer, decode: Decode,
                 sampling: Sampling) -> np.ndarray:
    """Exact ``V(y_<t)``, ``t = 0 … T``, by enumerating every continuation of every prefix with the model's sampling
    probabilities: ``V(y_<t) = Σ_z π(z | x, y_<t) R(y_<t z)`` over the continuations ``z`` (ending at eos or the
    budget). Costs ``~V^(max_new_tokens − t)`` judged texts per prefix: for tiny vocabularies only (the tests)."""
    values = []
    for t in range(len(completion) + 1):
        start = list(completion[:t])
        leaves: list[tuple[list[int], float]] = []
        frontier = [(start, 1.0)]
        while frontier:
            open_ = [(c, p) for c, p in frontier if not _ended(c, sampling)]
            leaves += [(c, p) for c, p in frontier if _ended(c, sampling)]
            if not open_:
                break
            probs = next_token_probs(model, [list(prompt_ids) + c for c, _ in open_], sampling).cpu().numpy()
            frontier = [(c + [v], p * float(q[v])) for (c, p), q in zip(open_, probs) for v in range(len(q)) if q[v] > 0]
        s = score([row] * len(leaves), [decode(c) for c, _ in leaves])
        values.append(float(sum(p * v for (_, p), v in zip(leaves, s))))
    return np.array(values)


# ----------------------------------------------------------------------------- correlations

def correlation(x: Sequence[float], y: Sequence[float], y_se: Optional[Sequence[float]] = None) -> dict:
    """Pearson ``r = cov(x, y) / (sd(x) sd(y))`` over the pairs where both are finite, and, when ``y`` is a noisy
    estimate with per-point standard errors ``y_se``, the disattenuated correlation with the noise-free ``y``:
    ``r_true = r / sqrt(λ)``, ``λ = (var(y) − mean(se²)) / var(y)`` the reliability of ``y`` (Spearman's correction; the
    noise independent of ``x`` and of the true ``y``; ``x`` taken as noise-free). Returns ``r``, ``r_disattenuated``
    (``r`` itself without ``y_se``; NaN when λ ≤ 0: the noise explains all of ``y``'s variance), ``reliability``, ``n``.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x has shape {x.shape} but y has {y.shape}; they must match")
    se = None if y_se is None else np.asarray(y_se, dtype=float)
    if se is not None and se.shape != y.shape:
        raise ValueError(f"y_se has shape {se.shape} but y has {y.shape}; they must match")
    ok = np.isfinite(x) & np.isfinite(y) & (np.ones_like(y, dtype=bool) if se is None else np.isfinite(se))
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    if n < 2 or x.std() == 0 or y.std() == 0:
        return {"r": math.nan, "r_disattenuated": math.nan, "reliability": math.nan, "n": n}
    r = float(np.corrcoef(x, y)[0, 1])
    if se is None:
        return {"r": r, "r_disattenuated": r, "reliability": 1.0, "n": n}
    var = float(y.var(ddof=1))
    reliability = (var - float(np.mean(se[ok] ** 2))) / var
    return {"r": r, "r_disattenuated": r / math.sqrt(reliability) if reliability > 0 else math.nan, "reliability": reliability, "n": n}


def bootstrap_correlation(x: Sequence[np.ndarray], y: Sequence[np.ndarray], y_se: Optional[Sequence[np.ndarray]] = None, *,
                          n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """:func:`correlation` of the tokens pooled over completions (``x[i]``, ``y[i]``, ``y_se[i]``: completion ``i``'s
    ``[T_i]`` arrays), with percentile CIs from ``n_boot`` resamples of the completions with replacement
    (``numpy.random.default_rng(seed)``): ``r_lo``/``r_hi`` and ``r_disattenuated_lo``/``_hi`` at ``level``
    (resamples where a value is NaN are left out of its interval), plus ``completions``."""
    n_boot = _check_positive_int("n_boot", n_boot)
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    if len(x) != len(y) or (y_se is not None and len(y_se) != len(y)):
        raise ValueError(f"x, y (and y_se) must hold one array per completion, got {len(x)}, {len(y)}"
                         + ("" if y_se is None else f", {len(y_se)}"))

    def pooled(idx) -> dict:
        return correlation(np.concatenate([x[i] for i in idx]), np.concatenate([y[i] for i in idx]),
                           None if y_se is None else np.concatenate([y_se[i] for i in idx]))

    m = len(x)
    out = pooled(range(m)) if m else {"r": math.nan, "r_disattenuated": math.nan, "reliability": math.nan, "n": 0}
    out["completions"] = m
    rng = np.random.default_rng(seed)
    boots = [pooled(rng.integers(0, m, m)) for _ in range(n_boot)] if m else []
    for key in ("r", "r_disattenuated"):
        vals = np.array([b[key] for b in boots], dtype=float)
        vals = vals[np.isfinite(vals)]
        lo, hi = (np.quantile(vals, [(1 - level) / 2, (1 + level) / 2]) if vals.size else (math.nan, math.nan))
        out[f"{key}_lo"], out[f"{key}_hi"] = float(lo), float(hi)
    return out
