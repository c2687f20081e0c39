"""Credit heat-maps: every token coloured by its log-ratio, text escaped, legend with units."""

from __future__ import annotations

import re

import pytest

from llm.heatmap import credit_heatmap_html


def test_tokens_coloured_by_sign_and_size():
    page = credit_heatmap_html(["p", "a", "<r>", "t"], [-2.0, 0.0, 1.0, 2.0], title="a & b")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    colours = re.findall(r'class="tok" style="background:(rgb\(\d+,\d+,\d+\))" title', page)
    assert colours == ["rgb(255,0,0)", "rgb(255,255,255)", "rgb(128,255,128)", "rgb(0,255,0)"]
    assert "&lt;r&gt;" in page and "<r>" not in page  # token text is escaped
    assert "a &amp; b" in page
    assert "nats" in page and "log p<sub>T</sub>" in page  # legend states units
    assert 'title="-2.000 nats"' in page


def test_whitespace_tokens_are_visible_and_scale_saturates():
    page = credit_heatmap_html([" ", "\n"], [5.0, -5.0], scale=1.0)
    assert "\u00b7" in page and "\u21b5" in page
    assert page.count("rgb(0,255,0)") >= 2 and page.count("rgb(255,0,0)") >= 2


def test_bad_input():
    with pytest.raises(ValueError, match="must match"):
        credit_heatmap_html(["a"], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        credit_heatmap_html(["a"], [float("nan")])
    with pytest.raises(ValueError, match="scale"):
        credit_heatmap_html(["a"], [0.1], scale=0)
