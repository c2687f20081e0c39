"""Figures from a synthetic sweep table: every figure is written (PNG+SVG), labelled, and skipped without its variation."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from sdpo_sim.plots import FIGURES, hold_fixed, with_arm, write_figures
from sdpo_sim.stats import per_seed_metrics


def synthetic_history(rhos=(0.0, 0.5, 1.0)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    arms = [("reinforce", "constant"), ("sdpo", "constant"), ("hybrid", "divergence")]
    for (method, controller), feedback, noise, rho in itertools.product(arms, ["binary", "critique"], [0.0, 0.2], rhos):
        run_id = f"{method}-{feedback}-{noise}-{rho}"
        for seed in range(3):
            for step in range(0, 31, 10):
                reward = 0.4 + 0.01 * step * (1 + rho) - noise * 0.1 + rng.normal(0, 0.01)
                rows.append({"run_id": run_id, "method": method, "controller": controller, "feedback": feedback, "noise": noise,
                             "rho": rho, "task_seed": 0, "seed": seed, "step": step, "reward": reward, "entropy": 2.0 - reward,
                             "credit_pearson": 0.2 + 0.5 * rho if method != "reinforce" else 0.1, "vocab_size": 8,
                             "alpha_mix": 1 / (1 + step / 10) if method == "hybrid" else np.nan})
    return pd.DataFrame(rows)


def test_every_figure_is_written_as_png_and_svg(tmp_path):
    history = synthetic_history()
    written = write_figures({"history": history, "seeds": per_seed_metrics(history)}, tmp_path)
    assert set(written) == set(FIGURES)
    for name, paths in written.items():
        png, svg = paths
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000, name
        text = svg.read_text()
        assert "<svg" in text and "dc:date" not in text, name
    assert "per-token entropy (nats)" in (tmp_path / "entropy_reward.svg").read_text()


def test_figures_without_their_variation_are_skipped(tmp_path):
    history = synthetic_history(rhos=(0.5,))
    history = history[history.noise == 0.0]
    written = write_figures({"history": history, "seeds": per_seed_metrics(history)}, tmp_path, names=["rho_sensitivity", "noise_robustness", "learning_curves"])
    assert set(written) == {"learning_curves"}
    with pytest.raises(ValueError, match="unknown figure"):
        write_figures({"history": history, "seeds": per_seed_metrics(history)}, tmp_path, names=["nope"])


def test_hold_fixed_keeps_the_most_common_lowest_condition():
    frame = with_arm(synthetic_history())
    kept = hold_fixed(frame, ["arm", "feedback"])
    assert set(kept.noise) == {0.0} and set(kept.rho) == {0.0} and set(kept.arm) == {"reinforce", "sdpo", "hybrid-divergence"}


def test_common_tasks_keeps_only_tasks_present_at_every_level():
    from sdpo_sim.plots import common_tasks

    frame = pd.DataFrame({"noise": [0.0, 0.0, 0.3], "task_seed": [0, 1, 0], "v": [1, 2, 3]})
    assert list(common_tasks(frame, "noise")["task_seed"]) == [0, 0]
