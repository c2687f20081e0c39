"""fused_linear_sdpo_loss = the unfused path (materialise h @ Wᵀ, then sdpo_token_loss), values and gradients."""

from __future__ import annotations

import pytest
import torch

from sdpo_sim.core.losses import default_chunk_size, fused_linear_sdpo_loss, sdpo_token_loss

F64 = torch.float64
N, H, V = 13, 5, 11  # N is prime: most chunk sizes do not divide it

MODES = [  # (support, alpha, extra kwargs)
    ("full", 0.0, {}), ("full", 0.5, {}), ("full", 1.0, {}), ("full", 0.3, {}),
    ("topk", 0.0, {"topk": 4}), ("topk", 0.5, {"topk": 4}), ("topk", 1.0, {"topk": 4}),
    ("topk", 0.0, {"topk": 4, "add_tail": False}), ("topk", 0.5, {"topk": 4, "add_tail": False}),
    ("topk", 1.0, {"topk": 4, "add_tail": False}),
    ("sampled", 1.0, {}),
]
MASKS = ["all", "some", "first_chunk_empty"]


def _inputs(seed: int, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=dtype)
    ht = torch.randn(N, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (N,), generator=g)
    return hs, ht, w, tokens


def _mask(kind: str) -> torch.Tensor:
    if kind == "all":
        return torch.ones(N, dtype=torch.bool)
    if kind == "some":
        return torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    m = torch.ones(N, dtype=torch.bool)
    m[:4] = False  # whole chunks skipped when chunk_size ≤ 4
    return m


def _unfused(hs, ht, w, mask, tw=None, tokens=None, token_weights=None, **kw):
    per_tok = sdpo_token_loss(hs @ w.T, ht @ (w if tw is None else tw).T, tokens=tokens, **kw)
    m = mask.to(per_tok.dtype) if token_weights is None else mask.to(per_tok.dtype) * token_weights
    return (per_tok * m).sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("chunk_size", [1, 4, N, 64])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("support,alpha,kw", MODES)
def test_fused_equals_unfused(support, alpha, kw, mask_kind, chunk_size):
    hs, ht, w, tokens = _inputs(0)
    tokens = tokens if support == "sampled" else None
    mask = _mask(mask_kind)
    opts = dict(alpha=alpha, support=support, tokens=tokens, **kw)

    hs_f, w_f = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused = fused_linear_sdpo_loss(hs_f, ht, w_f, mask, chunk_size=chunk_size, **opts)
    hs_u, w_u = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = _unfused(hs_u, ht, w_u, mask, **opts)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    (2.5 * fused).backward()  # a non-unit incoming gradient must scale the stored gradients
    (2.5 * ref).backward()
    torch.testing.assert_close(hs_f.grad, hs_u.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_f.grad, w_u.grad, rtol=1e-9, atol=1e-12)
    assert w_u.grad.abs().sum() > 0  # the comparison is not between two zeros
    if mask_kind != "all":
        assert bool((hs_f.grad[~mask] == 0).all())  # unselected tokens get no gradient


@pytest.mark.parametrize("support,kw", [("full", {}), ("topk", {"topk": 3})])
def test_separate_teacher_weight_and_token_weights(support, kw):
    hs, ht, w, _ = _inputs(1)
    tw = w + 0.3 * torch.randn(V, H, generator=torch.Generator().manual_seed(2), dtype=F64)
    tw = tw.requires_grad_(True)
    ht = ht.requires_grad_(True)
    token_weights = torch.linspace(0.2, 2.0, N, dtype=F64)
    mask = _mask("some")
    hs_f, w_f = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused = fused_linear_sdpo_loss(hs_f, ht, w_f, mask, teacher_weight=tw, alpha=0.5, support=support,
                                   chunk_size=5, token_weights=token_weights, **kw)
    hs_u, w_u = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = _unfused(hs_u, ht, w_u, mask, tw=tw, token_weights=token_weights, alpha=0.5, support=support, **kw)
    torch.testing.assert_close(fused, ref.detach(), rtol=1e-10, atol=1e-12)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(hs_f.grad, hs_u.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_f.grad, w_u.grad, rtol=1e-9, atol=1e-12)
    # the teacher (hidden states and its own head) never receives gradient on the fused path
    tw.grad, ht.grad = None, None
    fused2 = fused_linear_sdpo_loss(hs.clone().requires_grad_(True), ht, w, mask, teacher_weight=tw, support=support, **kw)
    fused2.backward()
    assert tw.grad is None and ht.grad is None


def test_all_masked_gives_zero_loss_and_zero_gradients():
    hs, ht, w, _ = _inputs(3)
    hs, w = hs.requires_grad_(True), w.requires_grad_(True)
    loss = fused_linear_sdpo_loss(hs, ht, w, torch.zeros(N, dtype=torch.bool), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and bool((hs.grad == 0).all()) and bool((w.grad == 0).all())


def test_only_hidden_or_only_weight_requires_grad():
    hs, ht, w, _ = _inputs(4)
    mask = _mask("all")
    ref_h, ref_w = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    _unfused(ref_h, ht, ref_w, mask).backward()
    h_only = hs.clone().requires_grad_(True)
    fused_linear_sdpo_loss(h_only, ht, w, mask, chunk_size=3).backward()
    torch.testing.assert_close(h_only.grad, ref_h.grad, rtol=1e-9, atol=1e-12)
    w_only = w.clone().requires_grad_(True)
    fused_linear_sdpo_loss(hs, ht, w_only, mask, chunk_size=3).backward()
    torch.testing.assert_close(w_only.grad, ref_w.grad, rtol=1e-9, atol=1e-12)


def test_float32_agrees_with_float64_reference():
    hs, ht, w, _ = _inputs(5, dtype=torch.float32)
    mask = _mask("some")
    h32, w32 = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fused_linear_sdpo_loss(h32, ht, w32, mask, alpha=0.5, chunk_size=4)
    assert loss.dtype == torch.float32
    loss.backward()
    h64, w64 = hs.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = _unfused(h64, ht.double(), w64, mask, alpha=0.5)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_default_chunk_size():
    assert default_chunk_size(32768) == 256  # 256 × 32768 fp32 = 32 MiB
    assert default_chunk_size(1 << 30) == 8  # never fewer than 8 rows


@pytest.mark.parametrize("change,match", [
    ({"student_hidden": torch.zeros(N, H, 1)}, r"must both be \[N, H\]"),
    ({"teacher_hidden": torch.zeros(N + 1, H)}, r"must both be \[N, H\]"),
    ({"weight": torch.zeros(V, H + 1)}, r"weight has shape \(11, 6\); it must be \[V, H=5\]"),
    ({"teacher_weight": torch.zeros(V + 1, H)}, r"teacher_weight has shape \(12, 5\); it must equal weight's \(11, 5\)"),
    ({"mask": torch.ones(N - 1, dtype=torch.bool)}, r"mask has shape \(12,\); it must be \[N=13\]"),
    ({"tokens": torch.zeros(2, dtype=torch.long), "support": "sampled"}, r"tokens has shape \(2,\); it must be \[N=13\]"),
    ({"token_weights": torch.ones(2)}, r"token_weights has shape \(2,\); it must be \[N=13\]"),
    ({"chunk_size": 0}, r"chunk_size=0 must be a positive integer"),
    ({"alpha": 2.0}, r"alpha=2\.0 must be a number in \[0, 1\]"),
    ({"support": "topk", "topk": V + 1}, r"topk=12 must be an integer in \[1, V=11\]"),
    ({"support": "sampled"}, r"support='sampled' needs tokens"),
    ({"support": "sampled", "alpha": 0.5, "tokens": torch.zeros(N, dtype=torch.long)}, r"needs alpha=1\.0"),
    ({"support": "nope"}, r"support='nope' is not allowed; choose one of 'full', 'topk', 'sampled'"),
])
def test_fused_bad_input(change, match):
    args = dict(student_hidden=torch.zeros(N, H), teacher_hidden=torch.zeros(N, H), weight=torch.zeros(V, H),
                mask=torch.ones(N, dtype=torch.bool))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_linear_sdpo_loss(**args)
