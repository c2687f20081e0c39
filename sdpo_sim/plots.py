"""Publication figures from a sweep's tidy tables (seaborn; PNG + SVG into ``figures/``).

Each ``fig_*`` function takes the tables, picks the rows it needs and returns a matplotlib figure,
or ``None`` when the sweep lacks the variation it shows (e.g. no rho grid → no rho figure). Rows
that differ in a condition the figure does not show are held at that condition's most common value
(lowest on ties): e.g. learning curves are drawn at the lowest noise level of the sweep.
Figures along noise or rho keep only the task seeds present at every level, so every point averages
the same tasks. Bands and error bars are 95% bootstrap CIs over (task seed, seed) units (seeded: a
figure drawn twice from the same tables is the same).

Three rules hold in every figure: each method (arm) has one colour (:data:`ARM_COLORS`) and each
feedback type one colour (:data:`FEEDBACK_COLORS`), so a legend reads the same everywhere, and a
figure coloured by feedback puts its methods in separate panels; noise σ and ρ are numeric axes
(lines through the measured values, ticks at them, never a categorical axis that spaces 0.1 and 0.3
like neighbours); every panel's y axis is labelled, the inner panels of a grid included.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .core.io import atomic_write, check_output_dir  # noqa: E402
from .stats import performance_profile  # noqa: E402

# conditions a figure either shows or holds fixed (arm = method, with the hybrid controller)
FACTORS = ("arm", "feedback", "noise", "rho", "teacher", "beta", "hint_noise", "policy", "alpha", "support", "teacher_kind", "family",
           "optimizer", "vocab_size", "seq_len", "steps", "batch_size", "num_generations")
FEEDBACK_ORDER = ("binary", "ordinal", "continuous", "critique", "demo")
ARM_ORDER = ("reinforce", "grpo", "sdpo", "hybrid-constant", "hybrid-divergence", "hybrid-entropy")
LABELS = {
    "reward": "exact expected reward J (0–1)",
    "final_reward": "final exact reward J (0–1)",
    "entropy": "per-token entropy (nats)",
    "step": "training step",
    "credit_corr": "credit correlation with A* (Pearson r)",
    "noise": "feedback noise σ (reward units)",
    "alpha_mix": "alpha_mix (weight on SDPO)",
    "rho": "teacher self-knowledge ρ",
    "tau": "τ (final exact reward)",
    "profile": "fraction of runs with final J > τ",
}
CI = ("ci", 95)
BOOT_SEED = 0  # seaborn's bootstrap of the CIs: fixed, so the same tables give the same figure
# one colour per method in every figure (seaborn "colorblind"); "hybrid" is the arm when no controller column exists
ARM_COLORS = {"reinforce": "#0173b2", "grpo": "#de8f05", "sdpo": "#029e73", "hybrid-constant": "#cc78bc",
              "hybrid-divergence": "#d55e00", "hybrid-entropy": "#ca9161", "hybrid": "#949494",
              # the variants study's arms (sdpo_sim.variants_study.ARMS): distinct from the methods above and from each other
              "blend": "#56b4e9", "srpo": "#ece133", "sc-sdpo": "#fbafe4", "sdpg": "#8c613c", "forward-ce": "#4b0082", "ref-kl": "#dc143c"}
# one colour per feedback type, in order of richness (seaborn "mako"); distinct from the method colours
FEEDBACK_COLORS = {"binary": "#332345", "ordinal": "#40498e", "continuous": "#357ba3", "critique": "#38aaac", "demo": "#79d6ae"}
SPARE_COLORS = ("#fbafe4", "#ece133", "#56b4e9", "#8c613c", "#dc143c", "#4b0082")  # names outside the fixed palettes


def with_arm(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``arm``: the method, and for hybrid its controller (``hybrid-divergence``)."""
    if frame.empty or "method" not in frame:
        return frame
    arm = frame["method"].astype(str)
    if "controller" in frame:
        arm = arm.where(frame["method"] != "hybrid", "hybrid-" + frame["controller"].astype(str))
    return frame.assign(arm=arm)


def hold_fixed(frame: pd.DataFrame, show: Sequence[str]) -> pd.DataFrame:
    """Keep rows at the most common value (lowest on ties) of every factor not in ``show``."""
    for col in FACTORS:
        if col in show or col not in frame or frame[col].nunique(dropna=False) <= 1:
            continue
        counts = frame[col].value_counts(dropna=False)
        best = sorted(counts[counts == counts.max()].index, key=lambda v: (str(type(v)), v))[0]
        frame = frame[frame[col] == best]
    return frame


def common_tasks(frame: pd.DataFrame, col: str) -> pd.DataFrame:
    """Keep the task seeds present at every value of ``col``, so each point averages the same tasks."""
    if "task_seed" not in frame or col not in frame or frame.empty:
        return frame
    per_value = frame.groupby(col)["task_seed"].agg(lambda t: set(t))
    shared = set.intersection(*per_value) if len(per_value) else set()
    return frame[frame["task_seed"].isin(shared)]


def _order(values: Sequence, preferred: Sequence) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + sorted(v for v in present if v not in preferred)


def _varies(frame: pd.DataFrame, col: str) -> bool:
    return col in frame and frame[col].nunique() > 1


def palette(values: Sequence, fixed: dict[str, str]) -> dict[str, str]:
    """``{value: colour}`` from a fixed palette; a value outside it gets a spare colour chosen by its name's CRC-32,
    so it too has the same colour in every figure whatever else the figure shows."""
    return {v: fixed.get(str(v), SPARE_COLORS[zlib.crc32(str(v).encode()) % len(SPARE_COLORS)]) for v in dict.fromkeys(values)}


def _arm_hue(frame: pd.DataFrame) -> dict:
    """seaborn keywords colouring by method: ``hue="arm"``, its order and the fixed method palette."""
    order = _order(frame["arm"], ARM_ORDER)
    return {"hue": "arm", "hue_order": order, "palette": palette(order, ARM_COLORS)}


def _feedback_hue(frame: pd.DataFrame) -> dict:
    """seaborn keywords colouring by feedback type: ``hue="feedback"``, its order and the fixed feedback palette."""
    order = _order(frame["feedback"], FEEDBACK_ORDER)
    return {"hue": "feedback", "hue_order": order, "palette": palette(order, FEEDBACK_COLORS)}


def _label_every_y(grid: sns.FacetGrid, labels: Union[str, Sequence[str]]) -> None:
    """Put a label on the y axis of every panel (one for all, or one per panel in ``grid.axes.flat`` order), shown even
    where seaborn hid it (the inner panels of a shared-y grid), and re-fit the layout so labels do not overlap panels."""
    axes = list(grid.axes.flat)
    labels = [labels] * len(axes) if isinstance(labels, str) else list(labels)
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)
        ax.yaxis.label.set_visible(True)
    grid.tight_layout()


def _numeric_ticks(grid: sns.FacetGrid, values: Sequence[float]) -> None:
    """x ticks at the measured values of a numeric condition (noise σ, ρ) on every panel."""
    ticks = sorted(set(float(v) for v in values))
    for ax in grid.axes.flat:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def _finish(grid, title: str, x: str, y: str) -> plt.Figure:
    grid.set_axis_labels(LABELS.get(x, x), LABELS.get(y, y))
    _label_every_y(grid, LABELS.get(y, y))
    grid.figure.suptitle(title, y=1.02)
    return grid.figure


def fig_learning_curves(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """Reward vs step per feedback type, one line per method (mean and 95% CI over seeds)."""
    h = hold_fixed(with_arm(history), ["arm", "feedback"])
    if h.empty or "feedback" not in h:
        return None
    g = sns.relplot(data=h, x="step", y="reward", **_arm_hue(h), col="feedback", col_order=_order(h.feedback, FEEDBACK_ORDER),
                    kind="line", errorbar=CI, seed=BOOT_SEED, height=3, aspect=1.1, col_wrap=min(4, h.feedback.nunique()),
                    facet_kws={"sharey": True})
    return _finish(g, f"Learning curves (noise σ={_fixed(h, 'noise')}, {len(h.groupby(['task_seed', 'seed']))} task×seed units)", "step", "reward")


def fig_credit_correlation(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """Credit correlation with the exact advantage, by feedback type × noise, per method.

    With a noise grid: one panel per method, one line per feedback type along the numeric σ axis; without one,
    feedback types on a categorical x axis (they are categories), one colour per method.
    """
    s = common_tasks(hold_fixed(with_arm(seeds), ["arm", "feedback", "noise"]), "noise")
    if s.empty or not s["credit_corr"].notna().any():
        return None
    if _varies(s, "noise"):
        g = sns.relplot(data=s, x="noise", y="credit_corr", **_feedback_hue(s), col="arm", col_order=_order(s.arm, ARM_ORDER),
                        kind="line", marker="o", err_style="bars", errorbar=CI, seed=BOOT_SEED, height=3, aspect=1.1)
        _numeric_ticks(g, s["noise"])
    else:
        g = sns.catplot(data=s, x="feedback", y="credit_corr", order=_order(s.feedback, FEEDBACK_ORDER), **_arm_hue(s), kind="point",
                        errorbar=CI, seed=BOOT_SEED, dodge=0.3, height=3, aspect=1.1)
    for ax in g.axes.flat:
        ax.axhline(0.70, color="grey", ls=":", lw=1)
        ax.axhline(0.0, color="black", lw=0.5)
    return _finish(g, "Credit correlation with the exact advantage A* (dotted: the study's 0.70)", "noise" if _varies(s, "noise") else "feedback", "credit_corr")


def fig_entropy_reward(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """Entropy–reward frontier: the mean (reward, entropy) trajectory of each method, per feedback type."""
    h = hold_fixed(with_arm(history), ["arm", "feedback"])
    if h.empty:
        return None
    traj = h.groupby(["feedback", "arm", "step"], as_index=False)[["reward", "entropy"]].mean()
    g = sns.relplot(data=traj, x="reward", y="entropy", **_arm_hue(traj), col="feedback", col_order=_order(traj.feedback, FEEDBACK_ORDER),
                    kind="line", sort=False, marker="o", markersize=3, height=3, aspect=1.1, col_wrap=min(4, traj.feedback.nunique()))
    if "vocab_size" in h:
        for ax in g.axes.flat:
            ax.axhline(math.log(int(h["vocab_size"].iloc[0])), color="grey", ls=":", lw=1)
    return _finish(g, "Entropy–reward frontier (each line starts at step 0; dotted: maximal entropy ln V)", "reward", "entropy")


def fig_noise_robustness(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """Final reward vs feedback noise (numeric σ axis, ticks at the measured levels), per feedback type and method."""
    s = common_tasks(hold_fixed(with_arm(seeds), ["arm", "feedback", "noise"]), "noise")
    if s.empty or not _varies(s, "noise"):
        return None
    g = sns.relplot(data=s, x="noise", y="final_reward", **_arm_hue(s), col="feedback", col_order=_order(s.feedback, FEEDBACK_ORDER),
                    kind="line", marker="o", err_style="bars", errorbar=CI, seed=BOOT_SEED, height=3, aspect=1.1,
                    col_wrap=min(4, s.feedback.nunique()))
    _numeric_ticks(g, s["noise"])
    return _finish(g, "Noise robustness: final reward vs feedback noise", "noise", "final_reward")


def fig_hybrid_alpha(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """alpha_mix trajectories of the hybrid controllers."""
    h = with_arm(history)
    if h.empty or "method" not in h:
        return None
    h = hold_fixed(h[h["method"] == "hybrid"], ["arm", "feedback"])
    if h.empty or not h["alpha_mix"].notna().any():
        return None
    g = sns.relplot(data=h, x="step", y="alpha_mix", **_arm_hue(h), col="feedback", col_order=_order(h.feedback, FEEDBACK_ORDER),
                    kind="line", errorbar=CI, seed=BOOT_SEED, height=3, aspect=1.1,
                    col_wrap=min(4, h.feedback.nunique()))
    for ax in g.axes.flat:
        ax.set_ylim(-0.02, 1.02)
    return _finish(g, "Hybrid: alpha_mix over training", "step", "alpha_mix")


def fig_rho_sensitivity(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """Final reward and credit correlation vs the teacher's self-knowledge rho (numeric axis), per feedback type.

    One method only (SDPO when the sweep has it, else the most common arm), so colouring by feedback mixes no methods.
    """
    s = with_arm(seeds)
    if "arm" in s and (s["arm"] == "sdpo").any():
        s = s[s["arm"] == "sdpo"]  # the teacher's self-knowledge matters most where it is used alone
    s = common_tasks(hold_fixed(s, ["rho", "feedback"]), "rho")
    if s.empty or not _varies(s, "rho"):
        return None
    metrics = {"final_reward": LABELS["final_reward"], "credit_corr": LABELS["credit_corr"]}
    long = s.melt(id_vars=["rho", "feedback"], value_vars=list(metrics), var_name="metric", value_name="value")
    long["metric"] = long["metric"].map(metrics)
    g = sns.relplot(data=long, x="rho", y="value", **_feedback_hue(long), col="metric", col_order=list(metrics.values()), kind="line",
                    marker="o", err_style="bars", errorbar=CI, seed=BOOT_SEED, height=3, aspect=1.2, facet_kws={"sharey": False})
    g.set_titles("{col_name}")
    g.set_axis_labels(LABELS["rho"], "")
    _numeric_ticks(g, s["rho"])
    _label_every_y(g, list(metrics.values()))
    g.figure.suptitle(f"Sensitivity to the teacher's self-knowledge ρ ({s['arm'].iloc[0] if 'arm' in s else 'all runs'})", y=1.02)
    return g.figure


def fig_performance_profile(history: pd.DataFrame, seeds: pd.DataFrame) -> Optional[plt.Figure]:
    """Performance profiles of block ``main`` (the whole sweep without a block column): per feedback type, one line per
    method, ``P(τ) = (1/N) Σ_i [J_i > τ]`` over the method's N (task seed, seed) final rewards ``J_i``.

    ``P`` is a step function falling at each run's final reward; it is drawn exactly (steps at every distinct final
    reward, τ from just below the lowest to the highest). One method dominates another where its curve lies above.
    """
    s = with_arm(seeds)
    where = "all runs"
    if "block" in s and (s["block"] == "main").any():
        s, where = s[s["block"] == "main"], "block main"
    s = hold_fixed(s, ["arm", "feedback"])
    if s.empty or "arm" not in s or "final_reward" not in s or not s["final_reward"].notna().any():
        return None
    values = np.sort(s["final_reward"].dropna().unique())
    span = float(values[-1] - values[0]) or 1.0
    taus = np.concatenate([[values[0] - 0.05 * span], values])
    panels = ["feedback"] if "feedback" in s else []
    rows = [pd.DataFrame({**dict(zip(panels + ["arm"], key if isinstance(key, tuple) else (key,))), "tau": taus,
                          "profile": performance_profile(runs["final_reward"], taus)})
            for key, runs in s.groupby(panels + ["arm"], sort=False)]
    prof = pd.concat(rows, ignore_index=True)
    g = sns.relplot(data=prof, x="tau", y="profile", **_arm_hue(prof), col=panels[0] if panels else None,
                    col_order=_order(prof.feedback, FEEDBACK_ORDER) if panels else None, kind="line", drawstyle="steps-post",
                    errorbar=None, height=3, aspect=1.1, col_wrap=min(4, prof.feedback.nunique()) if panels else None)
    for ax in g.axes.flat:
        ax.set_ylim(-0.02, 1.02)
    n = s.groupby(panels + ["arm"]).size()
    count = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
    return _finish(g, f"Performance profiles ({where}; {count} task×seed runs per method and feedback)", "tau", "profile")


FIGURES: dict[str, Callable[[pd.DataFrame, pd.DataFrame], Optional[plt.Figure]]] = {
    "learning_curves": fig_learning_curves,
    "credit_correlation": fig_credit_correlation,
    "entropy_reward": fig_entropy_reward,
    "noise_robustness": fig_noise_robustness,
    "hybrid_alpha": fig_hybrid_alpha,
    "rho_sensitivity": fig_rho_sensitivity,
    "performance_profile": fig_performance_profile,
}


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg`` atomically, with stable SVG ids and no timestamps."""
    paths = []
    for ext in ("png", "svg"):
        path = stem.with_suffix(f".{ext}")
        metadata = {"Date": None} if ext == "svg" else {"Software": None}
        atomic_write(path, lambda tmp, ext=ext, md=metadata: fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=md))
        paths.append(path)
    plt.close(fig)
    return paths


def write_figures(tables: Union[dict, Sequence[dict]], out: Union[str, Path] = "figures", *, names: Optional[Sequence[str]] = None,
                  prefix: str = "") -> dict[str, list[Path]]:
    """Draw every figure the tables support; returns ``{name: [png, svg]}`` (skipped figures absent).

    ``tables``: a sweep's tables (``{"history": ..., "seeds": ...}``) or several, concatenated.
    """
    if isinstance(tables, dict):
        tables = [tables]
    history = pd.concat([t["history"] for t in tables if not t["history"].empty], ignore_index=True) if any(not t["history"].empty for t in tables) else pd.DataFrame()
    seeds = pd.concat([t["seeds"] for t in tables if not t["seeds"].empty], ignore_index=True) if any(not t["seeds"].empty for t in tables) else pd.DataFrame()
    if history.empty:
        raise ValueError("no finished runs to plot (the history table is empty)")
    history = history.drop_duplicates(["run_id", "seed", "step"])  # a run shared by two blocks counts once
    seeds = seeds.drop_duplicates(["run_id", "seed"]) if not seeds.empty else seeds
    names = list(FIGURES) if names is None else list(names)
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    out = check_output_dir(out, "figures directory")
    written = {}
    with sns.axes_style("whitegrid"), plt.rc_context({"svg.hashsalt": "sdpo-lab", "figure.max_open_warning": 0}):
        for name in names:
            fig = FIGURES[name](history, seeds)
            if fig is not None:
                written[name] = save_figure(fig, out / f"{prefix}{name}")
    return written


def _fixed(frame: pd.DataFrame, col: str) -> str:
    if col not in frame:
        return "n/a"
    values = sorted(frame[col].dropna().unique())
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
