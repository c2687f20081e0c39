"""Shared helpers of the LLM tests: a locally built tiny model and recipes pointing at it, and lock-step
runs (a reference trainer that follows another's weights, so both compute every gradient at the same weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llm.recipe import Recipe, load_recipe, resolve_recipe_path

EPS32 = torch.finfo(torch.float32).eps  # 2^-23 ≈ 1.19e-7


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


def metrics_rows(out_dir: Path) -> list[dict]:
    """The rows a run logged to ``out_dir/metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def record_update_grads(trainer) -> list[dict]:
    """Each optimiser update's accumulated gradients (full tensors: FSDP2 shards are gathered, on every rank),
    taken before clipping (clipping to the same norm could hide a scale error); appended to the returned list."""
    grads, clip = [], trainer.acc.clip_grad_norm_

    def record_then_clip(params, max_norm):
        grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for n, p in trainer.unwrapped.named_parameters() if p.grad is not None})
        return clip(params, max_norm)

    trainer.acc.clip_grad_norm_ = record_then_clip
    return grads


def keep_updates(trainer, keep_dir: Path) -> None:
    """After every optimiser update K, the main process saves the full weights (``weights-K.pt``) and the
    update's pre-clip gradients (``grads-K.pt``) under ``keep_dir``, for :func:`follow_updates`."""
    keep_dir, grads, step = Path(keep_dir), record_update_grads(trainer), trainer.optimizer.step
    main = trainer.acc.is_main_process
    keep_dir.mkdir(parents=True, exist_ok=True)

    def step_and_keep():
        step()
        state = get_model_state_dict(trainer.unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if main:
            k = len(grads) - 1
            torch.save(grads[k], keep_dir / f"grads-{k}.pt")
            torch.save({n: t.detach().clone() for n, t in state.items()}, keep_dir / f"weights-{k}.pt")

    trainer.optimizer.step = step_and_keep


def follow_updates(trainer, keep_dir: Path) -> list[dict]:
    """Make ``trainer`` follow the run kept in ``keep_dir``: its optimiser update K loads that run's weights
    after update K instead of stepping, so both compute every rollout and gradient at identical weights.
    Returns this trainer's pre-clip gradients per update (see :func:`record_update_grads`)."""
    grads = record_update_grads(trainer)

    def load_kept():
        kept = torch.load(Path(keep_dir) / f"weights-{len(grads) - 1}.pt", weights_only=True)
        with torch.no_grad():
            for n, p in trainer.unwrapped.named_parameters():
                p.copy_(kept[n])

    trainer.optimizer.step = load_kept
    return grads


def kept_grads(keep_dir: Path) -> list[dict]:
    """The pre-clip gradients :func:`keep_updates` saved, in update order."""
    paths = sorted(Path(keep_dir).glob("grads-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return [torch.load(p, weights_only=True) for p in paths]


def assert_grads_close(got: list[dict], want: list[dict], positions: int) -> None:
    """Every update's gradients agree tensor by tensor up to float32 accumulation order.

    A weight gradient sums one term per position of the batch, ``positions`` of them; a float32 sum of n terms
    errs by at most (n−1)·u·Σ|terms| (Higham, recursive summation; u = eps/2), and Σ|terms| is taken as the
    tensor's max|g| (the terms of one sign dominate), so each tensor gets atol ``positions·eps·max|g|``. A
    micro-batch or rank missing or counted twice, or normalised by its own count, moves a gradient by a whole
    fraction of max|g|, far above that."""
    assert len(got) == len(want) and want
    for g_got, g_want in zip(got, want):
        assert g_got.keys() == g_want.keys() and g_want
        for name, g in g_want.items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(g_got[name], g, rtol=0, atol=positions * EPS32 * float(g.abs().max()), msg=name)


def metric_tolerance(trainer) -> float:
    """Absolute tolerance for a loss or logged per-token mean (entropy, divergence) of one step, computed twice in
    ways that differ only in float32 accumulation order (and kernel blocking): a mean of n terms of size ≤ S errs
    by at most (n−1)·u·S ≤ n·eps·S (Higham), here n ≤ completions·max_new_tokens tokens and S = log V (the tiny
    model is near-uniform: its log-probs, entropies and KL terms have that size; |advantages| ≤ 1). ≈ 2e-5 for the
    test recipes, against observed differences ≤ 5e-7; a factor 2 or a missing term in a loss ≳ 1e-4 exceeds it."""
    t, m = trainer.recipe.training, trainer.recipe.method
    vocab = trainer.unwrapped.get_output_embeddings().weight.shape[0]
    return t.prompts_per_step * m.num_generations * t.max_new_tokens * EPS32 * math.log(vocab)


def batch_positions(recipe: Recipe) -> int:
    """An upper bound on the positions of one step's student batch: completions·(max_prompt_length + max_new_tokens)."""
    t = recipe.training
    return t.prompts_per_step * recipe.method.num_generations * (t.max_prompt_length + t.max_new_tokens)
