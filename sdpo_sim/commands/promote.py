"""``sdpo-sim promote DIR``: turn the best validated sweep configuration into an LLM recipe."""

from __future__ import annotations

import argparse

from ..core.config_fields import field_choices
from ..core.method import MethodConfig
from .sweep import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("promote", help="write an LLM recipe whose method block is the sweep's best configuration",
                              description="Rule: highest mean final exact reward among configurations whose mean final per-token entropy "
                                          "≥ --entropy-floor (oracle/seed-paper/null teachers excluded). Prints what does not transfer.")
    p.add_argument("sweep", help="a finished sweep directory")
    p.add_argument("--method", default=None, choices=field_choices(MethodConfig, "name"), help="only consider this method")
    p.add_argument("--base", default=None, help="LLM recipe to start from (default: the packaged llm/recipes/tiny-cpu.yaml, from any directory)")
    p.add_argument("--out", default=None, help="where to write the recipe (default SWEEP/promoted-recipe.yaml)")
    p.add_argument("--entropy-floor", type=float, default=0.5, help="minimal mean final per-token entropy, nats (default 0.5)")
    p.add_argument("--metric", default="final_reward", choices=["final_reward", "auc"], help="what 'best' maximises (default final_reward)")
    p.add_argument("--top", type=positive_int, default=5, help="show this many candidates")
    p.add_argument("--dataset", default=None, help="your prompts (.jsonl/.json, .parquet, .csv or a save_to_disk directory with a prompt column): the recipe trains on them")
    p.add_argument("--reward-funcs", nargs="+", default=[], metavar="SPEC", help="your reward functions: module:function, path/to/file.py:function or a model directory (with --dataset)")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, metavar="W", help="one weight > 0 per reward function (default: equal)")
    p.add_argument("--calibration", default=None, metavar="FILE|none",
                   help="a `sdpo-sim calibrate` JSON: simulate the chosen config at its channel's calibrated ρ and write the predicted "
                        "curve (CSV, PNG) and the measured toy-vs-LLM agreement beside the recipe (default: the committed CALIBRATION.json "
                        "if present; none: skip)")
    p.add_argument("--eval-dataset", default=None, help="held-out prompts for training.eval_steps (same formats as --dataset)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..promote import default_calibration, promote

    out = Path(args.out or Path(args.sweep) / "promoted-recipe.yaml")
    calibration = None if args.calibration == "none" else (args.calibration or default_calibration())
    res = promote(args.sweep, base=args.base, out=out, entropy_floor=args.entropy_floor, metric=args.metric, method=args.method,
                  dataset=args.dataset, reward_funcs=args.reward_funcs, reward_weights=args.reward_weights, eval_dataset=args.eval_dataset,
                  calibration=calibration)
    cols = ["method", "feedback", "teacher", "controller", args.metric, "entropy", "n", "eligible"]
    print(f"rule: {res.rule}\n")
    print(res.candidates[cols].head(args.top).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nchosen method block:")
    for k, v in res.recipe["method"].items():
        print(f"  {k}: {v}")
    print("\ndoes not transfer (set or tune these in the LLM world):")
    for name, value, why in res.not_transferred:
        print(f"  {name} = {value!r}: {why}")
    if args.dataset is not None:
        print(f"\ntask: your dataset {res.recipe['task']['dataset']} with reward functions {', '.join(res.recipe['task']['reward_funcs'])}")
    if res.prediction is not None:
        pr = res.prediction
        print(f"\nexpect (toy world at the calibrated ρ = {pr['rho']:g} of {pr['channel']}, {pr['rho_status']}): reward "
              f"{pr['curve'].reward.iloc[0]:.3f} → {pr['curve'].reward.iloc[-1]:.3f} over {pr['steps']} steps")
        for k in (pr["agreement"] or {}).get("kendall", []):
            print(f"  measured toy-vs-LLM rank agreement, {k['metric']}: Kendall τ {k['tau']:+.2f} [{k['ci_lo']:+.2f}, {k['ci_hi']:+.2f}]")
        for f in pr.get("files", []):
            print(f"  wrote {f}")
    print(f"\nwrote {out}")
    return 0
