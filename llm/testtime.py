"""``sdpo-llm testtime``: test-time discovery on the tiny LLM's word task, best-of-k vs SDPO (docs/testtime.md).

The tiny-model counterpart of :mod:`sdpo_sim.testtime`. A run is one hard prompt and one seed: the shipped
``tiny-cpu`` recipe's trainer (:class:`llm.trainer.Trainer`, one prompt per step, ``num_generations`` attempts per
update) steps until an attempt scores ``judge_word ≥ threshold`` (default 1.0: every constraint met) or the budget
of ``attempts`` is spent; the discovery time is the 1-based index of that attempt. Best-of-k from the fixed policy
is ``mean_i [1 − (1 − p_i)^k]`` over the hard prompts, ``p_i`` estimated from ``estimate`` fresh attempts each (its
band: each p_i's Wilson interval; the ratios' CIs redraw it).

Rules stated before any result: the candidates are the first ``candidates`` prompts of the word-constraints sampler
(``random.Random(prompt_seed)``); a candidate is *hard* when ``0 < successes ≤ max_pilot_rate·pilot`` in ``pilot``
attempts of the fixed policy (seeded apart from everything else); the first ``prompts`` hard candidates are used, and
their ``p_i`` is re-estimated on fresh attempts so the selection does not bias the baseline.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from sdpo_sim.core import discovery
from sdpo_sim.core.cli_args import OneLineParser
from sdpo_sim.core.config_fields import add_field_flags, add_set_flag, given_fields, merge_overrides, setting
from sdpo_sim.core.io import atomic_write, atomic_write_text, check_output_dir, check_output_file
from sdpo_sim.core.validation import check_choice, check_int, check_number, fail

from .recipe import load_recipe, resolve_recipe_path
from .tasks import Task, judge_word, sample_word_prompts
from .tiny import build_tiny
from .tiny_pretrain import PretrainConfig, pretrain_dir
from .trainer import Trainer

PROG = "sdpo-llm testtime"
METHODS = ("sdpo", "grpo", "reinforce")
FEEDBACK = ("critique", "continuous", "ordinal", "binary")
PILOT_SEED, ESTIMATE_SEED = 1_000_003, 2_000_003  # training.seed of the fixed-policy samplers (runs use 0, 1, ...)
SAMPLE_GROUP = 128  # fixed-policy attempts per prompt and rollout call
_OWNER = "LLMTestTimeConfig"


@dataclass
class LLMTestTimeConfig:
    """One test-time discovery experiment on the tiny LLM (``sdpo-llm testtime``)."""

    model: Optional[str] = setting(None, "path of a saved tiny model; null: build one (hidden 64, 2 layers, seed 0) and pretrain it pretrain_steps steps")
    pretrain_steps: int = setting(150, "supervised pretraining steps of the model built when model is null, ≥ 0")
    methods: list = setting(factory=lambda: ["sdpo", "grpo"], help="methods that update between attempts (sdpo, grpo, reinforce), each against best-of-k")
    threshold: float = setting(1.0, "success: judge_word score ≥ threshold, in (0, 1] (1: every constraint met)")
    candidates: int = setting(16, "candidate prompts drawn from the word-constraints sampler, ≥ 1")
    prompt_seed: int = setting(1234, "seed of the candidate prompts")
    prompts: int = setting(4, "hard prompts used: the first ones among the candidates, ≥ 1")
    pilot: int = setting(256, "fixed-policy attempts per candidate that decide which are hard, a multiple of 128")
    max_pilot_rate: float = setting(0.02, "a candidate is hard when 0 < pilot successes ≤ max_pilot_rate·pilot, in (0, 1)")
    estimate: int = setting(2048, "fresh fixed-policy attempts per hard prompt estimating its p_i (best-of-k), a multiple of 128")
    attempts: int = setting(64, "K: attempts per run (rounded up to whole updates), ≥ 1")
    num_generations: int = setting(8, "attempts per update (one group of the one prompt), ≥ 2")
    seeds: int = setting(32, "runs per hard prompt and method (training.seed 0..seeds−1), ≥ 1")
    learning_rate: Optional[float] = setting(None, "training.learning_rate; null: the tiny-cpu recipe's")
    feedback: str = setting("critique", "task.feedback the updating methods see (the tiny-cpu recipe's is critique)", choices=FEEDBACK)
    levels: list = setting(factory=lambda: [0.22, 0.5], help="discovery levels at which the attempts ratio is reported, each in (0, 1)")
    n_boot: int = setting(2000, "bootstrap draws for the ratios' CIs, ≥ 100")
    threads: int = setting(1, "torch threads (tiny models run no faster on more; a shared CPU runs much slower)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "LLMTestTimeConfig":
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            fail(_OWNER, "model", self.model, "holds no saved model (config.json missing); build one with sdpo-llm make-tiny or give null")
        if not isinstance(self.methods, list) or not self.methods or len(set(map(str, self.methods))) != len(self.methods):
            fail(_OWNER, "methods", self.methods, f"must be a non-empty list of distinct names among {', '.join(METHODS)}")
        for m in self.methods:
            check_choice(_OWNER, "methods", m, METHODS)
        check_choice(_OWNER, "feedback", self.feedback, FEEDBACK)
        check_number(_OWNER, "threshold", self.threshold, 0, 1, lo_open=True, why="judge_word scores lie in [0, 1]")
        check_number(_OWNER, "max_pilot_rate", self.max_pilot_rate, 0, 1, lo_open=True)
        for name, lo in (("pretrain_steps", 0), ("candidates", 1), ("prompts", 1), ("attempts", 1), ("num_generations", 2),
                         ("seeds", 1), ("n_boot", 100), ("threads", 1), ("prompt_seed", 0)):
            check_int(_OWNER, name, getattr(self, name), lo)
        for name in ("pilot", "estimate"):
            check_int(_OWNER, name, getattr(self, name), SAMPLE_GROUP)
            if getattr(self, name) % SAMPLE_GROUP:
                fail(_OWNER, name, getattr(self, name), f"must be a multiple of {SAMPLE_GROUP} (attempts per rollout call)")
        if self.learning_rate is not None:
            check_number(_OWNER, "learning_rate", self.learning_rate, 0, 1, lo_open=True)
        if not isinstance(self.levels, list) or not self.levels:
            fail(_OWNER, "levels", self.levels, "must be a non-empty list of numbers in (0, 1)")
        for lv in self.levels:
            check_number(_OWNER, "levels", lv, 0, 1, lo_open=True)
            if lv >= 1:
                fail(_OWNER, "levels", lv, "must be < 1 (no finite budget is sure to discover)")
        return self

    @property
    def steps(self) -> int:
        return math.ceil(self.attempts / self.num_generations)

    @classmethod
    def from_dict(cls, data: dict) -> "LLMTestTimeConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {_OWNER} field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}")
        values = dict(data)
        for name in ("threshold", "max_pilot_rate", "learning_rate"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        return cls(**values)


SCALES = {  # canonical: docs/testtime.md (≤ 5 min on 2 cores); small: the tests (a random tiny model, a low threshold)
    "canonical": {},
    "small": {"pretrain_steps": 0, "threshold": 0.5, "candidates": 4, "prompts": 2, "pilot": 128, "max_pilot_rate": 0.2,
              "estimate": 128, "attempts": 8, "num_generations": 4, "seeds": 3, "n_boot": 100},
}


def fixed_prompts_task(prompts: Sequence[str]) -> Task:
    """The word task with a fixed prompt list: a step of ``n`` prompts gets ``prompts`` (``n`` = their number), or the
    one prompt ``n`` times."""
    prompts = list(prompts)

    def sample(rng: random.Random, n: int) -> list[str]:
        return prompts if n == len(prompts) else [prompts[0]] * n

    return Task("word-constraints-fixed", sample, judge_word, "word-constraints on fixed prompts")


def make_recipe(cfg: LLMTestTimeConfig, model: Path, out: Path, *, method: str, seed: int, prompts_per_step: int, group: int):
    """The shipped tiny-cpu recipe for one trainer of this experiment (nothing saved, no heat-maps)."""
    overrides = {"model.path": str(model), "training.output_dir": str(out), "training.seed": seed,
                 "training.prompts_per_step": prompts_per_step, "method.num_generations": group, "method.name": method,
                 "training.steps": cfg.steps, "training.save_every": 0, "training.heatmap_every": 0,
                 "training.feedback_credit_every": 0, "task.feedback": cfg.feedback}
    if cfg.learning_rate is not None:
        overrides["training.learning_rate"] = cfg.learning_rate
    return load_recipe(resolve_recipe_path("tiny-cpu"), overrides)


def fixed_policy_successes(cfg: LLMTestTimeConfig, model: Path, out: Path, prompts: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Successes ``[len(prompts)]`` among ``n`` attempts per prompt of the fixed (never updated) policy."""
    trainer = Trainer(make_recipe(cfg, model, out, method="grpo", seed=seed, prompts_per_step=len(prompts), group=SAMPLE_GROUP),
                      task=fixed_prompts_task(prompts))
    hits = np.zeros(len(prompts), dtype=int)
    for step in range(n // SAMPLE_GROUP):
        _, info = trainer.rollout(step)
        for i, (p, text) in enumerate(zip(info["prompts"], info["texts"])):
            hits[i // SAMPLE_GROUP] += judge_word(p, text).score >= cfg.threshold
    return hits


def discovery_time(cfg: LLMTestTimeConfig, model: Path, out: Path, prompt: str, method: str, seed: int) -> float:
    """1-based index of the run's first attempt with score ≥ threshold (``inf`` if none in ``attempts``): the trainer
    updates on each group of ``num_generations`` attempts; a run stops at its discovery (later attempts do not matter)."""
    trainer = Trainer(make_recipe(cfg, model, out, method=method, seed=seed, prompts_per_step=1, group=cfg.num_generations),
                      task=fixed_prompts_task([prompt]))
    for step in range(cfg.steps):
        info = trainer.step(step)["_heatmap"][0]
        for j, text in enumerate(info["texts"]):
            index = step * cfg.num_generations + j + 1
            if index <= cfg.attempts and judge_word(prompt, text).score >= cfg.threshold:
                return float(index)
    return math.inf


def run_testtime(cfg: LLMTestTimeConfig, work: Path, *, progress: bool = True) -> dict[str, Any]:
    """The experiment (``work``: scratch directory for the model and the trainers): ``{"table", "ratios", "prompts",
    "p", "pilot", "config"}``; ``table`` has the rows of :data:`sdpo_sim.core.discovery.COLUMNS`."""
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per trainer would bury the run's own bar
    try:
        model = Path(cfg.model) if cfg.model else build_tiny(work / "tiny-model", hidden_size=64, num_layers=2, seed=0)
        if cfg.model is None and cfg.pretrain_steps:
            pretrain_dir(model, "word-constraints", config=PretrainConfig(steps=cfg.pretrain_steps, seed=0))
        candidates = sample_word_prompts(random.Random(cfg.prompt_seed), cfg.candidates)
        pilot = fixed_policy_successes(cfg, model, work / "pilot", candidates, cfg.pilot, PILOT_SEED)
        hard = [p for p, h in zip(candidates, pilot) if 0 < h <= cfg.max_pilot_rate * cfg.pilot][: cfg.prompts]
        if not hard:
            raise ValueError(f"no candidate prompt is hard: pilot successes {pilot.tolist()} of {cfg.pilot} at threshold {cfg.threshold}; "
                             f"none in (0, {cfg.max_pilot_rate * cfg.pilot:g}]. Change threshold, max_pilot_rate or candidates")
        p = fixed_policy_successes(cfg, model, work / "estimate", hard, cfg.estimate, ESTIMATE_SEED) / cfg.estimate
        if not p.mean() > 0:
            raise ValueError(f"the hard prompts had no success in {cfg.estimate} fresh attempts each; raise estimate")
        tables, ratios, per_run = [discovery.best_of_k_table(p, cfg.attempts, p_trials=cfg.estimate)], {}, []
        jobs = [(m, i, s) for m in cfg.methods for i in range(len(hard)) for s in range(cfg.seeds)]
        times = {m: [] for m in cfg.methods}
        for m, i, s in tqdm(jobs, disable=not progress, desc="sdpo-llm testtime", unit="run"):
            t = discovery_time(cfg, model, work / "runs", hard[i], m, s)
            times[m].append(t)
            per_run.append({"method": m, "prompt": i, "seed": s, "first_hit": t})
        groups = np.repeat(np.arange(len(hard)), cfg.seeds)
        for m in cfg.methods:
            first = np.asarray(times[m])
            tables.append(discovery.curve_table(m, first, cfg.attempts))
            ratios[m] = discovery.bootstrap_ratios(first, cfg.attempts, p, cfg.levels, p_trials=cfg.estimate, groups=groups,
                                                   n_boot=cfg.n_boot, seed=0)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    return {"table": pd.concat(tables, ignore_index=True), "ratios": ratios, "prompts": hard, "p": p.tolist(),
            "pilot": dict(zip(candidates, pilot.tolist())), "runs": per_run, "config": asdict(cfg)}


# ----------------------------------------------------------------------------- command line
def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Test-time discovery on the tiny LLM: the probability of an attempt scoring ≥ threshold "
                                                  "within k attempts, best-of-k from the fixed policy vs SDPO/GRPO updating between attempts.")
    parser.add_argument("--out", required=True, help="output directory (testtime_llm.csv, testtime_llm.json, the figure)")
    parser.add_argument("--scale", default="canonical", choices=list(SCALES), help="preset sizes: canonical (docs/testtime.md) or small (tests)")
    parser.add_argument("--figure", default=None, metavar="STEM", help="figure path without extension (default DIR/testtime_llm)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_set_flag(parser, key_form="field", example="seeds=8")
    parser.set_defaults(field_dests=add_field_flags(parser.add_argument_group(f"experiment ({_OWNER})"), LLMTestTimeConfig))
    return parser


def _clean(x):
    """JSON-able: NaN and ±inf become None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate (nothing is created for refused input), run, write CSV + JSON + PNG; bad input raises ValueError
    (``sdpo-llm`` prints it as one line, exit 2)."""
    args = build_parser().parse_args(argv)
    cfg = LLMTestTimeConfig.from_dict({**SCALES[args.scale], **merge_overrides(given_fields(args, args.field_dests), args.set)})
    out = check_output_dir(args.out)
    stem = Path(args.figure) if args.figure else out / "testtime_llm"
    check_output_file(stem.with_suffix(".png"), "figure")
    with tempfile.TemporaryDirectory(prefix="sdpo-llm-testtime-") as work:
        res = run_testtime(cfg, Path(work), progress=args.progress)
    out.mkdir(parents=True, exist_ok=True)
    table = res["table"]
    atomic_write_text(out / "testtime_llm.csv", table.to_csv(index=False))
    doc = {k: res[k] for k in ("prompts", "p", "pilot", "ratios", "config", "runs")}
    doc["rows"] = table.to_dict(orient="records")
    doc["command"] = f"{PROG} --scale {args.scale} (config: see 'config')"
    atomic_write_text(out / "testtime_llm.json", json.dumps(_clean(doc), indent=1) + "\n")
    title = (f"tiny LLM, word task: {len(res['prompts'])} hard prompts, success = score ≥ {cfg.threshold:g}, mean p = {np.mean(res['p']):.4f}; "
             f"{cfg.num_generations} attempts per update, {cfg.seeds} runs per prompt, {cfg.feedback} feedback")
    fig = discovery.plot_discovery(table, title=title, levels=cfg.levels, ylabel="P(discovered score ≥ τ within k attempts)")
    png = stem.with_suffix(".png")
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight", metadata={"Software": None}))
    print(f"hard prompts (p_i from {cfg.estimate} fresh attempts each): " + "; ".join(f"{p.strip()!r} p={q:.4f}" for p, q in zip(res["prompts"], res["p"])))
    for method, r in res["ratios"].items():
        parts = [f"{name}: " + (f"{v['value']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}]" if v["value"] else "not reached within K")
                 for name, v in r.items()]
        d_end = table[(table.method == method) & (table.k == cfg.attempts)].discovery.item()
        print(f"  {method:10s} D(K) = {d_end:.3f}; attempts ratio best-of-k/{method} (95% CI) " + "; ".join(parts))
    d_best = table[(table.method == discovery.BEST_OF_K) & (table.k == cfg.attempts)].discovery.item()
    print(f"  {discovery.BEST_OF_K:10s} D(K) = {d_best:.3f}")
    print(f"wrote {out / 'testtime_llm.csv'}, {out / 'testtime_llm.json'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
