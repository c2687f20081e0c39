"""How sdpo_sim.train.DEFAULT_LR was chosen (a pilot, not the experiments' tuning).

For each method, Adam learning rates {0.01, 0.03, 0.1, 0.3} on *tuning* seeds 1000–1007 (disjoint
from the evaluation seeds 0..) of task seed 0, default world (V=8, T=6, markov), continuous
feedback, noise 0, bayes teacher rho=0.5, 300 steps; criterion: area under the exact-reward curve
(mean reward over evaluation steps). Writes benchmarks/results/default_lr_pilot.json.

    .venv/bin/python benchmarks/pilot_default_lr.py
"""

from __future__ import annotations

import json
import time

import torch

from _common import RESULTS_DIR, ROOT  # noqa: F401  (puts the repository on sys.path)
from sdpo_sim.core.io import atomic_write_text
from sdpo_sim.train import RunConfig, run

LRS = (0.01, 0.03, 0.1, 0.3)
METHODS = ("reinforce", "grpo", "sdpo", "hybrid")


def main() -> None:
    torch.set_num_threads(1)
    table, start = {}, time.time()
    for method in METHODS:
        table[method] = {}
        for lr in LRS:
            cfg = RunConfig.from_dict(dict(method=method, lr=lr, seeds=8, seed_start=1000, steps=300, task_seed=0))
            h = run(cfg).history
            curve = h.groupby("step").reward.mean()
            table[method][lr] = {"auc": float(curve.mean()), "final": float(curve.iloc[-1])}
            print(f"{method:10s} lr={lr:<5} auc={curve.mean():.4f} final={curve.iloc[-1]:.4f}", flush=True)
    best = {m: max(LRS, key=lambda lr: table[m][lr]["auc"]) for m in METHODS}
    print("best by AUC:", best)
    payload = {"criterion": "mean exact reward over evaluation steps (AUC), tuning seeds 1000-1007, task 0",
               "best": best, "table": {m: {str(k): v for k, v in t.items()} for m, t in table.items()},
               "wall_time_s": round(time.time() - start, 1)}
    atomic_write_text(RESULTS_DIR / "default_lr_pilot.json", json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
