"""sdpo_sim.core.losses against closed forms and brute force (float64, tiny vocabularies).

References here are written independently of the library: plain-Python sums over the vocabulary,
hand-computed numbers, and textbook closed forms; they share no code with ``sdpo_sim.core.losses``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_sim.core.losses import (
    AlphaController,
    aggregate,
    divergence,
    group_advantages,
    hybrid_loss,
    policy_gradient_token_loss,
    sdpo_token_loss,
    truncated_importance_weight,
)

F64 = torch.float64
F64_EPS = torch.finfo(F64).eps  # 2^-52 ≈ 2.2e-16


def _logp(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=F64).log()


def _kl_py(p: list[float], q: list[float]) -> float:
    """Brute-force KL(p‖q) in plain Python."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _gen_jsd_py(s: list[float], t: list[float], alpha: float) -> float:
    """Brute-force (1−α)·KL(s‖m) + α·KL(t‖m), m = (1−α)s + αt, with the KL endpoints at α ∈ {0, 1}."""
    if alpha == 0.0:
        return _kl_py(t, s)
    if alpha == 1.0:
        return _kl_py(s, t)
    m = [(1 - alpha) * si + alpha * ti for si, ti in zip(s, t)]
    return (1 - alpha) * _kl_py(s, m) + alpha * _kl_py(t, m)


def _softmax_py(logits: list[float]) -> list[float]:
    mx = max(logits)
    e = [math.exp(x - mx) for x in logits]
    z = sum(e)
    return [x / z for x in e]


# ----------------------------------------------------------------------------------------- divergence
def test_kl_of_known_distributions():
    p, q = [0.75, 0.25], [0.5, 0.5]
    kl_pq = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL(p‖q) by hand
    kl_qp = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)  # KL(q‖p) by hand
    # alpha=1 is reverse KL(student‖teacher); alpha=0 forward KL(teacher‖student)
    assert divergence(_logp(p), _logp(q), 1.0).item() == pytest.approx(kl_pq, abs=1e-14)
    assert divergence(_logp(p), _logp(q), 0.0).item() == pytest.approx(kl_qp, abs=1e-14)
    # KL(N-point uniform ‖ point mass-ish) closed form: KL(u‖q) = −log V − mean_v log q_v
    q3 = [0.7, 0.2, 0.1]
    expected = -math.log(3) - sum(math.log(x) for x in q3) / 3
    assert divergence(_logp([1 / 3] * 3), _logp(q3), 1.0).item() == pytest.approx(expected, abs=1e-14)
    # identical distributions → 0 for every alpha; log m = logaddexp(s + log(1−α), s + log α) rounds each
    # |log q| ≤ 2.3 a few times, so the 3 terms of Σ p·(log p − log m) err by ≲ 8·eps64·2.3 ≈ 4e-15 in all
    for a in (0.0, 0.3, 0.5, 1.0):
        assert divergence(_logp(q3), _logp(q3), a).item() == pytest.approx(0.0, abs=8 * F64_EPS * abs(math.log(0.1)))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_divergence_matches_brute_force_on_batches(alpha):
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(2, 3, 7, generator=g, dtype=F64) * 2
    t_logits = torch.randn(2, 3, 7, generator=g, dtype=F64) * 2
    got = divergence(s_logits.log_softmax(-1), t_logits.log_softmax(-1), alpha)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            ref = _gen_jsd_py(_softmax_py(s_logits[i, j].tolist()), _softmax_py(t_logits[i, j].tolist()), alpha)
            assert got[i, j].item() == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_jsd_endpoints_are_the_limits_of_the_weighted_family():
    """(1−α)KL(s‖m)+αKL(t‖m) ≈ α·KL(t‖s) as α→0 and ≈ (1−α)·KL(s‖t) as α→1: the labels of the endpoints agree."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 6, generator=g, dtype=F64).log_softmax(-1)
    t = torch.randn(5, 6, generator=g, dtype=F64).log_softmax(-1)
    eps = 1e-6
    torch.testing.assert_close(divergence(s, t, eps) / eps, divergence(s, t, 0.0), rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(divergence(s, t, 1 - eps) / eps, divergence(s, t, 1.0), rtol=1e-4, atol=1e-10)


def test_jsd_half_is_symmetric_bounded_and_ln2_on_disjoint_supports():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 9, generator=g, dtype=F64).log_softmax(-1)
    t = (3 * torch.randn(4, 9, generator=g, dtype=F64)).log_softmax(-1)
    d_st, d_ts = divergence(s, t, 0.5), divergence(t, s, 0.5)
    torch.testing.assert_close(d_st, d_ts, rtol=1e-13, atol=1e-15)
    assert bool((d_st > 0).all()) and bool((d_st < math.log(2)).all())
    # the reverse KL is not symmetric on the same data (so the symmetry above is not vacuous)
    assert not torch.allclose(divergence(s, t, 1.0), divergence(t, s, 1.0))
    disjoint_s = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64).log()
    disjoint_t = torch.tensor([0.0, 0.0, 0.25, 0.75], dtype=F64).log()
    assert divergence(disjoint_s, disjoint_t, 0.5).item() == pytest.approx(math.log(2), abs=1e-14)


def test_float64_inputs_stay_float64_and_low_precision_is_upcast():
    s = torch.randn(3, 5, dtype=F64)
    t = torch.randn(3, 5, dtype=F64)
    assert sdpo_token_loss(s, t).dtype == F64
    assert sdpo_token_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32


# ----------------------------------------------------------------------------------------- gradients
def test_reverse_kl_gradient_closed_form():
    """∂KL(p_s‖p_t)/∂z_s = p_s ⊙ (log p_s − log p_t − KL)."""
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(3, 4, 8, generator=g, dtype=F64, requires_grad=True)
    zt = torch.randn(3, 4, 8, generator=g, dtype=F64)
    loss = sdpo_token_loss(zs, zt, alpha=1.0)
    loss.sum().backward()
    ls, lt = zs.detach().log_softmax(-1), zt.log_softmax(-1)
    kl = (ls.exp() * (ls - lt)).sum(-1, keepdim=True)
    torch.testing.assert_close(zs.grad, ls.exp() * (ls - lt - kl), rtol=1e-12, atol=1e-14)


def test_forward_kl_gradient_closed_form():
    """∂KL(p_t‖p_s)/∂z_s = p_s − p_t."""
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(5, 6, generator=g, dtype=F64, requires_grad=True)
    zt = torch.randn(5, 6, generator=g, dtype=F64)
    sdpo_token_loss(zs, zt, alpha=0.0).sum().backward()
    torch.testing.assert_close(zs.grad, zs.detach().softmax(-1) - zt.softmax(-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("support,kw", [("full", {}), ("topk", {"topk": 3}), ("topk", {"topk": 3, "add_tail": False}), ("sampled", {})])
def test_teacher_never_receives_gradient(support, kw):
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    zt = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 6, (4,), generator=g) if support == "sampled" else None
    sdpo_token_loss(zs, zt * 2, alpha=1.0, support=support, tokens=tokens, **kw).sum().backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- sampled token
def _sampled_grad(zs: torch.Tensor, zt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-row gradient of the sampled-token loss w.r.t. a row-wise copy of the student logits ``[M, V]``."""
    leaf = zs.detach().expand(tokens.shape[0], -1).clone().requires_grad_(True)
    loss = sdpo_token_loss(leaf, zt.expand_as(leaf), alpha=1.0, support="sampled", tokens=tokens)
    loss.sum().backward()
    return leaf.grad


def test_sampled_token_value():
    zs, zt = torch.tensor([1.0, 0.0, -1.0], dtype=F64), torch.tensor([0.0, 2.0, 0.0], dtype=F64)
    ps, pt = _softmax_py(zs.tolist()), _softmax_py(zt.tolist())
    got = sdpo_token_loss(zs[None].expand(3, 3), zt[None].expand(3, 3), support="sampled", tokens=torch.arange(3))
    ref = [(math.log(ps[y]) - math.log(pt[y])) * math.log(ps[y]) for y in range(3)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-13, atol=1e-15)


def test_sampled_token_gradient_equals_reverse_kl_gradient_in_exact_expectation():
    """Σ_y p_s(y)·∇[sg(log p_s(y) − log p_t(y))·log p_s(y)] = ∇KL(p_s‖p_t), by enumerating y."""
    g = torch.Generator().manual_seed(6)
    V = 7
    zs, zt = torch.randn(V, generator=g, dtype=F64) * 1.5, torch.randn(V, generator=g, dtype=F64) * 1.5
    per_token = _sampled_grad(zs, zt, torch.arange(V))  # row y: gradient when token y was sampled
    expected_grad = (zs.softmax(-1)[:, None] * per_token).sum(0)
    full = zs.clone().requires_grad_(True)
    sdpo_token_loss(full, zt, alpha=1.0).backward()
    torch.testing.assert_close(expected_grad, full.grad, rtol=1e-12, atol=1e-14)
    # ...but a single sample is not the full gradient (the estimator is noisy, not exact per sample)
    assert (per_token - full.grad).abs().max() > 1e-2


def test_sampled_token_gradient_monte_carlo():
    g = torch.Generator().manual_seed(7)
    V, M = 6, 20000
    zs, zt = torch.randn(V, generator=g, dtype=F64), torch.randn(V, generator=g, dtype=F64) * 2
    tokens = torch.multinomial(zs.softmax(-1), M, replacement=True, generator=g)
    grads = _sampled_grad(zs, zt, tokens)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(M)
    full = zs.clone().requires_grad_(True)
    sdpo_token_loss(full, zt, alpha=1.0).backward()
    z = ((mean - full.grad) / se).abs()
    assert bool((z < 4.5).all()), f"Monte-Carlo mean off by {z.max():.2f} standard errors"


# ----------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_with_tail_equals_full_when_k_is_vocab(alpha):
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(3, 5, 10, generator=g, dtype=F64), torch.randn(3, 5, 10, generator=g, dtype=F64)
    full = sdpo_token_loss(zs, zt, alpha=alpha)
    topk = sdpo_token_loss(zs, zt, alpha=alpha, support="topk", topk=10, add_tail=True)
    torch.testing.assert_close(topk, full, rtol=1e-9, atol=1e-9)


def _topk_reference(zs: list[float], zt: list[float], k: int, alpha: float, tail: bool) -> float:
    ps, pt = _softmax_py(zs), _softmax_py(zt)
    idx = sorted(range(len(zs)), key=lambda v: -zs[v])[:k]  # the student's top-k
    s, t = [ps[v] for v in idx], [pt[v] for v in idx]
    if tail:
        s, t = s + [1 - sum(s)], t + [1 - sum(t)]
    else:
        s, t = [x / sum(s) for x in s], [x / sum(t) for x in t]
    return _gen_jsd_py(s, t, alpha)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_matches_brute_force(tail, alpha):
    g = torch.Generator().manual_seed(9)
    zs, zt = torch.randn(4, 9, generator=g, dtype=F64) * 2, torch.randn(4, 9, generator=g, dtype=F64) * 2
    got = sdpo_token_loss(zs, zt, alpha=alpha, support="topk", topk=3, add_tail=tail)
    ref = [_topk_reference(zs[i].tolist(), zt[i].tolist(), 3, alpha, tail) for i in range(4)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-11, atol=1e-13)


def test_topk_support_comes_from_the_student_not_the_teacher():
    zs = torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0], dtype=F64)
    zt = torch.tensor([0.0, 0.0, 0.0, 3.0, 2.0], dtype=F64)  # teacher's favourites are outside the student's top-2
    got = sdpo_token_loss(zs, zt, alpha=1.0, support="topk", topk=2, add_tail=False).item()
    assert got == pytest.approx(_topk_reference(zs.tolist(), zt.tolist(), 2, 1.0, False), abs=1e-14)
    # renormalised over {0, 1} the teacher is uniform there, so KL(s‖t) = KL([σ(1), 1−σ(1)] ‖ [½, ½])
    p = 1 / (1 + math.exp(-1))
    assert got == pytest.approx(p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)), abs=1e-14)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, r"alpha=1\.5 must be a number in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha=-0\.1 must be a number in \[0, 1\]"),
        ({"alpha": float("nan")}, r"alpha=nan"),
        ({"support": "dense"}, r"support='dense' is not allowed; choose one of 'full', 'topk', 'sampled'"),
        ({"support": "topk", "topk": 9}, r"topk=9 must be an integer in \[1, V=6\]"),
        ({"support": "topk", "topk": 0}, r"topk=0 must be an integer in \[1, V=6\]"),
        ({"support": "topk"}, r"topk=None must be an integer in \[1, V=6\]"),
        ({"support": "sampled"}, r"support='sampled' needs tokens"),
        ({"support": "sampled", "alpha": 0.5, "tokens": torch.zeros(4, dtype=torch.long)}, r"needs alpha=1\.0"),
        ({"support": "sampled", "tokens": torch.zeros(3, dtype=torch.long)}, r"tokens has shape \(3,\)"),
    ],
)
def test_sdpo_token_loss_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdpo_token_loss(torch.zeros(4, 6), torch.zeros(4, 6), **kwargs)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"student_logits has shape \(4, 6\) but teacher_logits has shape \(4, 5\)"):
        sdpo_token_loss(torch.zeros(4, 6), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"student_logp has shape"):
        divergence(torch.zeros(2, 3), torch.zeros(3, 3), 0.5)


# ----------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 5.0], dtype=F64)
    sd1 = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # unbiased std of [1,2,3,4]
    sd2 = math.sqrt((1.5**2 + 1.5**2 + 0.5**2 + 3.5**2) / 3)  # unbiased std of [0,0,1,5], mean 1.5
    centred = [-1.5, -0.5, 0.5, 1.5, -1.5, -1.5, -0.5, 3.5]
    mean_all = 2.0
    sd_all = math.sqrt(sum((x - mean_all) ** 2 for x in r.tolist()) / 7)
    want_group = [c / (sd1 + 1e-4) for c in centred[:4]] + [c / (sd2 + 1e-4) for c in centred[4:]]
    want_batch = [c / (sd_all + 1e-4) for c in centred]  # group-centred, batch-scaled (TRL's "batch")
    torch.testing.assert_close(group_advantages(r, 4, "group"), torch.tensor(want_group, dtype=F64))
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor(want_batch, dtype=F64))
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor(centred, dtype=F64))


def test_group_advantages_leading_dims_are_independent_runs():
    g = torch.Generator().manual_seed(10)
    r = torch.rand(3, 12, generator=g, dtype=F64)
    for scale in ("group", "batch", "none"):
        batched = group_advantages(r, 4, scale)
        for i in range(3):
            torch.testing.assert_close(batched[i], group_advantages(r[i], 4, scale))


def test_group_advantages_constant_group_and_singletons_are_zero():
    r = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0, 5.0])
    adv = group_advantages(r, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert bool(torch.isfinite(adv).all())
    assert torch.equal(group_advantages(r, 1), torch.zeros(6))


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size": 4}, r"group_size=4 must be a positive integer dividing the batch size 6"),
    ({"group_size": 0}, r"group_size=0"),
    ({"group_size": 3, "scale": "std"}, r"scale='std' is not allowed; choose one of 'group', 'batch', 'none'"),
])
def test_group_advantages_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(6), **kwargs)


# ----------------------------------------------------------------------------------------- policy loss
def test_on_policy_loss_is_reinforce():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -4.0]], dtype=F64, requires_grad=True)
    adv = torch.tensor([0.7, -1.3], dtype=F64)
    loss = policy_gradient_token_loss(logp, adv)
    torch.testing.assert_close(loss.detach(), -adv[:, None].expand(2, 3))  # value: ratio 1
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(2, 3))  # gradient: −A·∇logp


def test_clipped_loss_cases_by_hand():
    eps, eps_high = 0.2, 0.3
    # ratios 1.5 / 0.5 / 1.1 / 0.9 / 1.5 / 0.5 with advantages + + + − − −
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.9, 1.5, 0.5], dtype=F64)
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, -2.0], dtype=F64)
    old = torch.zeros(6, dtype=F64)
    logp = ratios.log().clone().requires_grad_(True)
    loss = policy_gradient_token_loss(logp, adv, old, epsilon=eps, epsilon_high=eps_high)
    # −min(ρA, clip(ρ, 0.8, 1.3)A) per case
    want = [-1.3, -0.5, -1.1, 1.8, 3.0, 1.6]
    torch.testing.assert_close(loss.detach(), torch.tensor(want, dtype=F64))
    loss.sum().backward()
    # gradient w.r.t. logp is −ρA where the unclipped term is the min, 0 where the clipped constant wins
    want_grad = [0.0, -0.5, -1.1, 1.8, 3.0, 0.0]
    torch.testing.assert_close(logp.grad, torch.tensor(want_grad, dtype=F64))


def test_policy_loss_per_token_advantages_and_bad_shapes():
    logp = torch.randn(2, 3, dtype=F64)
    adv_tok = torch.randn(2, 3, dtype=F64)
    torch.testing.assert_close(policy_gradient_token_loss(logp, adv_tok), -adv_tok)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); it must be logp.shape\[:-1\]=\(2,\)"):
        policy_gradient_token_loss(logp, torch.zeros(3))
    with pytest.raises(ValueError, match=r"epsilon=-0\.1"):
        policy_gradient_token_loss(logp, torch.zeros(2), epsilon=-0.1)


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx((1 + 2 + 10 + 20 + 30 + 40) / 6)
    assert aggregate(loss, mask, "sequence_mean").item() == pytest.approx((1.5 + 25.0) / 2)
    assert aggregate(loss, mask, "dr_grpo").item() == pytest.approx(103 / (2 * 4))
    assert aggregate(loss, mask, "dr_grpo", max_completion_length=10).item() == pytest.approx(103 / 20)
    assert aggregate(loss).item() == pytest.approx(110 / 8)
    with pytest.raises(ValueError, match=r"loss_type='mean' is not allowed; choose one of 'token_mean', 'sequence_mean', 'dr_grpo'"):
        aggregate(loss, mask, "mean")
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\) but token_loss has shape \(2, 4\)"):
        aggregate(loss, mask[:, :3])


# ----------------------------------------------------------------------------------------- IS, hybrid
def test_truncated_importance_weight():
    logp = torch.tensor([0.0, 1.0, -1.0], dtype=F64, requires_grad=True)
    w = truncated_importance_weight(logp, torch.zeros(3, dtype=F64), clip=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-1)], dtype=F64))  # e¹ > 2 is truncated
    assert not w.requires_grad
    with pytest.raises(ValueError, match=r"clip=0"):
        truncated_importance_weight(logp, logp, clip=0)


def test_hybrid_mixes_values_and_gradients():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    sd, rf = (x**2).sum(), (3 * x).sum()
    out = hybrid_loss(sd, rf, 0.25)
    assert out.item() == pytest.approx(0.25 * 5 + 0.75 * 9)
    out.backward()
    torch.testing.assert_close(x.grad, 0.25 * 2 * x.detach() + 0.75 * 3)
    per_run = hybrid_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.2, 0.9]))
    torch.testing.assert_close(per_run, torch.tensor([0.2, 0.9]))
    with pytest.raises(ValueError, match="alpha_mix"):
        hybrid_loss(sd, rf, 1.2)
    with pytest.raises(ValueError, match="alpha_mix"):
        hybrid_loss(sd, rf, torch.tensor([0.5, -0.1]))


def test_alpha_controllers():
    const = AlphaController("constant", init=0.3)
    torch.testing.assert_close(const.update(divergence=torch.tensor([5.0, 0.0])), torch.tensor([0.3, 0.3]))

    div = AlphaController("divergence", tau=0.3)
    got = div.update(divergence=torch.tensor([0.3, 0.4, 0.0]))  # sigmoid((D − τ)/(τ/3))
    torch.testing.assert_close(got, torch.tensor([0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(3))]))

    ent = AlphaController("entropy", init=0.5, entropy_target=1.0, gain=0.25)
    a1 = ent.update(entropy=torch.tensor([0.6, 1.4, 1.0]))  # below target → less distillation
    torch.testing.assert_close(a1, torch.tensor([0.4, 0.6, 0.5]))
    a2 = ent.update(entropy=torch.tensor([-10.0, 10.0, 1.0]))  # clipped to [0, 1]
    torch.testing.assert_close(a2, torch.tensor([0.0, 1.0, 0.5]))
    clone = AlphaController("entropy", init=0.5, entropy_target=1.0, gain=0.25)
    clone.load_state_dict(ent.state_dict())
    torch.testing.assert_close(clone.value(), a2)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "pid"}, r"controller='pid' is not allowed; choose one of 'constant', 'divergence', 'entropy'"),
    ({"kind": "entropy"}, r"controller='entropy' needs entropy_target"),
    ({"kind": "divergence", "tau": 0.0}, r"tau=0\.0"),
    ({"init": 1.5}, r"alpha_mix=1\.5 must be a number in \[0, 1\]"),
    ({"gain": -1.0}, r"gain=-1\.0"),
])
def test_alpha_controller_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlphaController(**kwargs)


def test_alpha_controller_update_needs_its_statistic():
    with pytest.raises(ValueError, match="needs the batch-mean teacher–student divergence"):
        AlphaController("divergence").update(entropy=torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs the current per-token entropy"):
        AlphaController("entropy", entropy_target=1.0).update(divergence=torch.tensor(1.0))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_masked_vocabulary_entries_give_finite_gradients(alpha):
    """−inf logits (a masked or padded vocabulary entry) behave as if the entry did not exist."""
    zs = torch.tensor([[1.0, 2.0, -0.5, float("-inf")]], dtype=F64, requires_grad=True)
    zt = torch.tensor([[0.0, 3.0, 0.2, float("-inf")]], dtype=F64)
    small = zs.detach()[:, :3].clone().requires_grad_(True)
    loss, ref = sdpo_token_loss(zs, zt, alpha=alpha), sdpo_token_loss(small, zt[:, :3], alpha=alpha)
    torch.testing.assert_close(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(zs.grad[:, :3], small.grad)
    assert zs.grad[0, 3].item() == 0.0
