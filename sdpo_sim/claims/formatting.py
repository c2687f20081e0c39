"""How a number is written in the claims report and in the claims' notes: one rule for both."""

from __future__ import annotations

import math
from typing import Optional


def fmt(x: Optional[float], pct: bool = False, signed: bool = False) -> str:
    """``0.734``; ``+0.150`` when ``signed``; ``15.0%`` / ``+15.0%`` when ``pct``; ``n/a`` for ``None``, NaN or inf."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if pct:
        return f"{x:+.1%}" if signed else f"{x:.1%}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"
