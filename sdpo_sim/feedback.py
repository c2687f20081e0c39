"""The judge: what the environment says about each completion (docs/design.md §3, feedback channels).

The judge may read the reward table (it *is* the environment). Noise ``ε ~ N(0, σ²)`` is added to
the reward before quantisation; critique hints get their own noise ``σ_h``.

- ``binary``: ``1[R+ε > τ]``;  ``ordinal``: 1–5 stars from equal-width bins of ``R+ε`` over [0, 1];
- ``continuous``: ``R+ε``;  ``critique``: ``R+ε`` plus hints ``h_t = c_t(y) + ε_t`` with
  ``c_t(y) = R(y) − mean_v R(y with y_t := v)``;
- ``demo``: ``R+ε`` plus the best sibling of the group (never the completion itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from . import rng
from .per_run import RunTasks, Setting, per_run
from .world import Task, sequence_index

CHANNELS = ("binary", "ordinal", "continuous", "critique", "demo")
STARS = 5
ORDINAL_EDGES = torch.linspace(0.0, 1.0, STARS + 1, dtype=torch.float64)[1:-1]  # 0.2, 0.4, 0.6, 0.8


@dataclass
class Feedback:
    """What the judge returned for a batch ``[runs, B]`` of completions.

    ``score`` is the message itself (0/1, 1–5 stars, or ``R+ε``); ``lower``/``upper`` is the interval
    of the latent ``R+ε`` it implies (equal for continuous scores), so a reader of the feedback knows
    exactly what was observed.
    """

    kind: str
    score: torch.Tensor  # [runs, B]
    lower: torch.Tensor  # [runs, B] (−inf for open intervals)
    upper: torch.Tensor  # [runs, B] (+inf for open intervals)
    group_size: int
    noise: Setting  # σ of the judge's noise (public knowledge about the judge): a float or [runs]
    threshold: Optional[Setting] = None  # τ for binary: a float, or [runs, 1] (each run's own)
    hints: Optional[torch.Tensor] = None  # [runs, B, T] critique hints
    hint_noise: Setting = 0.0  # σ_h: a float or [runs]
    demo: Optional[torch.Tensor] = None  # [runs, B, T] best sibling's tokens
    demo_mask: Optional[torch.Tensor] = None  # [runs, B] True when the sibling scored higher than y

    def success(self, threshold: Setting) -> torch.Tensor:
        """Which completions the feedback shows to have succeeded, ``[runs, B]`` bool: the interval of ``R + ε`` it
        implies lies above ``threshold`` (``lower ≥ τ`` and ``upper > τ``): binary's pass (``R + ε > τ``), a continuous
        score above τ, a star bin whose lower edge is at least τ. The method reads only the message, never the latent.
        ``threshold``: a float, or ``[runs]`` (each run's τ)."""
        tau = per_run(threshold, dims=1)
        return (self.lower >= tau) & (self.upper > tau)

    def take(self, index: torch.Tensor) -> "Feedback":
        """The feedback of rollout ``index[r, i]`` given in place of rollout ``i`` (for the ``null`` control)."""
        pick = lambda x: None if x is None else x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))  # noqa: E731
        return replace(self, score=pick(self.score), lower=pick(self.lower), upper=pick(self.upper),
                       hints=pick(self.hints), demo=pick(self.demo), demo_mask=pick(self.demo_mask))


class Judge:
    """Scores completions of one task (a :class:`~sdpo_sim.world.Task`), or of each run's own task (a
    :class:`~sdpo_sim.per_run.RunTasks`, with ``threshold`` a float or ``[runs]``). ``contributions`` is the
    local-verdict table a judge (or a model re-reading its own text) can compute by looking at a completion,
    independent of any policy."""

    def __init__(self, task: Union[Task, RunTasks], threshold: Setting) -> None:
        self.task = task
        self.threshold = threshold.double() if isinstance(threshold, torch.Tensor) else float(threshold)

    def swapped_index(self, sequences: torch.Tensor) -> torch.Tensor:
        """Flat index of ``y with y_t := v`` for every t, v: ``[..., T] → [..., T, V]``."""
        V, T = self.task.vocab_size, self.task.seq_len
        place = V ** torch.arange(T - 1, -1, -1)  # [T]
        base = sequence_index(sequences, V).unsqueeze(-1) - sequences * place  # index with y_t removed, [..., T]
        return base.unsqueeze(-1) + torch.arange(V) * place.unsqueeze(-1)

    def contributions(self, sequences: torch.Tensor, swapped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``c_t(v; y) = R(y with y_t := v) − mean_v' R(y with y_t := v')``, ``[..., T] → [..., T, V]``
        (``swapped``: ``swapped_index(sequences)`` if the caller has it already)."""
        r = self.task.lookup(self.swapped_index(sequences) if swapped is None else swapped)
        return r - r.mean(-1, keepdim=True)

    def __call__(
        self, sequences: torch.Tensor, kind: str, *, group_size: int, noise: Setting = 0.0, hint_noise: Setting = 0.0,
        seeds: torch.Tensor, step: int,
    ) -> Feedback:
        """Judge ``sequences [runs, B, T]`` on channel ``kind``; noise drawn from each run's own stream, with σ
        (and σ_h) one float for all runs or one per run (``[runs]``)."""
        if kind not in CHANNELS:
            raise ValueError(f"feedback={kind!r} is not allowed; choose one of {', '.join(map(repr, CHANNELS))}")
        runs, batch, T = sequences.shape
        latent = self.task.reward(sequences) + per_run(noise, dims=1) * rng.normal(seeds, rng.NOISE, step, (batch,))
        inf = torch.full_like(latent, float("inf"))
        common = dict(kind=kind, group_size=group_size, noise=noise)
        if kind == "binary":
            tau = per_run(self.threshold, dims=1)  # a float or [runs, 1]
            passed = latent > tau
            at_tau = torch.zeros_like(latent) + tau
            lower = torch.where(passed, at_tau, -inf)
            upper = torch.where(passed, inf, at_tau)
            return Feedback(score=passed.double(), lower=lower, upper=upper, threshold=tau, **common)
        if kind == "ordinal":
            bins = torch.bucketize(latent, ORDINAL_EDGES)  # 0..4
            edges = torch.cat([torch.tensor([-float("inf")]), ORDINAL_EDGES, torch.tensor([float("inf")])]).double()
            return Feedback(score=(bins + 1).double(), lower=edges[bins], upper=edges[bins + 1], **common)
        fb = Feedback(score=latent, lower=latent, upper=latent, **common)
        if kind == "critique":
            c = self.contributions(sequences).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
            fb.hints = c + per_run(hint_noise, dims=2) * rng.normal(seeds, rng.HINT_NOISE, step, (batch, T))
            fb.hint_noise = hint_noise
        if kind == "demo":
            fb.demo, fb.demo_mask = best_sibling(sequences, latent, group_size)
        return fb


def best_sibling(sequences: torch.Tensor, scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each completion, the highest-scoring *other* member of its group, and whether it beats it.

    Args: ``sequences [runs, B, T]``, ``scores [runs, B]``. Returns ``([runs, B, T], [runs, B] bool)``.
    """
    runs, batch, T = sequences.shape
    g = scores.view(runs, batch // group_size, group_size)
    eye = torch.eye(group_size, dtype=torch.bool)
    others = g.unsqueeze(-2).expand(*g.shape, group_size).masked_fill(eye, float("-inf"))  # [runs, G, i, j]
    best = others.argmax(-1)  # [runs, G, group_size]
    index = (best + torch.arange(0, batch, group_size).view(1, -1, 1)).view(runs, batch)
    demo = sequences.gather(1, index.unsqueeze(-1).expand(-1, -1, T))
    better = scores.gather(1, index) > scores
    return demo, better
