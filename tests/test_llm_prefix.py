"""Shared-prompt-prefix forward: each prompt of a group runs once and its key/value cache serves the
group's completions. It must give the plain forward's outputs and gradients (exactly in float64, once the
model's float32 RMSNorm upcast is taken out), and the trainer's switch must refuse what it cannot do."""

from __future__ import annotations

import inspect
import random
import warnings

import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3

from llm.recipe import load_recipe, resolve_recipe_path
from llm.tiny import build_char_tokenizer, build_tiny_model
from llm.prefix import cache_keyword, plan_shared_prefix
from llm.models import completion_outputs
from llm.trainer import Trainer
from llm_helpers import assert_grads_close, metric_tolerance, tiny_recipe


def _rows(*contexts, T=2):
    """A left-padded ``[B, C+T]`` batch of the given contexts, each followed by T completion tokens (ids 90+)."""
    C = max(len(c) for c in contexts)
    ids = torch.zeros(len(contexts), C + T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, C - len(c):C] = torch.tensor(c)
        mask[i, C - len(c):] = 1
        ids[i, C:] = torch.arange(90 + i * T, 90 + (i + 1) * T)
    return ids, mask, T


def _reassembled(plan, ids, mask):
    """Each row rebuilt from its prefix row and its suffix: must give back the row's real tokens, in order."""
    for i in range(ids.shape[0]):
        k = int(plan.run[i])
        row = torch.cat([plan.prefix_ids[k][plan.prefix_mask[k].bool()], plan.suffix_ids[i][plan.suffix_mask[i].bool()]])
        assert torch.equal(row, ids[i][mask[i].bool()]), i


def test_plan_minimises_the_padded_positions_of_both_forwards():
    ids, mask, T = _rows([5, 6, 7, 8], [5, 6, 7, 9, 9], [5, 6, 7, 8], [1, 2, 3], [4, 4], [4, 4])
    plan = plan_shared_prefix(ids, mask, T)
    shared = {i: plan.prefix_ids[plan.run[i]][plan.prefix_mask[plan.run[i]].bool()].tolist() for i in range(6)}
    # rest R = 2: rows 0-2 share [5, 6, 7]; row 3 moves [1] into the prefix batch so that its rest fits in R;
    # rows 4-5 fit as they are and take the empty prefix: 3·3 + 6·(2 + 2) = 33 positions instead of 6·(5 + 2) = 42
    assert shared == {0: [5, 6, 7], 1: [5, 6, 7], 2: [5, 6, 7], 3: [1], 4: [], 5: []}
    assert tuple(plan.prefix_ids.shape) == (3, 3) and tuple(plan.suffix_ids.shape) == (6, 2 + T)
    assert plan.suffix_ids[:, :-T].tolist() == [[0, 8], [9, 9], [0, 8], [2, 3], [4, 4], [4, 4]]
    assert torch.equal(plan.suffix_ids[:, -T:], ids[:, -T:])
    _reassembled(plan, ids, mask)


def _partitions(items):
    if not items:
        yield []
        return
    for part in _partitions(items[1:]):
        for k in range(len(part)):
            yield part[:k] + [[items[0]] + part[k]] + part[k + 1:]
        yield [[items[0]]] + part


def _brute_force_positions(ctx, width, T):
    """The fewest positions over every rest R and every grouping of the rows (each group sharing the
    least prefix that leaves its rows at most R tokens, all groups sharing nothing on one empty row)."""
    B, L, best = len(ctx), [len(c) for c in ctx], len(ctx) * (width + T)
    for R in range(1, max(L)):
        for part in _partitions(list(range(B))):
            shares = [max(max(L[i] - R for i in g), 0) for g in part]
            if any(s > L[i] - 1 or ctx[i][:s] != ctx[g[0]][:s] for g, s in zip(part, shares) for i in g) or not max(shares):
                continue
            U = sum(s > 0 for s in shares) + (min(shares) == 0)
            best = min(best, U * max(shares) + B * (R + T))
    return best


def test_plan_is_optimal_against_brute_force_on_small_batches():
    rng = random.Random(0)
    for _ in range(150):
        base = [rng.randint(1, 3) for _ in range(rng.randint(0, 6))]
        ctx = []
        for _ in range(rng.randint(1, 5)):
            k = rng.randint(0, len(base))
            ctx.append(base[:k] + [rng.randint(1, 3) for _ in range(rng.randint(0 if k else 1, 4))])
        T = rng.randint(1, 3)
        ids, mask, _ = _rows(*ctx, T=T)
        plan = plan_shared_prefix(ids, mask, T)
        B, width = ids.shape[0], ids.shape[1] - T
        positions = B * (width + T) if plan is None else plan.prefix_ids.numel() + plan.suffix_ids.numel()
        assert positions == _brute_force_positions(ctx, width, T), ctx
        if plan is not None:
            _reassembled(plan, ids, mask)


def test_plan_prefers_the_longer_prefix_shared_by_fewer_rows():
    """A group where one row has another demonstration: sharing prompt + demo among three rows saves more
    (2·8) than sharing only the prompt among all four (3·4)."""
    prompt, demo, other = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    ids, mask, T = _rows(prompt + other + [30], prompt + demo + [31], prompt + demo + [32, 33], prompt + demo + [34])
    plan = plan_shared_prefix(ids, mask, T)
    assert int(plan.run[1]) == int(plan.run[2]) == int(plan.run[3]) != int(plan.run[0])
    assert plan.prefix_mask[plan.run[1]].sum() == 8
    _reassembled(plan, ids, mask)


def _group_contexts(rng, prompts, group, T):
    """Teacher-like contexts: per prompt, ``group`` rows of prompt + a demonstration (one row another
    demonstration) + own feedback, with random lengths; long enough for many candidate rests."""
    tok = lambda n: [rng.randint(4, 99) for _ in range(n)]  # noqa: E731
    contexts = []
    for _ in range(prompts):
        prompt, demos = tok(rng.randint(20, 120)), [tok(rng.randint(20, 120)) for _ in range(2)]
        contexts += [prompt + demos[j > 0] + tok(rng.randint(1, 40)) for j in range(group)]
    return _rows(*contexts, T=T)


def test_large_batches_plan_on_a_grid_of_rests_close_to_the_exhaustive_plan(monkeypatch):
    from llm import prefix

    rng, grid = random.Random(1), prefix.MAX_RESTS
    for prompts, group in [(4, 8), (16, 2), (2, 16)]:
        ids, mask, T = _group_contexts(rng, prompts, group, T=rng.randint(1, 30))
        sizes = {}
        for name, limit in (("grid", grid), ("every rest", 10**9)):
            monkeypatch.setattr(prefix, "MAX_RESTS", limit)
            plan = plan_shared_prefix(ids, mask, T)
            _reassembled(plan, ids, mask)
            sizes[name] = plan.prefix_ids.numel() + plan.suffix_ids.numel()
        assert sizes["every rest"] <= sizes["grid"] <= 1.01 * sizes["every rest"] < ids.numel(), sizes


def test_plan_is_none_when_nothing_is_shared_or_padding_is_not_on_the_left():
    ids, mask, T = _rows([1, 2], [3, 4], [5, 6])
    assert plan_shared_prefix(ids, mask, T) is None
    ids, mask, T = _rows([1, 2, 3], [1, 2, 3])
    mask[0, 1] = 0  # a hole inside a context
    assert plan_shared_prefix(ids, mask, T) is None


def _batch(vocab: int, T: int = 5):
    """7 rows: prompts 0,0,0 | 1,1 (left-padded) | 2 | 3 (a group of one), one right-padded completion."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, vocab, (4, 9), generator=g)
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    ids = torch.cat([prompts[rows], torch.randint(4, vocab, (len(rows), T), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[rows == 1, :3], ids[rows == 1, :3] = 0, 0
    mask[6, -2:], ids[6, -2:] = 0, 0
    return ids, mask, T


def _teacher_like_batch(vocab: int, T: int = 4):
    """Teacher-style contexts: a shared prompt, then a demonstration most rows share, then per-row feedback
    of different lengths (so the rows' padding differs), and a group whose contexts differ from the start."""
    g = torch.Generator().manual_seed(2)
    tok = lambda n: torch.randint(4, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompt, demo_a, demo_b = tok(6), tok(5), tok(5)
    contexts = [prompt + demo_b + tok(2), prompt + demo_a + tok(4), prompt + demo_a + tok(1), tok(7), tok(3)]
    ids, mask, _ = _rows(*contexts, T=T)
    ids[:, -T:] = torch.randint(4, vocab, (len(contexts), T), generator=g)
    return ids, mask, T


def _outputs_and_grads(model, ids, mask, T, hidden, share):
    model.zero_grad(set_to_none=True)
    out = completion_outputs(model, ids, mask, T, hidden=hidden, share_prefix=share)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """Qwen3's RMSNorm computes in float32 whatever the model dtype; the shared forward sums a prompt's
    gradient over its group before that rounding, the plain one after, so exact comparison needs it in float64."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", forward)


@pytest.mark.parametrize("hidden", [False, True])
@pytest.mark.parametrize("make_batch", [_batch, _teacher_like_batch])
def test_shared_prefix_equals_plain_forward_in_float64(float64_rmsnorm, hidden, make_batch):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, seed=0).double()
    ids, mask, T = make_batch(len(tok))
    assert plan_shared_prefix(ids, mask, T) is not None
    out_p, grads_p = _outputs_and_grads(model, ids, mask, T, hidden, share=False)
    out_s, grads_s = _outputs_and_grads(model, ids, mask, T, hidden, share=True)
    assert out_s.shape == out_p.shape == (ids.shape[0], T, model.config.hidden_size if hidden else len(tok))
    torch.testing.assert_close(out_s, out_p, rtol=1e-12, atol=1e-12)
    assert grads_p.keys() == grads_s.keys()
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_shared_prefix_in_float32_matches_to_rounding():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, seed=0)
    ids, mask, T = _batch(len(tok))
    out_p, grads_p = _outputs_and_grads(model, ids, mask, T, False, share=False)
    out_s, grads_s = _outputs_and_grads(model, ids, mask, T, False, share=True)
    # logits |z| ≲ 1 through two layers of dot products over ≤ 96 terms: ≲ 96·eps·|z| ≈ 1e-5 (observed ≤ 1.2e-7)
    torch.testing.assert_close(out_s, out_p, rtol=1e-5, atol=1e-5)
    assert_grads_close([grads_s], [grads_p], ids.numel())  # one gradient term per position: see llm_helpers


def test_no_shared_rows_falls_back_to_one_forward():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    ids = torch.randint(4, len(tok), (3, 8), generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    completion_outputs(model, ids, torch.ones_like(ids), 3, hidden=False, share_prefix=True)
    handle.remove()
    assert len(calls) == 1


def test_cache_keyword_follows_the_model_class_through_wrappers():
    """transformers renamed the forward's ``past_key_values`` to ``cache`` (the old name is removed in 5.40 and
    would then vanish into ``**kwargs``, silently dropping the prefix): the keyword is read off the class."""
    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Peft(torch.nn.Module):  # PEFT's forward takes **kwargs; its base model has the real signature
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, *args, **kwargs): ...

    class DDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    assert cache_keyword(DDP(Peft(New()))) == "cache" and cache_keyword(Peft(Old())) == "past_key_values"
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    assert cache_keyword(model) in inspect.signature(type(model).forward).parameters
    ids, mask, T = _batch(len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword on the installed transformers
        completion_outputs(model, ids, mask, T, hidden=False, share_prefix=True)


def test_trainer_loss_and_gradients_are_the_same_with_and_without_sharing(tiny_dir, tmp_path):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, method__name="hybrid", method__teacher_kind="frozen"))
    assert trainer.share_prefix  # auto: on for an unsharded model without gradient checkpointing
    with torch.no_grad():  # make student and frozen teacher differ
        for p in trainer.unwrapped.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch, _ = trainer.rollout(0)
    results = {}
    for share in (False, True):
        trainer.share_prefix = share
        loss, _ = trainer.compute_loss(batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        results[share] = (float(loss.detach()), {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None})
        trainer.optimizer.zero_grad(set_to_none=True)
    tol = metric_tolerance(trainer)  # float32 accumulation order: see llm_helpers
    assert abs(results[False][0]) > 10 * tol and results[True][0] == pytest.approx(results[False][0], rel=0, abs=tol)
    assert_grads_close([results[True][1]], [results[False][1]], batch.input_ids.numel())


def test_share_prompt_prefix_bad_value_and_impossible_combination(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="share_prompt_prefix"):
        load_recipe(resolve_recipe_path("tiny-cpu"), {"training.share_prompt_prefix": "yes"})
    recipe = tiny_recipe(tiny_dir, tmp_path, training__share_prompt_prefix=True, model__gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing=false"):
        Trainer(recipe)
    off = Trainer(tiny_recipe(tiny_dir, tmp_path, model__gradient_checkpointing=True))
    assert not off.share_prefix  # auto turns it off instead
