"""Per-token credit heat-maps: each completion token coloured by the teacher–student log-ratio.

``log_ratio_t = log p_teacher(y_t) − log p_student(y_t)`` (nats): SDPO's per-token credit. Red tokens
lose mass under distillation (the teacher with feedback avoids them), green tokens gain mass.
Optional ground-truth rows (:mod:`llm.ground_truth`: the judge's counterfactual contribution ``c_t``, the Monte Carlo
advantage ``A_t``) are drawn under the tokens, one row each, on their own colour scale.
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Optional, Sequence


def _colour(value: float, scale: float) -> str:
    """Diverging red (negative) → white (0) → green (positive), saturating at ±scale."""
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    fade = int(round(255 * (1.0 - abs(x))))
    return f"rgb({fade},255,{fade})" if x >= 0 else f"rgb(255,{fade},{fade})"


def _token_text(token: str) -> str:
    shown = token.replace("\n", "\u21b5").replace("\t", "\u21e5")
    return html.escape(shown if shown.strip() or not shown else shown.replace(" ", "\u00b7"))


def _truth_rows(tokens: list[str], truth: Mapping[str, Sequence[float]]) -> str:
    """One row per ground truth: each token's cell coloured by its value (NaN: grey, "n/a"), saturating at the row's
    max |value|; the row is labelled with its name and that scale."""
    rows = []
    for name, values in truth.items():
        values = [float(v) for v in values]
        if len(values) != len(tokens):
            raise ValueError(f"truth row {name!r} has {len(values)} values for {len(tokens)} tokens; they must match")
        if any(math.isinf(v) for v in values):
            raise ValueError(f"truth row {name!r} must be finite (or NaN where not measured) for every token")
        scale = max([abs(v) for v in values if not math.isnan(v)] + [1e-6])
        cells = "".join(
            '<span class="tok" style="background:#ddd" title="n/a">' + _token_text(t) + "</span>" if math.isnan(v) else
            f'<span class="tok" style="background:{_colour(v, scale)}" title="{v:+.3f}">{_token_text(t)}</span>'
            for t, v in zip(tokens, values))
        rows.append(f'<div class="truth"><span class="label">{html.escape(name)} (±{scale:.3g} saturates)</span>{cells}</div>')
    return "".join(rows)


def credit_heatmap_html(
    tokens: Sequence[str], log_ratio: Sequence[float], title: str = "", *, scale: Optional[float] = None,
    truth: Optional[Mapping[str, Sequence[float]]] = None,
) -> str:
    """A self-contained HTML page: ``tokens`` coloured by ``log_ratio`` (nats), with a legend.

    Args:
        tokens: ``[T]`` decoded completion tokens.
        log_ratio: ``[T]`` ``log p_T(y_t) − log p_θ(y_t)`` per token.
        title: page heading (escaped).
        scale: |log-ratio| at which colours saturate (default: max |log-ratio|, at least 1e-6).
        truth: optional ground-truth rows drawn under the tokens, name → ``[T]`` values (e.g.
            ``{"counterfactual c_t": ..., "advantage A_t": ...}``, judge-score units), each on its own scale (its max
            |value|); NaN marks a token without a value.
    """
    tokens, log_ratio = list(tokens), [float(v) for v in log_ratio]
    if len(tokens) != len(log_ratio):
        raise ValueError(f"tokens has {len(tokens)} entries but log_ratio has {len(log_ratio)}; they must match")
    if not all(math.isfinite(v) for v in log_ratio):
        raise ValueError("log_ratio must be finite for every token")
    if scale is None:
        scale = max([abs(v) for v in log_ratio] + [1e-6])
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a finite number > 0")
    spans = "".join(
        f'<span class="tok" style="background:{_colour(v, scale)}" title="{v:+.3f} nats">{_token_text(t)}</span>'
        for t, v in zip(tokens, log_ratio)
    )
    legend = "".join(
        f'<span class="tok" style="background:{_colour(v, scale)}">{v:+.2f}</span>'
        for v in (-scale, -scale / 2, 0.0, scale / 2, scale)
    )
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    truth_html = _truth_rows(tokens, truth) if truth else ""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title or 'credit heat-map')}</title>"
        "<style>body{font-family:sans-serif}.tok{font-family:monospace;font-size:16px;padding:2px 1px;"
        "margin:0 1px;border-radius:3px;white-space:pre}.legend{margin-top:12px;font-size:13px}"
        ".truth{margin-top:6px}.label{font-size:13px;display:inline-block;min-width:16em}</style>"
        f"</head><body>{heading}<div class=\"seq\">{spans}</div>{truth_html}"
        f"<div class=\"legend\">teacher − student log-probability of each token, "
        f"log p<sub>T</sub>(y<sub>t</sub>) − log p<sub>θ</sub>(y<sub>t</sub>), in nats "
        f"(red: the teacher with feedback lowers it; green: raises it): {legend}</div></body></html>\n"
    )
