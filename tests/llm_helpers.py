"""Shared helpers of the LLM tests: a locally built tiny model and recipes pointing at it."""

from __future__ import annotations

from pathlib import Path

from llm.recipe import Recipe, load_recipe, resolve_recipe_path


def tiny_recipe(model_dir: Path, out_dir: Path, **overrides) -> Recipe:
    """The shipped tiny-cpu recipe on ``model_dir``, small and fast, with dotted ``overrides``
    (``training__steps=3`` style keys: ``__`` stands for the dot)."""
    base = {
        "model.path": str(model_dir), "training.output_dir": str(out_dir), "training.steps": 2,
        "training.prompts_per_step": 2, "training.max_new_tokens": 6, "training.save_every": 0,
        "training.heatmap_every": 0, "method.num_generations": 3, "context.max_context_tokens": 200,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_recipe(resolve_recipe_path("tiny-cpu"), base)
