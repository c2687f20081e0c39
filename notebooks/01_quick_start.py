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
# # 01 · Quick start: one configuration, exact metrics
#
# The toy world enumerates every sequence, so the expected reward `J`, the entropy and the true
# credit `A*` of each sampled token are *exact*. Here we train REINFORCE and SDPO on the same task
# and seeds and compare their curves.
#
# Scale: set `SDPO_NOTEBOOK_SCALE=small` for a seconds-long smoke run (CI does); the default is the
# full scale (V=8, T=6, 300 steps, 8 seeds; about a minute on 2 cores).

# %%
import os

import matplotlib.pyplot as plt
import seaborn as sns
import torch

from sdpo_sim.train import RunConfig, run

torch.set_num_threads(1)  # the tabular runs are many tiny ops
SMALL = os.environ.get("SDPO_NOTEBOOK_SCALE", "full") == "small"
WORLD = dict(vocab_size=4, seq_len=3, steps=20, seeds=3, batch_size=16, eval_every=5) if SMALL else dict(steps=300, seeds=8, eval_every=10)
WORLD

# %% [markdown]
# A `RunConfig` takes flat fields: the method (`MethodConfig`: `method`, `alpha`, `controller`, …)
# and the world (`feedback`, `noise`, `rho`, `lr`, `seeds`, …). Unknown fields are refused by name.

# %%
results = {}
for method in ("reinforce", "sdpo"):
    cfg = RunConfig.from_dict({"method": method, "feedback": "critique", **WORLD})
    results[method] = run(cfg)
    s = results[method].summary()
    print(f"{method:9s} final J = {s['final_reward']:.3f}   credit corr = {s['credit_corr']:.3f}   final entropy = {s['entropy']:.3f} nats")

# %% [markdown]
# `history` is tidy: one row per (seed, evaluation step) with the exact metrics.

# %%
results["sdpo"].history.head()

# %%
import pandas as pd

hist = pd.concat([r.history.assign(method=m) for m, r in results.items()])
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
sns.lineplot(data=hist, x="step", y="reward", hue="method", errorbar=("ci", 95), ax=axes[0])
axes[0].set(xlabel="training step", ylabel="exact expected reward J (0–1)")
sns.lineplot(data=hist, x="step", y="entropy", hue="method", errorbar=("ci", 95), ax=axes[1])
axes[1].set(xlabel="training step", ylabel="per-token entropy (nats)")
fig.tight_layout()

# %% [markdown]
# The same from the shell: `sdpo-sim run --method sdpo --feedback critique --seeds 8 --json`.
# Next: notebook 02 sweeps feedback types and noise levels.
