"""The calibration study (``sdpo-sim calibrate``): the toy side of issue 17, from the LLM side's files.

Inputs (written by the LLM side, never imported): ``credit_truth.json`` of ``sdpo-llm credit-truth`` and, optionally,
an ``sdpo-llm grid`` directory of the predicted-vs-observed grid. Steps: the toy teacher's credit correlations over
the ρ grid (:func:`sdpo_sim.calibration.toy_curves`), the fit (:func:`sdpo_sim.calibration.fit`), then, with a grid,
the toy simulation of every grid point at its channel's calibrated ρ and the agreement of the two worlds
(:mod:`sdpo_sim.transfer`). Writes the JSON (``CALIBRATION.json``: settings, fit, agreement), the report page
(``CALIBRATION.md``), tidy tables and two figures.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import calibration as cal  # noqa: E402
from . import transfer  # noqa: E402
from .core.io import atomic_write_text, check_output_dir  # noqa: E402
from .plots import ARM_COLORS, FEEDBACK_COLORS, save_figure  # noqa: E402

# scale -> (CalibrationConfig fields, ρ grid, toy grid seeds, toy grid task seeds, bootstrap resamples)
SCALES = {
    "small": ({"task_seeds": 1, "seeds": 2, "batch_size": 16, "vocab_size": 4, "seq_len": 4}, (0.0, 0.5, 1.0), 2, 1, 50),
    "medium": ({"task_seeds": 2, "seeds": 4}, tuple(round(0.1 * i, 1) for i in range(11)), 4, 2, 500),
    "canonical": ({"task_seeds": 4, "seeds": 8}, cal.RHO_GRID, 8, 4, 1000),
}


def _json_safe(x):
    """JSON-able: numpy scalars as Python ones, NaN/±inf as None."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def fig_curves(curves: pd.DataFrame, llm: pd.DataFrame, fitted: dict) -> plt.Figure:
    """One panel per channel (columns) × stage and ground truth (rows): the toy's r(ρ) with its CI band, the LLM's value
    with its CI (horizontal band) and ρ̂ (vertical line) or where the LLM lies outside the toy's range."""
    stages = sorted(curves[["step", "truth"]].drop_duplicates().itertuples(index=False), key=lambda s: (s.step, s.truth != "counterfactual"))
    channels = [c for c in cal.LLM_TO_TOY if c in set(curves.channel)]
    fig, axes = plt.subplots(len(stages), len(channels), figsize=(3.1 * len(channels), 2.7 * len(stages)), squeeze=False, sharex=True, sharey=True)
    fits = {(f["channel"], f["step"], f["truth"]): f for f in fitted["per_channel"]}
    for i, (step, truth) in enumerate(stages):
        for j, ch in enumerate(channels):
            ax, colour = axes[i][j], FEEDBACK_COLORS[cal.LLM_TO_TOY[ch]]
            g = curves[(curves.channel == ch) & (curves.step == step) & (curves.truth == truth)].sort_values("rho")
            ax.plot(g.rho, g.r, color=colour, marker="o", ms=3, label="toy teacher")
            ax.fill_between(g.rho, g.r_lo, g.r_hi, color=colour, alpha=0.25)
            m = llm[(llm.channel == ch) & (llm.step == step) & (llm.truth == truth)]
            if not m.empty:
                row = m.iloc[0]
                ax.axhline(row.r, color="black", lw=1, label="LLM (95% CI)")
                ax.axhspan(row.ci_lo, row.ci_hi, color="grey", alpha=0.25)
            f = fits.get((ch, step, truth))
            if f is not None:
                if f["status"] == "ok":
                    ax.axvline(f["rho_hat"], color="black", ls="--", lw=1)
                    ax.set_title(f"{ch} · step {step} · {truth}\nρ̂ = {f['rho_hat']:.2f}", fontsize=8)
                else:
                    ax.set_title(f"{ch} · step {step} · {truth}\nLLM {f['status']}" + (" the toy's range" if f["status"] in ("below", "above") else ""), fontsize=8)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_ylim(-0.6, 1.1)  # a correlation; a disattenuated CI can pass ±1 (docs/llm_feedback.md)
            if i == len(stages) - 1:
                ax.set_xlabel("self-knowledge fidelity ρ")
            if j == 0:
                ax.set_ylabel("corr(feedback credit, truth)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Calibration: the toy teacher's feedback-credit correlation vs ρ, and the LLM's measurement", fontsize=10)
    fig.tight_layout()
    return fig


def fig_transfer(llm_seeds: pd.DataFrame, toy_seeds: pd.DataFrame, result: dict) -> plt.Figure:
    """Point means of the two worlds per metric (one colour per method), with τ and its CI in each title."""
    fig, axes = plt.subplots(1, len(transfer.METRICS), figsize=(4.2 * len(transfer.METRICS), 3.8), squeeze=False)
    units = {"auc": "mean reward over the run", "final_reward": "final reward", "entropy": "final entropy (nats/token)"}
    for ax, metric, k in zip(axes[0], transfer.METRICS, result["kendall"]):
        a = llm_seeds.groupby(list(transfer.POINT))[metric].mean().rename("llm")
        b = toy_seeds.groupby(list(transfer.POINT))[metric].mean().rename("toy")
        d = pd.concat([a, b], axis=1).dropna().reset_index()
        sns.scatterplot(data=d, x="toy", y="llm", hue="method", style="feedback", palette={m: ARM_COLORS.get(m, ARM_COLORS.get(f"{m}-constant", "grey")) for m in d.method.unique()}, ax=ax, s=40)
        ax.set_xlabel(f"toy world: {units[metric]}")
        ax.set_ylabel(f"tiny LLM: {units[metric]}")
        ax.set_title(f"{metric}: Kendall τ = {k['tau']:+.2f} [{k['ci_lo']:+.2f}, {k['ci_hi']:+.2f}]", fontsize=9)
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle("Predicted (toy world at the calibrated ρ) vs observed (tiny LLM), one point per method × channel × noise", fontsize=10)
    fig.tight_layout()
    return fig


def run_study(credit_truth: Union[str, Path], out: Union[str, Path], *, llm_grid: Optional[Union[str, Path]] = None, scale: str = "canonical",
              report: Optional[Union[str, Path]] = None, figures: Optional[Union[str, Path]] = None, command: str = "sdpo-sim calibrate",
              progress: bool = True) -> dict:
    """Run the toy side (see the module docstring); returns the JSON payload."""
    if scale not in SCALES:
        raise ValueError(f"--scale={scale!r} is not allowed; choose one of {', '.join(SCALES)}")
    llm = cal.read_credit_truth(credit_truth)
    grid_long, blocks = transfer.read_llm_grid(llm_grid) if llm_grid is not None else (None, {})
    out = check_output_dir(out, "--out")
    figures = check_output_dir(figures if figures is not None else out / "figures", "--figures")
    report = Path(report) if report is not None else out / "CALIBRATION.md"
    fields, rhos, grid_seeds, grid_tasks, n_boot = SCALES[scale]
    config = cal.CalibrationConfig(**fields)
    t0 = time.time()
    channels = [c for c in cal.LLM_TO_TOY if c in set(llm.channel)]
    units = cal.toy_curves(config, channels, sorted(set(llm.step)), rhos, progress=progress)
    curves = cal.summarise_curves(units)
    fitted = cal.fit(llm, curves)
    atomic_write_text(out / "curves.csv", curves.to_csv(index=False))
    fig_paths = save_figure(fig_curves(curves, llm, fitted), figures / "calibration_curves")
    payload = {"command": command, "scale": scale, "credit_truth": str(credit_truth), "llm_grid": None if llm_grid is None else str(llm_grid),
               "toy_world": asdict(config), "rho_grid": list(rhos), "primary_truth": cal.PRIMARY_TRUTH, "fit": fitted}
    if grid_long is not None:
        rho_of = {}
        for ch in sorted(set(grid_long.feedback)):
            rho_of[ch] = cal.calibrated_rho({"fit": fitted}, ch)[0]
        K = int(grid_long.step.max())
        toy_long = transfer.simulate(grid_long, blocks, rho_of, steps=K, seeds=grid_seeds, task_seeds=grid_tasks, progress=progress,
                                      vocab_size=config.vocab_size, seq_len=config.seq_len)
        llm_seeds = transfer.per_seed(grid_long, range(1, K + 1))
        toy_seeds = transfer.per_seed(toy_long, range(0, K))
        result = transfer.agreement(llm_seeds, toy_seeds, n_boot=n_boot)
        atomic_write_text(out / "transfer_pairwise.csv", result["pairwise"].to_csv(index=False))
        atomic_write_text(out / "transfer_points.csv", pd.concat([llm_seeds.assign(world="llm"), toy_seeds.assign(world="toy")]).to_csv(index=False))
        fig_paths += save_figure(fig_transfer(llm_seeds, toy_seeds, result), figures / "calibration_transfer")
        payload["transfer"] = {"rho_used": rho_of, "steps": K, "toy_seeds": grid_seeds, "toy_task_seeds": grid_tasks,
                               "llm_points": int(llm_seeds[list(transfer.POINT)].drop_duplicates().shape[0]),
                               "llm_seeds_per_point": int(llm_seeds.groupby(list(transfer.POINT)).size().min()),
                               **transfer.agreement_summary(result), "pairwise": result["pairwise"].to_dict(orient="records")}
    payload["wall_time_s"] = round(time.time() - t0, 1)
    payload = _json_safe(payload)
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write_text(out / "calibration.json", text)
    atomic_write_text(report.with_suffix(".json"), text)
    atomic_write_text(report, markdown(payload, [p for p in fig_paths if p.suffix == ".png"], report.parent))
    return payload


def _fmt(x, spec="+.2f") -> str:
    return "—" if x is None else (x if isinstance(x, str) else format(x, spec))


def markdown(p: dict, figures: list[Path], base: Path) -> str:
    """The report page."""
    lines = ["# Calibration: does the toy world predict the LLM?", "",
             f"Generated by `{p['command']}` (scale **{p['scale']}**, {p['wall_time_s']} s for the toy side). "
             f"LLM measurement: `{p['credit_truth']}`" + (f"; LLM grid: `{p['llm_grid']}`." if p.get("llm_grid") else "."),
             "How it is measured and how to regenerate it: docs/calibration.md.", "",
             "## 1. Calibrated ρ per channel", "",
             f"Toy world: {p['toy_world']}; ρ grid {p['rho_grid'][0]}…{p['rho_grid'][-1]} ({len(p['rho_grid'])} values). "
             "The toy's A* is exact, so it is compared with the LLM's disattenuated correlation with Â_t. "
             "`below`: the LLM's value is under every toy teacher's (the toy has no teacher that bad), not ρ = 0.", "",
             "| channel | step | truth | LLM r [95% CI] | toy r at ρ=0 … ρ=1 | monotone | ρ̂ | ρ̂ CI | CI from |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in p["fit"]["per_channel"]:
        rho = _fmt(f["rho_hat"], ".2f") if f["status"] == "ok" else f["status"]
        lines.append(f"| {f['channel']} | {f['step']} | {f['truth']} | {_fmt(f['llm_r'])} [{_fmt(f['llm_ci'][0])}, {_fmt(f['llm_ci'][1])}] "
                     f"({f['completions']} completions) | {_fmt(f['toy_r_at_0'])} … {_fmt(f['toy_r_at_1'])} | {'yes' if f['monotone'] else 'no'} | "
                     f"{rho} | [{_fmt(f['rho_ci'][0], '.2f')}, {_fmt(f['rho_ci'][1], '.2f')}] | {f['ci_source']} |")
    lines += ["", "**One ρ for all channels** (least squares over the identifiable channels; residual = LLM − toy at that ρ):", "",
              "| step | truth | ρ* | RMS residual | residual per channel |", "|---|---|---|---|---|"]
    for c in p["fit"]["common"]:
        res = ", ".join(f"{k} {v:+.2f}" for k, v in c["residuals"].items())
        lines.append(f"| {c['step']} | {c['truth']} | {_fmt(c['rho'], '.2f')} | {_fmt(c['rms_residual'], '.2f')} | {res} |")
    t = p.get("transfer")
    if t:
        lines += ["", "## 2. Predicted vs observed", "",
                  f"{t['llm_points']} grid points (method × channel × noise), {t['llm_seeds_per_point']} LLM seeds each, {t['steps']} steps; "
                  f"toy: {t['toy_seeds']} seeds × {t['toy_task_seeds']} tasks per point at ρ = "
                  + ", ".join(f"{k} {v:g}" for k, v in t["rho_used"].items()) + ".", "",
                  "| metric | Kendall τ (point means) | 95% CI (seeds resampled in both worlds) | sign agreement of pairwise differences | where the LLM resolves them (|Δ| > 2 SE) |",
                  "|---|---|---|---|---|"]
        for k, s in zip(t["kendall"], t["signs"]):
            lines.append(f"| {k['metric']} | {_fmt(k['tau'])} | [{_fmt(k['ci_lo'])}, {_fmt(k['ci_hi'])}] | {s['agree']}/{s['pairs']} | "
                         f"{s['resolved_agree']}/{s['resolved_pairs']} |")
        lines += ["", "Pairwise differences (final reward: the last of the run's rollouts):", "",
                  "| channel | noise | pair | LLM Δ (SE) | toy Δ | agree |", "|---|---|---|---|---|---|"]
        for r in t["pairwise"]:
            if r["metric"] == "final_reward":
                lines.append(f"| {r['feedback']} | {r['noise']:g} | {r['pair']} | {r['llm']:+.3f} ({_fmt(r['llm_se'], '.3f')}) | {r['toy']:+.3f} | "
                             f"{'yes' if r['agree'] else 'no'} |")
    lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.relative_to(base) if f.is_relative_to(base) else f})" for f in figures] + [""]
    return "\n".join(lines)
