"""The variants study job: sweep (resumable) → figures → measurements and verdicts → VARIANTS.md / VARIANTS.json.

The sibling of :mod:`sdpo_sim.claims.job` for :mod:`sdpo_sim.variants_study`; the question and the rules are in that
module's docstring and in the report's header.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .claims.formatting import fmt
from .claims.job import runs_code_hash
from .claims.measure import CONDITIONAL, FEEDBACK_ORDER
from .claims.report import _tuning_table
from .core.io import atomic_write_text, check_output_dir
from .plots import ARM_COLORS, BOOT_SEED, CI, LABELS, palette, save_figure, write_figures
from .provenance import code_hash
from .sweep import Interrupted, Spec, kept_runs, plan, run_sweep
from .tuning import ALTERNATIVES as TUNING_ALTERNATIVES
from .variants_study import (
    ARMS,
    BASELINE,
    DESCRIPTIONS,
    MATCH_FRACTION,
    OUTCOMES,
    QUESTION,
    REFERENCE,
    SPEED_MARGIN,
    SPEED_STEP,
    Study,
    check_spec,
    evaluate,
    figure_tables,
)

SCALES = {"canonical": "variants.yaml", "quick": "variants_quick.yaml"}
FIGURES = ("entropy_reward",)  # sdpo_sim.plots figures drawn per arm, as figures/variants_<name>.png|svg (+ variants_learning_curves, verdicts)
FIGURE_PREFIX = "variants_"


def spec_path(scale: str) -> Path:
    """The packaged spec of a scale (canonical | quick)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not allowed; choose one of {', '.join(map(repr, SCALES))}")
    return Path(__file__).resolve().parent / "specs" / SCALES[scale]


def run_variants(scale: str = "canonical", *, out: Path, report_dir: Optional[Path] = None, figures_dir: Optional[Path] = None, workers: int = 2,
                 progress: bool = True, spec: Optional[Path] = None, command: str = "sdpo-sim variants", sweep_kwargs: Optional[dict] = None,
                 figures: bool = True) -> dict:
    """Sweep (resumable) → figures (unless ``figures=False``) → the study → the report. Every input and output place
    is checked before the sweep runs; Ctrl-C raises :class:`~sdpo_sim.sweep.Interrupted`."""
    start = time.perf_counter()
    spec_file = Path(spec) if spec else spec_path(scale)
    if not spec_file.is_file():
        raise ValueError(f"--spec {spec_file}: no such file; give a sweep spec (YAML) with block main (see sdpo_sim/specs/variants.yaml)")
    loaded = Spec.load(spec_file)
    check_spec(loaded)
    plan(loaded)  # every grid point and the tuning block, before anything is created
    for where, what in ((report_dir, "report directory"), (figures_dir if figures else None, "figures directory")):
        if where is not None:
            check_output_dir(where, what)
    result = run_sweep(loaded, out, workers=workers, progress=progress, **(sweep_kwargs or {}))
    try:
        tables = {"history": result.history, "seeds": result.seeds}
        study = evaluate(tables)
        drawn = draw_figures(tables, study, Path(figures_dir or Path(out) / "figures")) if figures else {}
        wall = time.perf_counter() - start
        summary = result.summary
        meta = {"command": command, "spec": spec_file.name if not spec else str(spec_file), "scale": scale, "runs": result.counts["total"],
                "failed": len(result.failed), "reused": result.counts["skipped"], "workers": workers, "wall_time_s": round(wall, 1),
                "tuning_runs": (result.tuning or {}).get("runs", 0),
                "package_version": summary["package_version"].iloc[0] if "package_version" in summary and len(summary) else None,
                "git_commit": summary["git_commit"].iloc[0] if "git_commit" in summary and len(summary) else None,
                "code_hash": runs_code_hash(summary), "report_code_hash": code_hash(),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "lr_rule": result.tuning["rule"] if result.tuning else "as given in the spec", "tuning": result.tuning,
                "setting": {k: loaded.base.get(k) for k in ("steps", "seeds", "eval_every", "batch_size", "num_generations", "rho", "vocab_size", "seq_len") if k in loaded.base},
                "task_seeds": sorted({int(x) for x in result.seeds["task_seed"].unique()}) if "task_seed" in result.seeds else []}
        md, js = write_report(study, meta, Path(report_dir or out))
    except KeyboardInterrupt:  # the sweep itself is complete: every run is kept
        raise Interrupted(kept_runs(out)) from None
    return {"study": study, "markdown": md, "json": js, "figures": drawn, "wall_time_s": wall, "sweep": result}


# ----------------------------------------------------------------------------- figures
def draw_figures(tables: Mapping[str, pd.DataFrame], study: Study, out: Path) -> dict[str, list[Path]]:
    """``variants_learning_curves`` (one row per variant: it, SDPO and GRPO; one column per channel),
    ``variants_entropy_reward`` (:func:`sdpo_sim.plots.fig_entropy_reward`, one colour per arm) and
    ``variants_verdicts`` (each arm's paired differences vs SDPO against the two rules), PNG + SVG."""
    fig_tables = figure_tables(tables)
    drawn = write_figures(fig_tables, out, names=FIGURES, prefix=FIGURE_PREFIX)
    with sns.axes_style("whitegrid"), plt.rc_context({"svg.hashsalt": "sdpo-lab", "figure.max_open_warning": 0}):
        drawn["learning_curves"] = save_figure(_fig_learning_curves(fig_tables["history"]), out / f"{FIGURE_PREFIX}learning_curves")
        drawn["verdicts"] = save_figure(_fig_verdicts(study), out / f"{FIGURE_PREFIX}verdicts")
    return drawn


def _fig_learning_curves(history: pd.DataFrame) -> plt.Figure:
    """Exact J vs step (mean, 95% CI over task × seed units): one row per variant, drawn with SDPO and GRPO."""
    variants = [a for a in ARMS if a not in (REFERENCE, BASELINE) and a in set(history["method"])]
    frame = pd.concat([history[history["method"].isin([v, REFERENCE, BASELINE])].assign(variant=v) for v in variants], ignore_index=True)
    order = [a for a in ARMS if a in set(frame["method"])]
    fbs = [f for f in FEEDBACK_ORDER if f in set(frame["feedback"])]
    g = sns.relplot(data=frame, x="step", y="reward", hue="method", hue_order=order, palette=palette(order, ARM_COLORS), row="variant",
                    row_order=variants, col="feedback", col_order=fbs, kind="line", errorbar=CI, seed=BOOT_SEED, height=2.2, aspect=1.4,
                    facet_kws={"sharey": True, "margin_titles": True})
    g.set_axis_labels(LABELS["step"], "exact J (0–1)")
    for ax in g.axes.flat:
        ax.set_ylabel("exact J (0–1)")
        ax.yaxis.label.set_visible(True)
        ax.axvline(SPEED_STEP, color="grey", ls=":", lw=1)
    g.legend.set_title("arm")
    g.tight_layout()
    g.figure.suptitle(f"Learning curves per variant, with SDPO and GRPO (dotted: step {SPEED_STEP}, the speed rule)", y=1.01)
    return g.figure


def _fig_verdicts(study: Study) -> plt.Figure:
    """Per channel: each arm's paired difference vs SDPO of J at step 30 (x) and of entropy at matched reward (y),
    with 95% CIs; shaded: where both rules pass (x CI above −margin, y CI above 0)."""
    rows = study.table[study.table["arm"] != REFERENCE]
    fbs = [f for f in FEEDBACK_ORDER if f in set(rows["feedback"])]
    fig, axes = plt.subplots(1, len(fbs), figsize=(3.6 * len(fbs), 3.4), sharex=True, sharey=True, squeeze=False)
    colours = palette([a for a in ARMS], ARM_COLORS)
    for ax, fb in zip(axes[0], fbs):
        for _, r in rows[rows["feedback"] == fb].iterrows():
            dx, dy = r["vs_sdpo"][f"reward_at_{SPEED_STEP}"], r["vs_sdpo"]["entropy_matched"]
            if not (dx["n"] and dy["n"]):
                continue
            ax.errorbar(dx["mean"], dy["mean"], xerr=[[dx["mean"] - dx["ci"][0]], [dx["ci"][1] - dx["mean"]]],
                        yerr=[[dy["mean"] - dy["ci"][0]], [dy["ci"][1] - dy["mean"]]], fmt="o", color=colours[r["arm"]], label=r["arm"], capsize=2)
        ax.axvline(-SPEED_MARGIN, color="grey", ls=":", lw=1)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.axvspan(-SPEED_MARGIN, ax.get_xlim()[1], ymin=0, ymax=1, color="#029e73", alpha=0.04)
        ax.set_title(f"feedback = {fb}")
        ax.set_xlabel(f"ΔJ at step {SPEED_STEP}, arm − SDPO (reward units)")
        ax.set_ylabel("Δ entropy at matched J, arm − SDPO (nats)")
        ax.yaxis.label.set_visible(True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        handles += [x for x, y in zip(h, lab) if y not in labels]
        labels += [y for y in lab if y not in labels]
    fig.legend(handles, labels, title="arm", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"The two rules: keeps speed (right of the dotted line, −{SPEED_MARGIN:g}) and avoids collapse (above 0); 95% CIs", y=1.02)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the report
def _cell(d: Mapping[str, Any], signed: bool = False) -> str:
    """``0.734 [0.701, 0.760]`` (``n/a`` when not measured)."""
    if not d or not d.get("n"):
        return "n/a"
    return f"{fmt(d['mean'], signed=signed)} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]"


def rules_text(meta: Mapping[str, Any]) -> str:
    """The header paragraph: what is measured and the verdict rules, as fixed before any result."""
    alts = meta.get("tuning") or {}
    alt_text = (f"block main re-run at each alternative tuning choice ({'; '.join(TUNING_ALTERNATIVES.values())}; near-best meaning a "
                f"tuning score within {alts['margin']:g} of the best)" if alts.get("alternatives") else "no tuning alternatives were run")
    return (
        "Every number is measured in the exact toy world (docs/design.md §3); CIs are 95% percentile-bootstrap intervals over "
        "(task seed, seed) units, two-stage (task seeds, then seeds within each drawn task), paired on (task seed, seed) where an "
        f"arm is compared with SDPO. Learning rates: {meta.get('lr_rule', 'as given')} (one choice per arm × feedback channel). "
        f"*Entropy at matched reward*: per-token entropy (nats) at the first step a run's exact reward J reaches its channel's level "
        f"L = J₀ + {MATCH_FRACTION:g}·(min over arms of the mean final J − J₀), J₀ the mean initial J, interpolated between evaluation "
        "steps; runs that never reach L are left out (counted). Rules, fixed before any result: an arm *keeps early speed* under a "
        f"channel when the CI of its paired difference of J at step {SPEED_STEP} minus SDPO's lies above −{SPEED_MARGIN:g} (reward units); "
        "it *avoids collapse* when the CI of its paired difference of entropy at matched reward minus SDPO's lies above 0; a channel "
        f"passes when both hold. Verdict on \"{QUESTION}\": *holds* = every channel passes, *holds only under stated conditions* = "
        "some do (listed), *does not hold* = none, *not measured* = no channel measurable. Robustness: the verdict recomputed at "
        f"every tuning alternative the sweep ran ({alt_text}): *robust (k of k)* when it stands under all, *fragile (j of k stand)* "
        "naming each alternative that flips it.")


def render_markdown(study: Study, meta: Mapping[str, Any]) -> str:
    """VARIANTS.md: the verdicts, the per-channel table, the differences vs SDPO, and the learning rates."""
    setting = meta.get("setting") or {}
    lines = [
        "# Which SDPO variant keeps SDPO's early speed without its entropy collapse?",
        "",
        f"Generated by `{meta.get('command')}` from spec `{meta.get('spec')}` ({meta.get('runs')} runs + {meta.get('tuning_runs', 0)} tuning runs, "
        f"{meta.get('failed', 0)} failed, {meta.get('reused', 0)} reused from an earlier invocation of the same sweep; wall time of this "
        f"invocation {meta.get('wall_time_s', float('nan')):.0f} s on {meta.get('workers')} worker(s)); sdpo-lab {meta.get('package_version')} "
        f"at commit `{meta.get('git_commit')}`, {meta.get('date')}; code hash of the runs `{meta.get('code_hash')}`, of the report "
        f"`{meta.get('report_code_hash')}` (sdpo_sim.provenance). Setting: {', '.join(f'{k} {v}' for k, v in setting.items())}; "
        f"task seeds {meta.get('task_seeds')}. The variants: docs/variants.md.",
        "",
        rules_text(meta),
        "",
        "| arm | what it is | verdict | passes under | robustness |",
        "|---|---|---|---|---|",
    ]
    for v in study.verdicts:
        lines.append(f"| {v.arm} | {DESCRIPTIONS.get(v.arm, '')} | **{v.verdict}** | {', '.join(v.passes_under) if v.verdict == CONDITIONAL else '—'} | {v.robustness} |")
    lines += ["", "## Per feedback channel", "",
              f"Matched reward levels L: {', '.join(f'{fb} {lvl:.3f}' for fb, lvl in study.levels.items())}. Outcome: "
              f"{' / '.join(OUTCOMES[:-1])} (or {OUTCOMES[-1]}).", "",
              "| feedback | arm | lr | β | J@10 | J@30 | J@100 | J final | entropy at matched J (nats) | not reaching L | feedback credit r | outcome |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in study.table.iterrows():
        lines.append(f"| {r['feedback']} | {r['arm']} | {r['lr']:g} | {'—' if r['beta'] != r['beta'] else format(r['beta'], 'g')} | {_cell(r['reward_at_10'])} | {_cell(r['reward_at_30'])} | "
                     f"{_cell(r['reward_at_100'])} | {_cell(r['final_reward'])} | {_cell(r['entropy_matched'])} | {r['matched_missing']} | "
                     f"{_cell(r['feedback_credit_corr'])} | {r['outcome'] if r['arm'] != REFERENCE else 'reference'} |")
    lines += ["", "## Paired differences, arm − SDPO", "",
              "| feedback | arm | ΔJ@10 | ΔJ@30 | ΔJ@100 | ΔJ final | Δ entropy at matched J | Δ final entropy |", "|---|---|---|---|---|---|---|---|"]
    for _, r in study.table.iterrows():
        if r["arm"] == REFERENCE:
            continue
        d = r["vs_sdpo"]
        lines.append(f"| {r['feedback']} | {r['arm']} | {_cell(d['reward_at_10'], True)} | {_cell(d['reward_at_30'], True)} | {_cell(d['reward_at_100'], True)} | "
                     f"{_cell(d['final_reward'], True)} | {_cell(d['entropy_matched'], True)} | {_cell(d['entropy'], True)} |")
    if study.alternatives:
        lines += ["", "## Verdicts at the tuning alternatives", "", "| arm | " + " | ".join(study.alternatives) + " |",
                  "|---|" + "---|" * len(study.alternatives)]
        for v in study.verdicts:
            lines.append(f"| {v.arm} | " + " | ".join(alt.get(v.arm, "not measured") for alt in study.alternatives.values()) + " |")
    if meta.get("tuning"):
        lines += _tuning_table(meta["tuning"])
    lines += ["", "Figures: `figures/variants_learning_curves.png` (exact J vs step, one row per variant drawn with SDPO and GRPO, one "
              "column per channel), `figures/variants_entropy_reward.png` (the mean (J, entropy) trajectory of each arm) and "
              "`figures/variants_verdicts.png` (each arm's two paired differences vs SDPO against the rules).", ""]
    return "\n".join(lines)


def write_report(study: Study, meta: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``VARIANTS.md`` and ``VARIANTS.json`` into ``out`` atomically."""
    out = Path(out)
    md, js = out / "VARIANTS.md", out / "VARIANTS.json"
    atomic_write_text(md, render_markdown(study, meta))
    payload = {"meta": {k: v for k, v in meta.items() if k != "tuning"}, "arms": ARMS,
               "rules": {"speed_step": SPEED_STEP, "speed_margin": SPEED_MARGIN, "match_fraction": MATCH_FRACTION, "text": rules_text(meta)},
               "tuning": meta.get("tuning"), **study.to_dict()}
    atomic_write_text(js, json.dumps(payload, indent=1, default=_default))
    return md, js


def _default(v: Any) -> Any:
    return None if isinstance(v, float) else v.item() if hasattr(v, "item") else str(v) if not isinstance(v, pd.Timestamp) else v.isoformat()
