"""Seeded open-ended tasks whose reward is known exactly for every sequence (docs/design.md §3).

``raw(y) = w_local·Σ_t q[t, y_t]/√T + w_coh·Σ_t b[y_{t−1}, y_t]/√(T−1) + w_motif·motif(y) + w_div·div(y)``,
rescaled affinely to [0, 1] over all ``V**T`` sequences. ``motif(y)`` is the best agreement of any
window of ``y`` with a hidden motif (a global, non-additive term), ``div(y)`` the share of distinct
tokens (a repetition penalty). Sequences are enumerated in ``itertools.product(range(V), repeat=T)``
order: the flat index of ``y`` is ``Σ_t y_t·V^(T−1−t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_SEQUENCES = 2**21  # enumeration limit for V**T (V=8,T=7 fits; V=8,T=8 does not)
# Task families: the reward's weights. ``motif`` (chosen before any result, issue 13's harder family) weakens the additive
# per-position and bigram terms and doubles the non-additive motif, so a token's value depends more on the others.
FAMILIES = {
    "default": {"w_local": 1.0, "w_coh": 0.5, "w_motif": 1.0, "w_div": 0.5},
    "motif": {"w_local": 0.25, "w_coh": 0.125, "w_motif": 2.0, "w_div": 0.5},
}


def check_size(vocab_size: int, seq_len: int) -> int:
    """Validate ``V`` and ``T`` and return ``V**T``; refuse sizes whose enumeration does not fit."""
    for name, value, lo in (("vocab_size", vocab_size, 2), ("seq_len", seq_len, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name}={value!r} must be an integer ≥ {lo}")
    n = vocab_size**seq_len
    if n > MAX_SEQUENCES:
        raise ValueError(
            f"vocab_size**seq_len = {vocab_size}**{seq_len} = {n:,} sequences exceeds the enumeration limit "
            f"MAX_SEQUENCES = {MAX_SEQUENCES:,}; choose a smaller vocab_size or seq_len"
        )
    return n


def all_sequences(vocab_size: int, seq_len: int) -> torch.Tensor:
    """Every sequence, ``[V**T, T]`` LongTensor, in ``itertools.product`` order."""
    n = check_size(vocab_size, seq_len)
    place = vocab_size ** torch.arange(seq_len - 1, -1, -1)
    return (torch.arange(n).unsqueeze(1) // place) % vocab_size


def sequence_index(sequences: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Flat index ``Σ_t y_t·V^(T−1−t)`` of sequences ``[..., T]`` → ``[...]``."""
    seq_len = sequences.shape[-1]
    place = vocab_size ** torch.arange(seq_len - 1, -1, -1, device=sequences.device)
    return (sequences * place).sum(-1)


@dataclass
class Task:
    """A reproducible task: reward tables from ``seed``; ``rewards`` is ``[V**T]`` in [0, 1]."""

    seed: int = 0
    vocab_size: int = 8
    seq_len: int = 6
    w_local: float = 1.0
    w_coh: float = 0.5
    w_motif: float = 1.0
    w_div: float = 0.5
    motif_len: int = 3
    q: torch.Tensor = field(init=False, repr=False)  # [T, V] per-position quality
    b: torch.Tensor = field(init=False, repr=False)  # [V, V] bigram coherence b[prev, next]
    motif: torch.Tensor = field(init=False, repr=False)  # [L] hidden target motif
    rewards: torch.Tensor = field(init=False, repr=False)  # [V**T] float64 in [0, 1]

    def __post_init__(self) -> None:
        check_size(self.vocab_size, self.seq_len)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"task seed={self.seed!r} must be an integer ≥ 0")
        for name in ("w_local", "w_coh", "w_motif", "w_div"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Task.{name}={value!r} must be a finite number ≥ 0")
        gen = torch.Generator().manual_seed(10_007 * self.seed + 1)
        V, T = self.vocab_size, self.seq_len
        self.q = torch.randn(T, V, generator=gen, dtype=torch.float64)
        self.b = torch.randn(V, V, generator=gen, dtype=torch.float64)
        self.motif = torch.randint(V, (min(self.motif_len, T),), generator=gen)
        raw = self.raw(all_sequences(V, T))
        lo, hi = raw.min(), raw.max()
        if not hi > lo:
            raise ValueError("the task's reward is constant over all sequences; raise some weight above 0")
        self.rewards = (raw - lo) / (hi - lo)

    @property
    def num_sequences(self) -> int:
        return self.vocab_size**self.seq_len

    @property
    def sequences(self) -> torch.Tensor:
        """``[V**T, T]`` every sequence (built on demand)."""
        return all_sequences(self.vocab_size, self.seq_len)

    def raw(self, seqs: torch.Tensor) -> torch.Tensor:
        """Unscaled reward of sequences ``[..., T]`` → ``[...]`` float64."""
        V, T, L = self.vocab_size, self.seq_len, self.motif.numel()
        local = self.q[torch.arange(T), seqs].sum(-1) / math.sqrt(T)
        coh = self.b[seqs[..., :-1], seqs[..., 1:]].sum(-1) / math.sqrt(T - 1)
        windows = seqs.unfold(-1, L, 1)  # [..., T−L+1, L]
        motif = (windows == self.motif).double().mean(-1).amax(-1)
        distinct = torch.nn.functional.one_hot(seqs, V).amax(-2).sum(-1).double()
        div = (distinct - 1) / (min(V, T) - 1)
        return self.w_local * local + self.w_coh * coh + self.w_motif * motif + self.w_div * div

    def reward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Exact reward in [0, 1] of sequences ``[..., T]`` (a gather from the table) → ``[...]``."""
        return self.rewards[sequence_index(seqs, self.vocab_size)]

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """``R(index)`` at flat sequence indices ``[...]`` → ``[...]`` float64 (as :meth:`RunTasks.lookup` per run)."""
        return self.rewards.take(index)


def family_task(seed: int, vocab_size: int, seq_len: int, family: str = "default") -> Task:
    """The task of ``seed`` in a family of :data:`FAMILIES` (its reward weights)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not allowed; choose one of {', '.join(map(repr, FAMILIES))}")
    return Task(seed, vocab_size, seq_len, **FAMILIES[family])
