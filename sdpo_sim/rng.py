"""Counter-based random numbers, one independent stream per training seed.

A run's draws depend only on ``(seed, stream, step, position)``, never on how many runs share the
tensor: seed 3 gives the same trajectory whether it runs alone or as one of 64. The generator is a
SplitMix64 hash of the counter (Steele et al., 2014) written with int64 tensor ops.
"""

from __future__ import annotations

import math

import torch

# Named streams keep different uses of randomness independent.
SAMPLE, NOISE, HINT_NOISE, NULL_PICK = 1, 2, 3, 4

_MASK = {k: (1 << (64 - k)) - 1 for k in (27, 30, 31, 11)}


def _as_signed(x: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN, _M1, _M2 = (_as_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & _MASK[k]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser: z ^= z>>30; z *= M1; z ^= z>>27; z *= M2; z ^= z>>31 (wrapping int64)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniforms in (0, 1), float64, shape ``[runs, *shape]``; run ``r`` uses seed ``seeds[r]``."""
    n = math.prod(shape)
    counter = torch.tensor([stream * 1_000_003 + step], dtype=torch.long)
    key = _mix(_mix(seeds.long().view(-1, 1) * _GOLDEN + counter) + counter * _M1)
    bits = _mix(key + (torch.arange(n, dtype=torch.long).view(1, -1) + 1) * _GOLDEN)
    u = (_shr(bits, 11).double() + 0.5) / float(1 << 53)
    return u.view(seeds.numel(), *shape)


def normal(seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normals (Box–Muller on two uniforms), float64, shape ``[runs, *shape]``."""
    u = uniform(seeds, stream, step, (2, *shape))
    return torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
