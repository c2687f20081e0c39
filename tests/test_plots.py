"""Figures from a synthetic sweep table: every figure is written (PNG+SVG), labelled, and skipped without its variation."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D

from sdpo_sim.plots import (
    ARM_COLORS,
    FEEDBACK_COLORS,
    FIGURES,
    common_tasks,
    fig_performance_profile,
    hold_fixed,
    with_arm,
    write_figures,
)
from sdpo_sim.stats import per_seed_metrics, performance_profile

UNEVEN_NOISE = (0.0, 0.1, 0.3)  # unevenly spaced, so a categorical axis would misplace 0.1


def synthetic_history(rhos=(0.0, 0.5, 1.0), noises=(0.0, 0.2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    arms = [("reinforce", "constant"), ("sdpo", "constant"), ("hybrid", "divergence")]
    for (method, controller), feedback, noise, rho in itertools.product(arms, ["binary", "critique"], noises, rhos):
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
    frame = pd.DataFrame({"noise": [0.0, 0.0, 0.3], "task_seed": [0, 1, 0], "v": [1, 2, 3]})
    assert list(common_tasks(frame, "noise")["task_seed"]) == [0, 0]


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    history = synthetic_history(noises=UNEVEN_NOISE)
    return history, per_seed_metrics(history)


@pytest.fixture(scope="module")
def figures(tables):
    history, seeds = tables
    drawn = {name: draw(history, seeds) for name, draw in FIGURES.items()}
    yield drawn
    for fig in drawn.values():
        if fig is not None:
            plt.close(fig)


def _colour(artist) -> str:
    return to_hex(artist.get_color() if isinstance(artist, Line2D) else artist.get_facecolor()[0])


def legend_colours(fig: plt.Figure) -> dict[str, str]:
    """``{legend label: colour}`` of the figure's legend (seaborn puts a grid's legend on the figure)."""
    legend = fig.legends[0] if fig.legends else fig.axes[0].get_legend()
    return {text.get_text(): _colour(handle) for text, handle in zip(legend.texts, legend.legend_handles)}


def test_every_panel_of_every_figure_has_a_visible_y_label(figures):
    assert all(fig is not None for fig in figures.values()), [n for n, f in figures.items() if f is None]
    for name, fig in figures.items():
        for i, ax in enumerate(fig.axes):
            assert ax.get_ylabel().strip() and ax.yaxis.label.get_visible(), (name, i)
    profile = figures["performance_profile"].axes
    assert {ax.get_ylabel() for ax in profile} == {"fraction of runs with final J > τ"}
    assert {ax.get_xlabel() for ax in profile} == {"τ (final exact reward)"}


def test_a_method_has_the_same_colour_in_every_figure(figures):
    by_method = ["learning_curves", "entropy_reward", "noise_robustness", "hybrid_alpha", "performance_profile"]
    for name in by_method:
        legend = legend_colours(figures[name])
        assert legend == {arm: ARM_COLORS[arm] for arm in legend}, name
    assert legend_colours(figures["learning_curves"])["sdpo"] == legend_colours(figures["noise_robustness"])["sdpo"]
    for name in ("learning_curves", "noise_robustness", "performance_profile"):  # the drawn lines, not only the legend
        drawn = {_colour(line) for ax in figures[name].axes for line in ax.lines}
        assert drawn <= set(legend_colours(figures[name]).values()), name
    # coloured by feedback: the feedback palette, and the methods in separate panels
    for name in ("credit_correlation", "rho_sensitivity"):
        legend = legend_colours(figures[name])
        assert legend == {fb: FEEDBACK_COLORS[fb] for fb in ("binary", "critique")}, name
    titles = [ax.get_title() for ax in figures["credit_correlation"].axes]
    assert titles == ["arm = reinforce", "arm = sdpo", "arm = hybrid-divergence"]


def test_noise_and_rho_sit_at_their_numeric_values(figures):
    for name, values in (("noise_robustness", UNEVEN_NOISE), ("credit_correlation", UNEVEN_NOISE), ("rho_sensitivity", (0.0, 0.5, 1.0))):
        for ax in figures[name].axes:
            np.testing.assert_allclose(ax.get_xticks(), values, err_msg=name)
            assert ax.lines, name
            for line in ax.lines:
                if len(line.get_xdata()) > 2:  # the drawn means (not a reference line across the panel)
                    np.testing.assert_allclose(np.asarray(line.get_xdata(), dtype=float), values, err_msg=name)


def test_performance_profile_uses_block_main_and_the_stats_profile(tables):
    _, seeds = tables
    seeds = pd.concat([seeds.assign(block="main"), seeds.assign(block="other", final_reward=5.0)], ignore_index=True)
    fig = fig_performance_profile(pd.DataFrame(), seeds)
    try:
        panel = next(ax for ax in fig.axes if ax.get_title() == "feedback = binary")
        line = next(line for line in panel.lines if _colour(line) == ARM_COLORS["sdpo"])
        tau = np.asarray(line.get_xdata(), dtype=float)
        held = hold_fixed(with_arm(seeds[seeds.block == "main"]), ["arm", "feedback"])
        runs = held[(held.arm == "sdpo") & (held.feedback == "binary")]["final_reward"]
        assert len(runs) == 3 and tau.max() < 5.0  # block "other" left out
        np.testing.assert_allclose(line.get_ydata(), performance_profile(runs, tau))
        assert line.get_ydata()[0] == 1.0 and line.get_ydata()[-1] == 0.0
    finally:
        plt.close(fig)
