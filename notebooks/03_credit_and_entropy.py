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
# # 03 · Credit and entropy
#
# Two questions the toy world answers exactly: does each method's per-token credit agree with the
# true advantage `A*_t = Q(y_≤t) − V(y_<t)`, and what does learning cost in diversity? We reuse the
# sweep of notebook 02 (it is resumed, or run if missing) and add the teacher's self-knowledge `rho`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns
from IPython.display import Image, display

from sdpo_sim import stats
from sdpo_sim.plots import with_arm, write_figures
from sdpo_sim.sweep import Spec, run_sweep

SMALL = os.environ.get("SDPO_NOTEBOOK_SCALE", "full") == "small"
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
OUT = Path(os.environ.get("SDPO_NOTEBOOK_OUT", ROOT / "outputs" / "notebooks"))
base = {"vocab_size": 4, "seq_len": 3, "steps": 20, "seeds": 3, "batch_size": 16, "eval_every": 5} if SMALL else {"steps": 200, "seeds": 8, "eval_every": 10}
spec = Spec.from_dict({
    "name": "credit-rho",
    "base": {**base, "method": "sdpo"},
    "grid": {"feedback": ["binary", "critique"] if SMALL else ["binary", "continuous", "critique"],
             "rho": [0.0, 1.0] if SMALL else [0.0, 0.25, 0.5, 0.75, 1.0], "teacher_kind": ["ema", "live"]},
})
result = run_sweep(spec, OUT / "03_rho", workers=1 if SMALL else 2, progress=not SMALL)
seeds, history = with_arm(result.seeds), with_arm(result.history)
print(result.report())

# %% [markdown]
# Credit correlation (Pearson with `A*` on sampled tokens, averaged over evaluation steps). With an
# EMA teacher, `log p_T − log p_θ` also carries the lag between teacher network and student, which
# is not credit; a live teacher removes it. At `rho = 0` with a scalar score SDPO's credit is
# REINFORCE's (uniform within a completion).

# %%
g = sns.catplot(data=seeds, x="rho", y="credit_corr", hue="feedback", col="teacher_kind", kind="point", errorbar=("ci", 95), height=3)
g.set_axis_labels("teacher self-knowledge ρ", "credit correlation with A* (Pearson r)");

# %% [markdown]
# The credit at step 0 measures the teacher alone (same initial policy for every run):

# %%
first = history[history.step == 0]
stats.summarize(first, "credit_pearson", ["feedback", "rho"]).round(3)

# %% [markdown]
# Entropy must be compared at matched reward: a method that has not learned keeps maximal entropy.
# Here: per-token entropy at the first step each run reaches the given reward levels.

# %%
h = history[history.teacher_kind == "live"]
lo, hi = h.reward.min(), h.groupby("run_id").reward.max().min()
levels = [round(lo + f * (hi - lo), 3) for f in (0.5, 0.8)]
stats.entropy_at_matched_reward(h, levels, by=["feedback", "rho"]).round(3)

# %%
figs = write_figures({"history": result.history, "seeds": result.seeds}, OUT / "03_figures", names=["rho_sensitivity", "entropy_reward"])
for name, (png, svg) in figs.items():
    display(Image(filename=str(png)))
