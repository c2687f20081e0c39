"""Tabular policies, vectorised over many independent runs (docs/design.md §3).

Parameters ``θ`` have shape ``[runs, T, C, V]``: ``C = V`` contexts for ``markov`` (``θ[t, y_{t−1}, v]``;
position 0 uses context 0) and ``C = 1`` for ``factored`` (``θ[t, v]``). Logits are ``θ / temperature``.
"""

from __future__ import annotations

import torch

POLICIES = ("markov", "factored")


class TabularPolicy:
    """Stateless maps between a parameter tensor ``θ [runs, T, C, V]`` and the quantities losses need."""

    def __init__(self, kind: str = "markov", vocab_size: int = 8, seq_len: int = 6, temperature: float = 1.0) -> None:
        if kind not in POLICIES:
            raise ValueError(f"policy={kind!r} is not allowed; choose one of {', '.join(map(repr, POLICIES))}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        self.kind, self.vocab_size, self.seq_len, self.temperature = kind, vocab_size, seq_len, temperature
        self.num_contexts = vocab_size if kind == "markov" else 1

    def init_params(self, runs: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform initial policy: ``θ = 0``, ``[runs, T, C, V]``."""
        return torch.zeros(runs, self.seq_len, self.num_contexts, self.vocab_size, dtype=dtype)

    def contexts(self, sequences: torch.Tensor) -> torch.Tensor:
        """Context index of every position, ``[runs, B, T]``: ``y_{t−1}`` (markov, t ≥ 1) else 0."""
        if self.kind == "factored":
            return torch.zeros_like(sequences)
        return torch.cat([torch.zeros_like(sequences[..., :1]), sequences[..., :-1]], dim=-1)

    def logits(self, theta: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """Per-position logits of given sequences ``[runs, B, T]`` → ``[runs, B, T, V]`` (differentiable):
        row ``θ[r, t, ctx_t]`` for every token, read as rows of ``θ`` flattened to ``[runs·T·C, V]`` (one
        ``index_select``: the same values and gradient as indexing ``θ[r, t, ctx]``, several times faster)."""
        runs = torch.arange(sequences.shape[0]).view(-1, *([1] * (sequences.dim() - 1)))
        row = (runs * self.seq_len + torch.arange(self.seq_len)) * self.num_contexts + self.contexts(sequences)
        rows = theta.reshape(-1, self.vocab_size).index_select(0, row.reshape(-1))
        return rows.view(*sequences.shape, self.vocab_size) / self.temperature

    def sample(self, theta: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Sample sequences by inverse CDF from uniforms ``[runs, B, T]`` → LongTensor ``[runs, B, T]``."""
        runs, batch, _ = uniforms.shape
        probs = torch.softmax(theta.detach().double() / self.temperature, dim=-1)  # [runs, T, C, V]
        cdf = probs.cumsum(-1).view(-1, self.vocab_size)  # rows (run, t, c)
        run_row = (torch.arange(runs) * self.seq_len).view(-1, 1)
        ctx = torch.zeros(runs, batch, dtype=torch.long)
        tokens = []
        for t in range(self.seq_len):
            c = cdf.index_select(0, ((run_row + t) * self.num_contexts + ctx).view(-1)).view(runs, batch, -1)  # [runs, B, V]
            tok = (c < uniforms[..., t : t + 1]).sum(-1).clamp(max=self.vocab_size - 1)
            tokens.append(tok)
            if self.kind == "markov":
                ctx = tok
        return torch.stack(tokens, dim=-1)

    def conditionals(self, theta: torch.Tensor) -> torch.Tensor:
        """``π_t(v | c) = softmax(θ[t, c] / temperature)`` ``[runs, T, C, V]``."""
        return torch.softmax(theta / self.temperature, dim=-1)

    def seq_logprobs(self, theta: torch.Tensor) -> torch.Tensor:
        """Log-probability of every sequence (``itertools.product`` order), ``[runs, V**T]``.

        ``log π(y) = Σ_t log softmax(θ[t, ctx_t])[y_t]``, built one position at a time.
        """
        V = self.vocab_size
        logpi = torch.log_softmax(theta / self.temperature, dim=-1)  # [runs, T, C, V]
        runs = theta.shape[0]
        table = logpi[:, 0, 0, :]  # [runs, V]
        for t in range(1, self.seq_len):
            if self.kind == "markov":  # the last token of prefix p is p % V
                step = table.view(runs, -1, V, 1) + logpi[:, t].unsqueeze(1)  # [runs, V**(t−1), V, V]
            else:
                step = table.unsqueeze(-1) + logpi[:, t, 0].unsqueeze(1)  # [runs, V**t, V]
            table = step.reshape(runs, -1)
        return table
