"""Promotion: pick a validated configuration from a sweep and write an LLM recipe whose ``method:`` block is it.

Rule (default): among the sweep's configurations — pooled over seeds and task seeds — whose mean
final per-token entropy stays at or above a floor, the one with the highest mean final exact reward.
Configurations whose teacher cannot exist in an LLM (``oracle`` reads the exact advantage,
``seed-paper`` the reward table, ``null`` is a control) are never candidates.

The base recipe is read as plain YAML (``sdpo_sim`` never imports ``llm``; the default is found as ``llm``'s
package data, :func:`default_base`); only its ``method:``
block (and ``task.feedback`` when it has one) changes. What does not transfer is reported: the
learning rate, and every toy-world-only setting (teacher model, rho, beta, noise, world size, ...).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from .calibration import LLM_TO_TOY, calibrated_rho  # noqa: E402
from .core.io import atomic_write_text, check_output_file, read_yaml_file  # noqa: E402
from .plots import FEEDBACK_COLORS, save_figure  # noqa: E402
from .stats import bootstrap_ci  # noqa: E402
from .tables import load_tables  # noqa: E402
from .train import RunConfig, run  # noqa: E402

METRICS = ("final_reward", "auc")
NOT_IN_LLM = ("oracle", "seed-paper", "null")
SEED_FIELDS = ("seeds", "seed_start", "task_seed")
LLM_FEEDBACK = ("binary", "ordinal", "continuous", "critique")
# toy-world settings with no LLM counterpart in a recipe: (field, why)
TOY_ONLY = {
    "teacher": "the retrospection model is how the toy world imitates a network re-reading its attempt; an LLM teacher is the network itself",
    "rho": "self-knowledge fidelity is a property of the model, not a setting",
    "beta": "teacher sharpness is implicit in how strongly the LLM reacts to feedback in context",
    "noise": "judge noise in the toy world models an imperfect evaluator; an LLM run has its own judge",
    "hint_noise": "critique hint noise (toy world)",
    "policy": "tabular policy family",
    "vocab_size": "toy world size", "seq_len": "toy world size",
    "steps": "a step budget does not transfer across worlds", "batch_size": "toy batch size (recipe: prompts_per_step × num_generations)",
    "optimizer": "the recipe's optimizer is AdamW", "threshold": "binary threshold of the toy judge",
    "updates_per_batch": "rollout reuse of the toy loop; the recipe's counterpart, training.updates_per_batch, is not copied",
}
DEFAULT_RECIPE = "recipes/tiny-cpu.yaml"  # inside the llm package (pyproject: [tool.setuptools.package-data] llm)
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "CALIBRATION.json"  # the committed study, in a source checkout
PREDICTION_FILES = ("-predicted-curve.csv", "-predicted-curve.png", "-agreement.json")  # written beside the recipe: STEM + these


def default_calibration() -> Optional[Path]:
    """The committed ``CALIBRATION.json`` of the source checkout, or None where there is none (an installed wheel)."""
    return DEFAULT_CALIBRATION if DEFAULT_CALIBRATION.is_file() else None


def read_calibration(path: Union[str, Path]) -> dict:
    """A ``sdpo-sim calibrate`` JSON file (CALIBRATION.json), checked to hold a per-channel fit."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--calibration {str(path)!r} does not exist; give a CALIBRATION.json written by `sdpo-sim calibrate` (or none)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--calibration {str(path)!r} is not readable JSON ({err}); give a CALIBRATION.json written by `sdpo-sim calibrate`") from None
    rows = payload.get("fit", {}).get("per_channel") if isinstance(payload, dict) and isinstance(payload.get("fit"), dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"channel", "step", "truth", "status"} <= set(r) for r in rows):
        raise ValueError(f"--calibration {str(path)!r} has no fit.per_channel list (channel, step, truth, status); is it sdpo-sim calibrate's JSON?")
    return payload


def predicted_curve(config: dict, rho: float, steps: int) -> pd.DataFrame:
    """The toy world's learning curve of ``config`` at self-knowledge ``rho`` over ``steps`` steps: per evaluated step the
    mean exact reward and per-token entropy over the config's seeds with percentile-bootstrap 95% CIs
    (:func:`sdpo_sim.stats.bootstrap_ci`)."""
    cfg = RunConfig.from_dict({**config, "rho": float(rho), "steps": int(steps), "eval_every": max(1, int(steps) // 50)})
    h = run(cfg).history
    rows = []
    for step, g in h.groupby("step"):
        r, e = bootstrap_ci(g["reward"], n_boot=1000), bootstrap_ci(g["entropy"], n_boot=1000)
        rows.append({"step": int(step), "reward": r[0], "reward_lo": r[1], "reward_hi": r[2], "entropy": e[0], "entropy_lo": e[1],
                     "entropy_hi": e[2], "rho": float(rho), "feedback": cfg.feedback, "seeds": cfg.seeds})
    return pd.DataFrame(rows)


def fig_predicted(curve: pd.DataFrame, title: str) -> plt.Figure:
    """Predicted reward and entropy against the step, mean and 95% CI band over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2))
    colour = FEEDBACK_COLORS.get(str(curve.feedback.iloc[0]), "#029e73")
    for ax, what, label in zip(axes, ("reward", "entropy"), ("exact reward (toy world)", "per-token entropy (nats)")):
        ax.plot(curve.step, curve[what], color=colour)
        ax.fill_between(curve.step, curve[f"{what}_lo"], curve[f"{what}_hi"], color=colour, alpha=0.25)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def default_base() -> Path:
    """The packaged ``llm/recipes/tiny-cpu.yaml``, from any working directory, without importing ``llm``.

    ``importlib.util.find_spec`` of a top-level name only searches the import path (no module code runs, and
    the editable install's finder answers too), whereas ``importlib.resources.files("llm")`` would execute
    ``llm/__init__``: the toy world must not import LLM code. An unrelated package named ``llm`` is caught
    by the recipe file not being there."""
    spec = importlib.util.find_spec("llm")
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    for place in places:
        path = Path(place) / DEFAULT_RECIPE
        if path.is_file():
            return path
    raise ValueError("the default base recipe ships with sdpo-lab's `llm` package, which is not importable here "
                     f"(looked in {places or 'no llm package'}); pass --base PATH to an LLM recipe")


@dataclass
class Promotion:
    recipe: dict
    chosen: dict  # the winning configuration (full flat toy-world config)
    candidates: pd.DataFrame  # every configuration with its scores, ranked
    not_transferred: list  # (setting, toy value, recipe value / note)
    rule: str
    prediction: Optional[dict] = None  # with a calibration: the channel, ρ, its status, the curve and the files written


def candidates(seeds: pd.DataFrame, metric: str = "final_reward") -> pd.DataFrame:
    """One row per configuration (seed fields pooled): mean metric with CI, mean final entropy, n units."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not allowed; choose one of {', '.join(map(repr, METRICS))}")
    if seeds.empty or "config" not in seeds:
        raise ValueError("the sweep has no finished runs with stored configs (seeds table is empty)")
    seeds = seeds.drop_duplicates(["run_id", "seed"])
    key = seeds["config"].map(lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k not in SEED_FIELDS}, sort_keys=True))
    rows = []
    for k, g in seeds.groupby(key, sort=False):
        mean, lo, hi = bootstrap_ci(g[metric])
        cfg = json.loads(k)
        rows.append({"method": cfg["method"], "feedback": cfg.get("feedback"), "teacher": cfg.get("teacher"), "controller": cfg.get("controller"),
                     metric: mean, f"{metric}_ci_lo": lo, f"{metric}_ci_hi": hi, "entropy": g["entropy"].mean(), "n": len(g), "config": k})
    return pd.DataFrame(rows).sort_values(metric, ascending=False, ignore_index=True)


def select(seeds: pd.DataFrame, *, entropy_floor: float = 0.5, metric: str = "final_reward", method: Optional[str] = None) -> tuple[dict, pd.DataFrame, str]:
    """Apply the rule; returns (chosen full config, ranked candidate table with an ``eligible`` column, rule text)."""
    if not isinstance(entropy_floor, (int, float)) or isinstance(entropy_floor, bool) or not math.isfinite(entropy_floor) or entropy_floor < 0:
        raise ValueError(f"entropy_floor={entropy_floor!r} must be a number ≥ 0 (nats per token)")
    table = candidates(seeds, metric)
    eligible = ~table["teacher"].isin(NOT_IN_LLM) & (table["entropy"] >= entropy_floor)
    if method is not None:
        eligible &= table["method"] == method
    table["eligible"] = eligible
    rule = (f"highest mean {metric} among configurations with mean final per-token entropy ≥ {entropy_floor:g} nats"
            + (f" and method={method}" if method else "") + f"; teachers {', '.join(NOT_IN_LLM)} excluded (they cannot exist in an LLM)")
    if not eligible.any():
        raise ValueError(f"no configuration passes the rule ({rule}); lower --entropy-floor (highest entropy seen: {table['entropy'].max():.3f} nats)")
    best = table[eligible].iloc[0]
    return json.loads(best["config"]), table, rule


def check_user_task(dataset: Optional[str], reward_funcs: Sequence[str], reward_weights: Optional[Sequence[float]],
                    eval_dataset: Optional[str]) -> None:
    """Refuse a user task that cannot run, before anything is written: data paths must exist, reward functions be
    ``module:function``, ``file.py:function`` (the file existing) or a model directory, one weight > 0 per function.
    (The recipe is checked in full by ``sdpo-llm train``; ``sdpo_sim`` does not import ``llm``.)"""
    for name, path in (("--dataset", dataset), ("--eval-dataset", eval_dataset)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{name} {path!r} does not exist; give a .jsonl/.json, .parquet, .csv file or a datasets save_to_disk directory")
    if (reward_funcs or reward_weights or eval_dataset) and dataset is None:
        raise ValueError("--reward-funcs, --reward-weights and --eval-dataset describe a user task: give --dataset too")
    if dataset is not None and not reward_funcs:
        raise ValueError("--dataset needs --reward-funcs (module:function, file.py:function or a model directory): "
                         "the built-in task's judge only understands its own prompts")
    for spec in reward_funcs:
        file, sep, _ = spec.rpartition(":")
        if Path(spec).is_dir() or (sep and file and not file.endswith(".py")):
            continue
        if not (sep and file.endswith(".py") and Path(file).is_file()):
            raise ValueError(f"--reward-funcs {spec!r}: use module:function, path/to/file.py:function (an existing file) or a model directory")
    if reward_weights is not None and (len(reward_weights) != len(reward_funcs)
                                       or not all(math.isfinite(w) and w > 0 for w in reward_weights)):
        raise ValueError(f"--reward-weights {list(reward_weights)} must be {len(reward_funcs)} finite numbers > 0, one per reward function")


def _absolute_spec(spec: str) -> str:
    """A reward-function spec with its file or model directory made absolute (``module:function`` unchanged)."""
    if Path(spec).is_dir():
        return str(Path(spec).resolve())
    file, _, function = spec.rpartition(":")
    return f"{Path(file).resolve()}:{function}" if file.endswith(".py") else spec


def promote(sweep_dir: Union[str, Path], *, base: Optional[Union[str, Path]] = None, out: Optional[Union[str, Path]] = None,
            entropy_floor: float = 0.5, metric: str = "final_reward", method: Optional[str] = None,
            dataset: Optional[str] = None, reward_funcs: Sequence[str] = (), reward_weights: Optional[Sequence[float]] = None,
            eval_dataset: Optional[str] = None, calibration: Optional[Union[str, Path]] = None) -> Promotion:
    """Select a configuration from a sweep and build (and optionally write) the LLM recipe.

    With ``dataset`` and ``reward_funcs`` the recipe runs on the user's task (``task.dataset``, ``task.reward_funcs``,
    ``task.reward_weights``, ``task.eval_dataset``; paths written absolute so the recipe runs from any directory).
    Checked in this order, before anything is written: the sweep directory, the user task, the base recipe (``None``:
    :func:`default_base`), the output path, the rule, the calibration.

    With ``calibration`` (a ``sdpo-sim calibrate`` JSON, e.g. the committed CALIBRATION.json) the chosen configuration is
    simulated at the calibrated ρ of its feedback channel for the recipe's ``training.steps`` and, beside the recipe
    (``STEM`` + :data:`PREDICTION_FILES`), the predicted curve (CSV, PNG) and the measured toy-vs-LLM agreement (JSON)
    are written. The channel must be calibrated (else ValueError, before anything is written)."""
    tables = load_tables(sweep_dir)
    check_user_task(dataset, list(reward_funcs), reward_weights, eval_dataset)
    base = default_base() if base is None else Path(base)
    recipe = read_yaml_file(base, "base recipe", "pass --base PATH to an LLM recipe file (e.g. llm/recipes/tiny-cpu.yaml)")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("method"), dict):
        raise ValueError(f"base recipe {base} has no `method:` mapping; is it an LLM recipe?")
    if out is not None:
        check_output_file(out, "recipe output file")
    chosen, table, rule = select(tables["seeds"], entropy_floor=entropy_floor, metric=metric, method=method)
    cal = rho_status = None
    if calibration is not None:
        cal = read_calibration(calibration)
        rho, rho_status = calibrated_rho(cal, chosen.get("feedback", "continuous"))
        if out is not None:
            for suffix in PREDICTION_FILES:
                check_output_file(Path(out).with_name(Path(out).stem + suffix), "prediction file")
    method_block = RunConfig.from_dict(chosen).method.to_dict()
    recipe = {**recipe, "method": method_block}
    notes = []
    training = recipe.get("training") if isinstance(recipe.get("training"), dict) else {}
    notes.append(("lr", chosen.get("lr"), f"kept the recipe's learning_rate {training.get('learning_rate', '(none)')}: tune it in the LLM world"))
    task = recipe.get("task") if isinstance(recipe.get("task"), dict) else None
    fb = chosen.get("feedback")
    if task is not None and "feedback" in task and fb in LLM_FEEDBACK:
        recipe["task"] = {**task, "feedback": fb}
    else:
        notes.append(("feedback", fb, "no recipe counterpart set" + (" (demo: use the recipe's context.use_demo)" if fb == "demo" else "")))
    for name, why in TOY_ONLY.items():
        if name in chosen:
            notes.append((name, chosen[name], why))
    if dataset is not None:
        user = {"dataset": str(Path(dataset).resolve()), "reward_funcs": [_absolute_spec(f) for f in reward_funcs],
                "reward_weights": None if reward_weights is None else [float(w) for w in reward_weights],
                "eval_dataset": None if eval_dataset is None else str(Path(eval_dataset).resolve()), "judge": None}
        recipe["task"] = {**(recipe.get("task") or {}), **user}
    if out is not None:
        header = (f"# Promoted by `sdpo-sim promote {sweep_dir}` from base recipe {base}.\n# Rule: {rule}.\n"
                  f"# Toy-world result: {metric} {table[table.eligible].iloc[0][metric]:.3f}, final entropy {table[table.eligible].iloc[0]['entropy']:.3f} nats.\n"
                  f"# The method block is exactly the chosen MethodConfig; the learning rate does not transfer (see the command's output).\n")
        atomic_write_text(out, header + yaml.safe_dump(recipe, sort_keys=False))
    prediction = None
    if cal is not None:
        steps = int(training.get("steps") or chosen.get("steps") or 300)
        curve = predicted_curve(chosen, rho, steps)
        toy_channel = chosen.get("feedback", "continuous")
        llm_channel = {v: k for k, v in LLM_TO_TOY.items()}.get(toy_channel, toy_channel)
        trust = {"channel": llm_channel, "rho": rho, "rho_status": rho_status, "calibration": str(calibration),
                 "calibration_scale": cal.get("scale"), "steps": steps,
                 "agreement": {k: cal["transfer"][k] for k in ("kendall", "signs", "steps", "llm_points", "llm_seeds_per_point")
                               if k in cal["transfer"]} if "transfer" in cal else None,
                 "how_to_read": "kendall: rank agreement (Kendall tau, 95% CI) of the toy world's and the tiny LLM's means over the "
                                "calibration grid; signs: how many method differences (sdpo-grpo, hybrid-grpo, sdpo-hybrid per channel x noise) "
                                "had the same sign in both worlds. Near 0 or negative: do not trust the predicted curve's ranking.",
                 "note": "the toy world's learning rate, world size and reward scale do not transfer: read the curve's shape and the "
                         "ranking, not its numbers"}
        prediction = {**trust, "curve": curve}
        if out is not None:
            stem = Path(out).with_name(Path(out).stem)
            atomic_write_text(stem.with_name(stem.name + PREDICTION_FILES[0]), curve.to_csv(index=False))
            title = f"toy world's prediction: {chosen['method']} on {toy_channel} at ρ = {rho:g} ({rho_status}), {curve.seeds.iloc[0]} seeds"
            save_figure(fig_predicted(curve, title), stem.with_name(stem.name + "-predicted-curve"))
            stem.with_name(stem.name + "-predicted-curve.svg").unlink(missing_ok=True)  # the PNG is the file promised
            atomic_write_text(stem.with_name(stem.name + PREDICTION_FILES[2]), json.dumps(trust, indent=2) + "\n")
            prediction["files"] = [str(stem.with_name(stem.name + s)) for s in PREDICTION_FILES]
    return Promotion(recipe, chosen, table, notes, rule, prediction)
