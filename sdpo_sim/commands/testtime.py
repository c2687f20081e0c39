"""``sdpo-sim testtime --out DIR``: test-time discovery of a rare high-reward sequence, best-of-k vs SDPO (docs/testtime.md).

Writes ``DIR/testtime.csv`` (tidy: method × k, discovery probability and its 95% band), its JSON twin
``DIR/testtime.json`` (the same rows plus τ, the exact p, the attempts ratios with bootstrap CIs and the config) and
the figure (PNG + SVG, ``--figure``, default ``DIR/testtime_toy``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..core.config_fields import add_field_flags, add_set_flag, given_fields, merge_overrides
from ..core.discovery import BEST_OF_K, plot_discovery
from ..core.io import atomic_write_text, check_output_dir, check_output_file
from ..plots import ARM_COLORS, palette, save_figure
from ..testtime import SCALES, TestTimeConfig, run_testtime


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "testtime", help="test-time discovery: best-of-k from the fixed policy vs SDPO/GRPO updating between attempts (≤ 5 min)",
        usage="%(prog)s [-h] --out DIR [--scale canonical|small] [--figure STEM] [--set FIELD=VALUE] [--FIELD VALUE ...]",
        description="On one hard toy task (τ: the smallest reward r with P_0(R > r) ≤ tail), the probability of having "
                    "sampled a sequence with R > τ within k attempts: best-of-k exact, the updating methods over many seeds.")
    p.add_argument("--out", required=True, help="output directory (testtime.csv, testtime.json, the figure)")
    p.add_argument("--scale", default="canonical", choices=list(SCALES), help="preset sizes: canonical (docs/testtime.md) or small (tests)")
    p.add_argument("--figure", default=None, metavar="STEM", help="figure path without extension (default DIR/testtime_toy)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_set_flag(p, key_form="field", example="seeds=500")
    p.set_defaults(func=main, field_dests=add_field_flags(p.add_argument_group("experiment (TestTimeConfig)"), TestTimeConfig))


def config_from_args(args: argparse.Namespace) -> TestTimeConfig:
    """The scale's preset, then the fields given by their flags and by ``--set`` (each at most once)."""
    return TestTimeConfig.from_dict({**SCALES[args.scale], **merge_overrides(given_fields(args, args.field_dests), args.set)})


def _clean(x):
    """JSON-able: NaN and ±inf become None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validated before anything is created
    out = check_output_dir(args.out)
    stem = Path(args.figure) if args.figure else out / "testtime_toy"
    check_output_file(stem.with_suffix(".png"), "figure")
    res = run_testtime(cfg, progress=args.progress)
    out.mkdir(parents=True, exist_ok=True)
    table = res["table"]
    atomic_write_text(out / "testtime.csv", table.to_csv(index=False))
    doc = {k: res[k] for k in ("threshold", "p", "reward_range", "ratios", "config")}
    doc["rows"] = table.to_dict(orient="records")
    doc["command"] = f"sdpo-sim testtime --scale {args.scale} (config: see 'config')"
    atomic_write_text(out / "testtime.json", json.dumps(_clean(doc), indent=1) + "\n")
    methods = list(dict.fromkeys(table["method"]))
    title = (f"toy world: task {cfg.task_seed} ({cfg.family}), V={cfg.vocab_size}, T={cfg.seq_len}, τ={res['threshold']:.3f}, "
             f"p={res['p']:.4f}; {cfg.num_generations} attempts per update, {cfg.seeds} runs, {cfg.feedback} feedback")
    fig = plot_discovery(table, colors=palette(methods, ARM_COLORS), title=title, levels=cfg.levels)
    paths = save_figure(fig, stem)
    print(f"τ = {res['threshold']:.4f} (tail rule {cfg.tail:g}: P_0(R > τ) = p = {res['p']:.5f}, exact); K = {cfg.attempts} attempts")
    for method, r in res["ratios"].items():
        parts = [f"{name}: " + (f"{v['value']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}]" if v["value"] else "not reached within K")
                 for name, v in r.items() if isinstance(v, dict)]
        d_end = table[(table.method == method) & (table.k == cfg.attempts)].discovery.item()
        print(f"  {method:10s} D(K) = {d_end:.3f}; attempts ratio best-of-k/{method} (95% CI) " + "; ".join(parts))
    d_best = table[(table.method == BEST_OF_K) & (table.k == cfg.attempts)].discovery.item()
    print(f"  {BEST_OF_K:10s} D(K) = {d_best:.3f}")
    print(f"wrote {out / 'testtime.csv'}, {out / 'testtime.json'}, {', '.join(map(str, paths))}")
    return 0
