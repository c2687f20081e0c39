"""A tiny stand-in for the toy world, to test the sweep machinery fast (importable by spawned workers)."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

DEFAULTS = {"method": "sdpo", "lr": 0.1, "beta": 1.0, "steps": 20, "seeds": 3, "seed_start": 0, "task_seed": 0, "noise": 0.0, "eval_every": 5, "fail": False}
BEST_LR = {"reinforce": 0.3, "sdpo": 0.1}  # the fake reward curve rises fastest at this lr
BEST_BETA = 2.0  # ... and, for sdpo, at this beta (reinforce ignores beta, as the real one does)


def fake_config(data: dict) -> dict:
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    cfg = {**DEFAULTS, **data}
    if cfg["method"] not in BEST_LR:
        raise ValueError(f"method={cfg['method']!r} is not allowed; choose one of {sorted(BEST_LR)}")
    if not cfg["noise"] >= 0:
        raise ValueError(f"noise={cfg['noise']!r} must be >= 0")
    return cfg


def fake_run(cfg: dict):
    log = os.environ.get("FAKE_RUN_LOG")
    if log:  # one write(2) on an O_APPEND descriptor: lines from parallel workers never interleave
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{cfg['method']} {cfg['lr']} {cfg['seed_start']} {cfg['noise']}\n".encode())
        finally:
            os.close(fd)
    if cfg["fail"]:
        raise RuntimeError("boom: this run was asked to fail")
    rate = 0.2 * math.exp(-abs(math.log(cfg["lr"] / BEST_LR[cfg["method"]])))
    if cfg["method"] == "sdpo":
        rate *= math.exp(-abs(math.log(cfg["beta"] / BEST_BETA)))
    steps = sorted(set(range(0, cfg["steps"] + 1, cfg["eval_every"])) | {cfg["steps"]})
    rows = []
    for seed in range(cfg["seed_start"], cfg["seed_start"] + cfg["seeds"]):
        jitter = np.random.default_rng([seed, cfg["task_seed"]]).normal(0, 0.01)
        for s in steps:
            reward = 0.3 + 0.5 * (1 - math.exp(-rate * s)) - cfg["noise"] + jitter
            rows.append({"seed": seed, "step": s, "reward": reward, "entropy": 2.0 - reward, "seq_entropy": 12 - 6 * reward,
                         "kl_init": reward / 10, "divergence": 0.1, "alpha_mix": float("nan"), "credit_pearson": 0.5,
                         "credit_spearman": 0.5, "credit_pearson_within": 0.4, "grad_cos": 0.3})
    history = pd.DataFrame(rows)
    final = history[history.step == steps[-1]]
    summary = {"final_reward": float(final.reward.mean()), "final_reward_ci95": [0.0, 1.0], "credit_corr": 0.5, "entropy": float(final.entropy.mean()),
               "per_seed": [{"seed": int(r.seed), "final_reward": float(r.reward)} for r in final.itertuples()]}
    return history, summary
