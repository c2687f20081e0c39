"""Predicted vs observed (sdpo_sim/transfer.py): Kendall τ and sign agreement on hand data, reading an sdpo-llm grid
directory, and a small end-to-end study: the tiny LLM trained by ``sdpo-llm grid`` (1 step per point) and the toy side
(``sdpo-sim calibrate --scale small``) reading its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from llm.grid import run_grid
from sdpo_sim.transfer import bootstrap_tau, kendall_tau, pairwise_differences, per_seed, read_llm_grid, sign_agreement

REPO = Path(__file__).resolve().parent.parent
CREDIT_TRUTH = REPO / "studies" / "calibration" / "credit_truth.json"  # the committed LLM measurement


def test_kendall_tau_on_hand_computed_ranks():
    # 6 pairs of (1,2,3,4) vs (1,3,2,4): only (2,3) is discordant, τ = (5 − 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6, abs=1e-12)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    # τ_b with a tie in y: concordant 2, discordant 0, ties in y 1 → 2 / sqrt(3 · 2)
    assert kendall_tau([1, 2, 3], [1, 2, 2]) == pytest.approx(2 / np.sqrt(6), abs=1e-12)


def test_sign_agreement_on_hand_data():
    assert sign_agreement([1.0, -1.0, 0.5, 0.0], [2.0, 1.0, 0.1, 0.0]) == 0.75  # agree, disagree, agree, both zero
    assert sign_agreement([0.0], [0.1]) == 0.0


def _seeds(values: dict) -> pd.DataFrame:
    """Per-seed rows of points (method, feedback, noise) from {(method, feedback, noise): [auc per seed]}."""
    return pd.DataFrame([{"method": m, "feedback": f, "noise": n, "seed": s, "auc": v, "final_reward": v, "entropy": v}
                         for (m, f, n), vs in values.items() for s, v in enumerate(vs)])


def test_pairwise_differences_and_tau_on_hand_data():
    llm = _seeds({("sdpo", "binary", 0.0): [0.5, 0.7], ("grpo", "binary", 0.0): [0.2, 0.4], ("hybrid", "binary", 0.0): [0.7, 0.9]})
    toy = _seeds({("sdpo", "binary", 0.0): [0.3], ("grpo", "binary", 0.0): [0.1], ("hybrid", "binary", 0.0): [0.2]})
    d = pairwise_differences(llm, toy, "auc").set_index("pair")
    assert d.loc["sdpo − grpo", "llm"] == pytest.approx(0.3) and d.loc["sdpo − grpo", "toy"] == pytest.approx(0.2)
    assert d.loc["sdpo − grpo", "llm_se"] == pytest.approx(np.sqrt(0.02 / 2 + 0.02 / 2))  # s² = 0.02 for both pairs of seeds
    assert list(d.agree) == [True, True, False]  # sdpo−grpo +/+, hybrid−grpo +/+, sdpo−hybrid −/+
    res = bootstrap_tau(llm, toy, "auc", n_boot=200)
    assert res["tau"] == pytest.approx(1 / 3) and res["points"] == 3  # means llm (0.6, 0.3, 0.8) vs toy (0.3, 0.1, 0.2)
    assert -1 <= res["ci_lo"] <= res["ci_hi"] <= 1


def test_per_seed_metrics_of_a_curve():
    long = pd.DataFrame({"method": "sdpo", "feedback": "binary", "noise": 0.0, "seed": 0, "step": [0, 1, 2, 3],
                         "reward": [0.1, 0.2, 0.4, 0.9], "entropy": [2.0, 1.5, 1.0, 0.1]})
    row = per_seed(long, [1, 2, 3]).iloc[0]  # rollouts 1..3: auc = mean(0.2, 0.4, 0.9), final = 0.9
    assert row.auc == pytest.approx(0.5) and row.final_reward == 0.9 and row.entropy == 0.1


def test_read_llm_grid_refuses_a_directory_without_runs(tmp_path):
    with pytest.raises(ValueError, match="not an sdpo-llm grid directory"):
        read_llm_grid(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="no finished runs"):
        read_llm_grid(tmp_path)


@pytest.mark.usefixtures("one_thread")
def test_small_end_to_end_study(tmp_path, tiny_dir):
    """LLM side: 2 methods × 1 channel × 2 noise levels × 1 seed, 2 steps each on the tiny random model; toy side:
    the small scale. Both worlds' files are written and the agreement is computed over the 4 points."""
    spec = {"name": "e2e", "base": "tiny-cpu",
            "set": {"model.path": str(tiny_dir), "training.steps": 2, "training.prompts_per_step": 2, "training.max_new_tokens": 6,
                    "training.save_every": 0, "training.heatmap_every": 0, "training.feedback_credit_every": 0, "method.num_generations": 3,
                    "context.max_context_tokens": 200, "context.use_demo": False},
            "grid": {"method.name": ["sdpo", "grpo"], "task.feedback": ["critique"], "task.noise": [0.0, 0.3]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    res = run_grid(tmp_path / "grid.yaml", tmp_path / "llm", progress=False)
    assert res["ok"] == 4
    long, blocks = read_llm_grid(tmp_path / "llm")
    assert sorted(blocks) == ["grpo", "sdpo"] and sorted(long.step.unique()) == [1, 2] and set(long.noise) == {0.0, 0.3}
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, "-m", "sdpo_sim", "calibrate", "--credit-truth", str(CREDIT_TRUTH), "--llm-grid", str(tmp_path / "llm"),
                           "--out", str(out), "--scale", "small", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((out / "calibration.json").read_text())
    t = payload["transfer"]
    assert t["llm_points"] == 4 and t["steps"] == 2 and {k["metric"] for k in t["kendall"]} == {"auc", "final_reward", "entropy"}
    assert all(-1 <= k["tau"] <= 1 for k in t["kendall"] if k["tau"] is not None)
    assert {s["pairs"] for s in t["signs"]} == {2}  # sdpo − grpo at 2 noise levels (no hybrid in this grid)
    for name in ("CALIBRATION.md", "curves.csv", "transfer_pairwise.csv", "figures/calibration_curves.png", "figures/calibration_transfer.png"):
        assert (out / name).is_file(), name
