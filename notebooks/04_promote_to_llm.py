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
# # 04 · Promoting a configuration to an LLM recipe
#
# One `MethodConfig` describes a method in both worlds. `promote` picks a configuration from a
# sweep by a stated rule — by default the best mean final reward among configurations whose mean
# final per-token entropy stays above a floor (teachers that cannot exist in an LLM, such as
# `oracle`, are excluded) — and writes an LLM recipe whose `method:` block is exactly it. The
# learning rate and the toy-world-only settings do not transfer; it says so.

# %%
import os
from pathlib import Path

import yaml

from sdpo_sim.core.method import MethodConfig
from sdpo_sim.promote import promote
from sdpo_sim.sweep import Spec, run_sweep
from sdpo_sim.train import RunConfig

SMALL = os.environ.get("SDPO_NOTEBOOK_SCALE", "full") == "small"
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
OUT = Path(os.environ.get("SDPO_NOTEBOOK_OUT", ROOT / "outputs" / "notebooks"))
sweep_dir = OUT / "02_sweep"
if not (sweep_dir / "summary.parquet").is_file():  # notebook 02 not run yet: a small sweep of our own
    base = {"vocab_size": 4, "seq_len": 3, "steps": 20, "seeds": 3, "batch_size": 16, "eval_every": 5} if SMALL else {"steps": 200, "seeds": 8}
    sweep_dir = OUT / "04_sweep"
    run_sweep(Spec.from_dict({"base": {**base, "feedback": "critique"}, "grid": {"method": ["reinforce", "sdpo", "hybrid"]}}), sweep_dir,
              workers=1, progress=False)

# %%
floor = 0.3 if SMALL else 0.5  # nats per token; ln V is the maximum
res = promote(sweep_dir, base=ROOT / "llm" / "recipes" / "tiny-cpu.yaml", out=OUT / "promoted-recipe.yaml", entropy_floor=floor)
print(res.rule)
res.candidates[["method", "feedback", "teacher", "controller", "final_reward", "entropy", "n", "eligible"]].head(8)

# %% [markdown]
# The recipe's `method:` block loads as the same `MethodConfig` the toy world ran:

# %%
recipe = yaml.safe_load((OUT / "promoted-recipe.yaml").read_text())
assert MethodConfig.from_dict(recipe["method"]) == RunConfig.from_dict(res.chosen).method
print(yaml.safe_dump({"method": recipe["method"]}, sort_keys=False))

# %% [markdown]
# What does not transfer (tune or set it in the LLM world):

# %%
for name, value, why in res.not_transferred:
    print(f"{name} = {value!r}: {why}")

# %% [markdown]
# Then, on the LLM side (not run here):
#
# ```bash
# sdpo-llm make-tiny --out outputs/tiny-model
# sdpo-llm train --recipe outputs/notebooks/promoted-recipe.yaml
# ```
#
# or from the shell in one step: `sdpo-sim promote outputs/main --base llm/recipes/tiny-cpu.yaml`.
