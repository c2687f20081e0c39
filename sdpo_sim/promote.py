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

import pandas as pd
import yaml

from .core.io import atomic_write_text, check_output_file, read_yaml_file
from .stats import bootstrap_ci
from .tables import load_tables
from .train import RunConfig

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
            eval_dataset: Optional[str] = None) -> Promotion:
    """Select a configuration from a sweep and build (and optionally write) the LLM recipe.

    With ``dataset`` and ``reward_funcs`` the recipe runs on the user's task (``task.dataset``, ``task.reward_funcs``,
    ``task.reward_weights``, ``task.eval_dataset``; paths written absolute so the recipe runs from any directory).
    Checked in this order, before anything is written: the sweep directory, the user task, the base recipe (``None``:
    :func:`default_base`), the output path, the rule."""
    tables = load_tables(sweep_dir)
    check_user_task(dataset, list(reward_funcs), reward_weights, eval_dataset)
    base = default_base() if base is None else Path(base)
    recipe = read_yaml_file(base, "base recipe", "pass --base PATH to an LLM recipe file (e.g. llm/recipes/tiny-cpu.yaml)")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("method"), dict):
        raise ValueError(f"base recipe {base} has no `method:` mapping; is it an LLM recipe?")
    if out is not None:
        check_output_file(out, "recipe output file")
    chosen, table, rule = select(tables["seeds"], entropy_floor=entropy_floor, metric=metric, method=method)
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
    return Promotion(recipe, chosen, table, notes, rule)
