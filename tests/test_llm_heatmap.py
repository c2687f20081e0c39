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


def test_ground_truth_rows_under_the_tokens():
    truth = {"counterfactual c_t": [0.5, -0.25, float("nan")], "advantage A_t": [-0.1, 0.0, 0.2]}
    page = credit_heatmap_html(["a", "<b>", "c"], [1.0, -1.0, 0.0], truth=truth)
    rows = re.findall(r'<div class="truth">(.*?)</div>', page)
    assert len(rows) == 2 and "counterfactual c_t (±0.5 saturates)" in rows[0] and "advantage A_t (±0.2 saturates)" in rows[1]
    # each row on its own scale: c_t saturates at 0.5 (green), −0.25 is half red; NaN is grey "n/a"
    assert re.findall(r'background:(rgb\(\d+,\d+,\d+\))" title="([^"]+)"', rows[0]) == [
        ("rgb(0,255,0)", "+0.500"), ("rgb(255,128,128)", "-0.250")]
    assert 'background:#ddd" title="n/a"' in rows[0] and "&lt;b&gt;" in rows[0]
    assert re.findall(r'background:(rgb\(\d+,\d+,\d+\))"', rows[1]) == ["rgb(255,128,128)", "rgb(255,255,255)", "rgb(0,255,0)"]
    assert 'class="truth"' not in credit_heatmap_html(["a"], [0.1])  # optional: no rows unless given


def test_ground_truth_rows_bad_input():
    with pytest.raises(ValueError, match="truth row 'c_t' has 1 values for 2 tokens"):
        credit_heatmap_html(["a", "b"], [0.1, 0.2], truth={"c_t": [0.1]})
    with pytest.raises(ValueError, match="finite"):
        credit_heatmap_html(["a"], [0.1], truth={"c_t": [float("inf")]})
