"""CI-scale proof that the LLM path learns on CPU: a tiny pretrained model, trained with SDPO
through the real trainer, gains held-out reward by a margin well above seed noise."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from llm.proof import preset, run_proof, summarise, write_outputs  # noqa: E402


def test_summarise_gain_and_standard_error():
    s = summarise({"sdpo": [0.6, 0.7, 0.8]}, initial=0.5)["sdpo"]
    assert s["gain"] == pytest.approx(0.2) and s["gain_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert s["gain_over_se"] == pytest.approx(0.2 / (0.1 / 3 ** 0.5))


def test_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        preset("huge")


@pytest.mark.slow
def test_ci_scale_proof_learns(tmp_path):
    cfg = preset("ci")
    result = run_proof(tmp_path / "work", cfg, progress=False)
    # The pretraining gave a real in-context ability: feedback on its own attempt makes the model better.
    assert result["initial_with_feedback"] > result["initial"] + 0.05
    for method, s in result["summary"].items():
        # mean over seeds of (final − initial) held-out reward > 3 × its standard error, and a real size
        assert s["gain"] > 3 * s["gain_se"], (method, s)
        assert s["gain"] > 0.03, (method, s)
    paths = write_outputs(result, tmp_path / "fig")
    assert {p.suffix for p in paths} == {".csv", ".json", ".png", ".svg", ".html"}
    assert "nats" in (tmp_path / "fig" / "llm_proof_credit_heatmap.html").read_text()
    summary = json.loads((tmp_path / "fig" / "llm_proof_summary.json").read_text())
    assert set(summary["summary"]) == set(cfg.methods)
