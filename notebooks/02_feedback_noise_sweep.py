# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Feedback × noise sweep
#
# A sweep is a YAML (or dict) spec: a `base` of shared fields, a `grid` whose lists are crossed,
# optional `cases` and `blocks`, and an optional `tuning` block that picks each method's learning
# rate on seeds disjoint from the evaluation seeds. Results are tidy Parquet/CSV tables; the sweep
# is resumable (re-running this cell skips finished runs). See docs/experiments.md.

# %%
import os
from pathlib import Path

import pandas as pd
from IPython.display import Image, display

from sdpo_sim import stats
from sdpo_sim.plots import write_figures
from sdpo_sim.sweep import Spec, run_sweep

SMALL = os.environ.get("SDPO_NOTEBOOK_SCALE", "full") == "small"
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
OUT = Path(os.environ.get("SDPO_NOTEBOOK_OUT", ROOT / "outputs" / "notebooks"))
if SMALL:
    base = {"vocab_size": 4, "seq_len": 3, "steps": 20, "seeds": 3, "batch_size": 16, "eval_every": 5}
    grid = {"feedback": ["binary", "critique"], "noise": [0.0, 0.3]}
    tuning = {"lr": [0.1, 0.3], "seeds": 2, "seed_start": 1000, "where": {"feedback": "critique", "noise": 0.0}}
else:
    base = {"steps": 200, "seeds": 8, "eval_every": 10}
    grid = {"feedback": ["binary", "ordinal", "continuous", "critique"], "noise": [0.0, 0.1, 0.3]}
    tuning = {"lr": [0.03, 0.1, 0.3, 1.0], "seeds": 4, "seed_start": 1000, "where": {"feedback": "continuous", "noise": 0.0}}
spec = Spec.from_dict({
    "name": "feedback-noise",
    "base": base,
    "grid": grid,
    "cases": [{"method": "reinforce"}, {"method": "sdpo"}, {"method": "hybrid", "controller": "divergence"}],
    "tuning": tuning,
})
result = run_sweep(spec, OUT / "02_sweep", workers=1 if SMALL else 2, progress=not SMALL)
print(result.report())

# %% [markdown]
# The learning rates tuning chose (criterion: area under the exact-reward curve on the tuning seeds):

# %%
pd.DataFrame(result.tuning["selected"])

# %% [markdown]
# `seeds` has one row per (run, seed): reward at budgets 10/30/100/last, AUC, entropy drop, credit
# correlation. Means with 95% bootstrap CIs over seeds:

# %%
stats.summarize(result.seeds, "final_reward", ["method", "feedback", "noise"]).round(3)

# %% [markdown]
# Paired differences use shared seeds and task seeds, which removes the luck both methods share:

# %%
stats.paired_difference(result.seeds, "final_reward", "method", "sdpo", "reinforce", by=["feedback", "noise"]).round(3)

# %%
figs = write_figures({"history": result.history, "seeds": result.seeds}, OUT / "02_figures", names=["learning_curves", "noise_robustness"])
for name, (png, svg) in figs.items():
    display(Image(filename=str(png)))
