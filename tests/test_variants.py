"""The field's variants (docs/variants.md): each core function against hand-computed numbers and an independent
straightforward computation, gradients against autograd of the written equation or exact expectations over an
enumerable case, the toy world's form ([runs, B, T, V], per-run aggregation) against the LLM's ([B, T, V], one
aggregate) on the same logits, the toy runs that use them, and rollout reuse.

Tolerances: float64 references built from the same inputs differ from the library only by summation order; over at
most a few hundred terms of magnitude ≤ 10 that is ≤ 1e3·eps64·10 ≈ 2e-12, so 1e-12 relative plus 1e-12 absolute
is used where not stated otherwise.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import sdpo_sim.train as train
from sdpo_sim.core.losses import (
    advantage_blend_token_loss,
    aggregate,
    blended_advantages,
    distill_schedule,
    divergence,
    forward_cross_entropy,
    fused_linear_sdpo_loss,
    group_advantages,
    group_success_rate,
    policy_gradient_token_loss,
    positive_advantage_gate,
    reference_anchor,
    reference_kl,
    routed_token_loss,
    sdpo_token_loss,
    success_std_weight,
    teacher_confidence_weight,
    token_entropy,
)
from sdpo_sim.core.method import VARIANT_FIELDS, MethodConfig
from sdpo_sim.feedback import Feedback
from sdpo_sim.train import RunConfig, run

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
R, B, T, V, G = 3, 4, 5, 6, 2  # runs, completions, positions, vocabulary, group size


def _inputs(seed: int = 0):
    """Toy-world shaped tensors: student/teacher logits [R, B, T, V], tokens [R, B, T], scores [R, B]."""
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(R, B, T, V, generator=g, dtype=F64)
    teacher = 2 * torch.randn(R, B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (R, B, T), generator=g)
    scores = torch.rand(R, B, generator=g, dtype=F64)
    return student, teacher, tokens, scores


def _token_logp(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _py_softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def _toy_and_llm(per_token_fn, mask_fn=None, loss_type="token_mean"):
    """The toy world's form (one call on [R, ...], train._per_run) and the LLM's (one call per run on [B, ...], aggregate)."""
    toy_tok = per_token_fn(slice(None))
    toy_mask = None if mask_fn is None else mask_fn(slice(None))
    toy = train._per_run(toy_tok, toy_mask, loss_type)
    llm = torch.stack([aggregate(per_token_fn(r), None if mask_fn is None else mask_fn(r).to(F64), loss_type) for r in range(R)])
    return toy, llm


# -------------------------------------------------------------------------------------- forward cross-entropy
def test_forward_cross_entropy_by_hand():
    p_s, p_t = torch.tensor([0.8, 0.2], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    got = forward_cross_entropy(p_s.log(), p_t.log())
    assert got.item() == pytest.approx(-0.5 * (math.log(0.8) + math.log(0.2)), abs=1e-15)
    # = KL(p_T‖p_θ) + H(p_T): KL by hand 0.5·ln(0.5/0.8) + 0.5·ln(0.5/0.2), H = ln 2
    kl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert got.item() == pytest.approx(kl + math.log(2), abs=1e-15)


@pytest.mark.parametrize("support, kw", [("full", {}), ("topk", dict(topk=3, add_tail=True)), ("topk", dict(topk=3, add_tail=False))])
def test_forward_ce_is_forward_kl_plus_teacher_entropy_with_forward_kl_gradient(support, kw):
    student, teacher, _, _ = _inputs(1)
    leaf_ce, leaf_kl = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    ce = sdpo_token_loss(leaf_ce, teacher, alpha=0.0, support=support, objective="forward_ce", **kw)
    kl = sdpo_token_loss(leaf_kl, teacher, alpha=0.0, support=support, **kw)
    # an independent computation of the buckets' teacher entropy: full vocabulary, or the student's top 3 (+ tail)
    p_t = teacher.softmax(-1)
    if support == "full":
        buckets = p_t
    else:
        idx = student.topk(3, -1).indices
        top = p_t.gather(-1, idx)
        buckets = torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1) if kw["add_tail"] else top / top.sum(-1, keepdim=True)
    h_t = -(buckets * buckets.log()).sum(-1)
    torch.testing.assert_close(ce, kl + h_t, rtol=1e-12, atol=1e-12)
    w = torch.linspace(0.5, 1.5, ce.numel(), dtype=F64).reshape(ce.shape)
    (ce * w).sum().backward()
    (kl * w).sum().backward()
    torch.testing.assert_close(leaf_ce.grad, leaf_kl.grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("support, kw", [("full", {}), ("topk", dict(topk=3)), ("topk", dict(topk=3, add_tail=False))])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_forward_ce_on_the_fused_path_equals_the_unfused_loss(support, kw, chunk_size):
    """The LLM's large-vocabulary path (hidden states + LM head, chunk by chunk; the full support's closed-form
    gradient) gives the unfused value and gradients, token weights (e.g. the variants' distillation weights) included."""
    g = torch.Generator().manual_seed(12)
    n, hdim = 11, 5
    hs, ht, w = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((n, hdim), (n, hdim), (V, hdim)))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    tw = torch.linspace(0.0, 2.0, n, dtype=F64)
    opts = dict(alpha=0.0, support=support, objective="forward_ce", **kw)
    hs_f, w_f = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused = fused_linear_sdpo_loss(hs_f, ht, w_f, mask, chunk_size=chunk_size, token_weights=tw, **opts)
    hs_u, w_u = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = (sdpo_token_loss(hs_u @ w_u.T, ht @ w.T, **opts) * mask * tw).sum() / mask.sum()
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(hs_f.grad, hs_u.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_f.grad, w_u.grad, rtol=1e-9, atol=1e-12)
    kl = fused_linear_sdpo_loss(hs, ht, w, mask, chunk_size=chunk_size, token_weights=tw, alpha=0.0, support=support, **kw)
    assert fused.item() > kl.item() + 1e-3  # the teacher's entropy is in the value


def test_forward_ce_needs_the_forward_direction_and_a_distribution_support():
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="objective='forward_ce' needs alpha=0.0 and support 'full' or 'topk'"):
        sdpo_token_loss(z, z, alpha=1.0, objective="forward_ce")
    with pytest.raises(ValueError, match="objective='forward_ce' needs alpha=0.0 and support 'full' or 'topk'"):
        sdpo_token_loss(z, z, alpha=1.0, support="sampled", tokens=torch.zeros(2, dtype=torch.long), objective="forward_ce")
    with pytest.raises(ValueError, match="objective='ce' is not allowed"):
        sdpo_token_loss(z, z, objective="ce")


# -------------------------------------------------------------------------------------- reference policy
def test_reference_kl_is_trls_k3_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.25)], dtype=F64), torch.tensor([math.log(0.25), math.log(0.25)], dtype=F64)
    # k3 = π_ref/π_θ − ln(π_ref/π_θ) − 1: 0.5 + ln 2 − 1 for the first token, 0 where the two agree
    want = torch.tensor([0.5 + math.log(2) - 1, 0.0], dtype=F64)
    for correction, grad in ((False, 1 - (ref - logp).exp()), (True, logp - ref)):  # ∂/∂l: 1 − π_ref/π_θ, or l − r
        leaf = logp.clone().requires_grad_(True)
        out = reference_kl(leaf, ref, bias_correction=correction)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-15)  # on-policy the ratio is 1 in value
        out.sum().backward()
        torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=1e-15)
    # off-policy (reused rollouts) the ratio π_θ/π_old weighs the estimate
    old = logp - 0.3
    torch.testing.assert_close(reference_kl(logp, ref, old), want * math.exp(0.3), rtol=1e-15, atol=0)


@pytest.mark.parametrize("correction, alpha", [(True, 1.0), (False, 0.0)])
def test_reference_kl_value_and_gradient_in_exact_expectation(correction, alpha):
    """Over y ~ π_θ (enumerated): E[k_t] = KL(π_θ‖π_ref) either way; E[∇_z k_t(y)] is the reverse KL's gradient with
    TRL's bias correction (alpha = 1) and the forward KL(π_ref‖π_θ)'s without it (alpha = 0)."""
    g = torch.Generator().manual_seed(3)
    z, z_ref = torch.randn(V, generator=g, dtype=F64), torch.randn(V, generator=g, dtype=F64)
    p, ref = z.softmax(-1), z_ref.log_softmax(-1)
    value, grad = 0.0, torch.zeros(V, dtype=F64)
    for y in range(V):
        leaf = z.clone().requires_grad_(True)
        k = reference_kl(leaf.log_softmax(-1)[y], ref[y], bias_correction=correction)
        k.backward()
        value += p[y].item() * k.item()
        grad += p[y] * leaf.grad
    assert value == pytest.approx(divergence(z.log_softmax(-1), ref, 1.0).item(), rel=1e-12)
    leaf = z.clone().requires_grad_(True)
    divergence(leaf.log_softmax(-1), ref, alpha).backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)


def test_reference_anchor_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0], dtype=F64), torch.tensor([-1.5, -2.0], dtype=F64)
    leaf = logp.clone().requires_grad_(True)
    out = reference_anchor(leaf, ref)
    torch.testing.assert_close(out, torch.tensor([0.125, 0.0], dtype=F64), rtol=0, atol=0)  # ½·0.5², ½·0²
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([0.5, 0.0], dtype=F64), rtol=0, atol=0)  # l − r


# -------------------------------------------------------------------------------------- SDPG-style schedule and gate
def test_distill_schedule_by_hand_and_as_sdpg_writes_it():
    # S = 10 steps, warm-up 4, decay 3: 0, ¼, ½, ¾, 1, 1, 1, then (10 − k)/3 from k = 7
    want = [0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 2 / 3, 1 / 3]
    assert [distill_schedule(k, 10, 4, 3) for k in range(10)] == pytest.approx(want, abs=1e-15)
    assert [distill_schedule(k, 10) for k in range(10)] == [1.0] * 10
    assert distill_schedule(1, 4, 4, 4) == pytest.approx(0.25 * 0.75, abs=1e-15)  # overlapping: the two multiply
    for bad in (dict(step=-1), dict(total_steps=0), dict(warmup_steps=1.5), dict(decay_steps=True)):
        args = {**dict(step=0, total_steps=5, warmup_steps=0, decay_steps=0), **bad}
        with pytest.raises(ValueError, match=f"distill_schedule: {next(iter(bad))}="):
            distill_schedule(**args)


def test_positive_advantage_gate_by_hand_and_as_grpo_sign():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]], dtype=F64)
    torch.testing.assert_close(positive_advantage_gate(scores, 4), torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 0]], dtype=F64))
    _, _, _, s = _inputs(4)
    for scale in ("group", "batch", "none"):
        assert torch.equal(positive_advantage_gate(s, G).bool(), group_advantages(s, G, scale) > 0)
    with pytest.raises(ValueError, match="group_size=3 must be a positive integer dividing scores's last dimension 4"):
        positive_advantage_gate(scores, 3)


# -------------------------------------------------------------------------------------- SC-SDPO-style weights
def test_success_std_weight_by_hand():
    success = torch.tensor([[True, False, False, False, True, True, True, True, True, True, False, False]])
    p = group_success_rate(success, 4)
    torch.testing.assert_close(p, torch.tensor([[0.25] * 4 + [1.0] * 4 + [0.5] * 4]))
    w = success_std_weight(success, 4)
    torch.testing.assert_close(w, torch.tensor([[math.sqrt(0.1875)] * 4 + [0.0] * 4 + [0.5] * 4]), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="success must be a bool tensor"):
        success_std_weight(success.float(), 4)


# -------------------------------------------------------------------------------------- SRPO-style weights, routing
def test_teacher_confidence_weight_by_hand():
    # two masked tokens with entropies 0 and ln 2 → exp(−H) = 1 and ½, mean ¾ → weights 4/3 and 2/3; the third is masked
    h = torch.tensor([[[0.0, math.log(2), 5.0]]], dtype=F64)
    m = torch.tensor([[[1, 1, 0]]], dtype=torch.bool)
    torch.testing.assert_close(teacher_confidence_weight(h, m), torch.tensor([[[4 / 3, 2 / 3, 0.0]]], dtype=F64), rtol=1e-15, atol=0)
    # a normaliser from a larger batch replaces this batch's
    torch.testing.assert_close(teacher_confidence_weight(h, m, mean=torch.tensor(0.5, dtype=F64)),
                               torch.tensor([[[2.0, 1.0, 0.0]]], dtype=F64), rtol=1e-15, atol=0)
    # the entropy of the teacher's logits: uniform over 4 → ln 4
    assert token_entropy(torch.zeros(4, dtype=F64)).item() == pytest.approx(math.log(4), abs=1e-15)


def test_teacher_confidence_weight_normalises_each_run_separately():
    _, teacher, _, _ = _inputs(5)
    mask = torch.rand(R, B, T, generator=torch.Generator().manual_seed(1)) > 0.3
    w = teacher_confidence_weight(token_entropy(teacher), mask)
    for r in range(R):
        one = teacher_confidence_weight(token_entropy(teacher[r]), mask[r])
        torch.testing.assert_close(w[r], one, rtol=0, atol=0)
        assert (w[r][mask[r]].mean().item()) == pytest.approx(1.0, rel=1e-12)  # mean 1 over the masked tokens


def test_routed_token_loss_by_hand():
    pg = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=F64)
    d = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]], dtype=F64)
    success = torch.tensor([[True, False, False]])
    dmask = torch.tensor([[[1, 1], [1, 0], [0, 0]]], dtype=torch.bool)  # the third completion has no teacher
    tok, mask = routed_token_loss(pg, d, success, dmask)
    torch.testing.assert_close(tok, torch.tensor([[[1.0, 2.0], [30.0, 0.0], [0.0, 0.0]]], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(mask, torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]], dtype=F64), rtol=0, atol=0)
    assert aggregate(tok, mask).item() == pytest.approx((1 + 2 + 30) / 3, abs=1e-15)


# -------------------------------------------------------------------------------------- the advantage blend
def test_blended_advantages_by_hand():
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    signal = torch.tensor([[0.5, -0.2], [0.1, 0.3]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    want = torch.tensor([[0.9 + 0.05, 0.9 - 0.02], [-0.9 + 0.01, -0.9]], dtype=F64)
    torch.testing.assert_close(blended_advantages(adv, signal, 0.9, mask), want, rtol=0, atol=1e-15)


def test_advantage_form_gradient_is_the_written_equation():
    """∇ of the advantage form (on-policy) = ∇ of −mean_t A_t·log π_θ(y_t) with A_t = λ·A_i + (1−λ)·m_t·sg(log p_T − log p_θ),
    written out with the closed form ∂log π(y)/∂z = e_y − π."""
    student, teacher, tokens, scores = _inputs(6)
    adv = group_advantages(scores, G)
    mask = torch.rand(R, B, T, generator=torch.Generator().manual_seed(2)) > 0.25
    lam = 0.9
    leaf = student.clone().requires_grad_(True)
    logp = _token_logp(leaf, tokens)
    signal = (_token_logp(teacher, tokens) - logp).detach()
    loss = aggregate(advantage_blend_token_loss(logp, adv, lam, distill_mask=mask, signal=signal))
    loss.backward()
    p = student.softmax(-1)
    a_t = lam * adv.unsqueeze(-1) + (1 - lam) * mask.to(F64) * (_token_logp(teacher, tokens) - _token_logp(student, tokens))
    onehot = torch.nn.functional.one_hot(tokens, V).to(F64)
    want = -(a_t.unsqueeze(-1) * (onehot - p)) / (R * B * T)
    torch.testing.assert_close(leaf.grad, want, **TOL)
    # λ = 1 is GRPO's policy-gradient loss exactly
    logp0 = _token_logp(student, tokens)
    assert torch.equal(advantage_blend_token_loss(logp0, adv, 1.0, distill_mask=mask, signal=signal),
                       policy_gradient_token_loss(logp0, adv.unsqueeze(-1).expand(-1, -1, T)))


def _two_step_policy(seed: int):
    """An enumerable autoregressive case: V tokens, T = 2, π(y1) from z1 [V], π(y2 | y1) from z2 [V, V]; teacher likewise."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(V, generator=g, dtype=F64), torch.randn(V, V, generator=g, dtype=F64)
    t1, t2 = torch.randn(V, generator=g, dtype=F64), torch.randn(V, V, generator=g, dtype=F64)
    reward = torch.rand(V, V, generator=g, dtype=F64)
    return z1, z2, t1, t2, reward


@pytest.mark.parametrize("lam", [0.0, 0.9])
def test_blend_forms_agree_in_exact_expectation_and_a_constant_divergence_advantage_has_none(lam):
    """Enumerating every sequence y = (y1, y2) with its probability, the expected gradient of the advantage form equals
    the expected gradient of the loss form (reverse KL kept in the loss); a per-position divergence used as a constant
    advantage (the known trap) contributes exactly zero in expectation."""
    z1, z2, t1, t2, reward = _two_step_policy(7)
    p1, p2 = z1.softmax(-1), z2.softmax(-1)
    baseline = (p1.unsqueeze(-1) * p2 * reward).sum()  # A(y) = R(y) − J: any y-independent baseline works
    expect = {name: [torch.zeros(V, dtype=F64), torch.zeros(V, V, dtype=F64)] for name in ("advantage", "loss", "trap")}
    for y1, y2 in itertools.product(range(V), range(V)):
        prob = (p1[y1] * p2[y1, y2]).item()
        tokens = torch.tensor([[y1, y2]])
        adv = (reward[y1, y2] - baseline).reshape(1)
        for name in expect:
            l1, l2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
            student = torch.stack([l1, l2[y1]]).unsqueeze(0)  # [1, T=2, V]: the logits at each sampled prefix
            teacher = torch.stack([t1, t2[y1]]).unsqueeze(0)
            logp = _token_logp(student, tokens)
            mask = torch.ones(1, 2)
            if name == "advantage":
                signal = (_token_logp(teacher, tokens) - logp).detach()
                tok = advantage_blend_token_loss(logp, adv, lam, distill_mask=mask, signal=signal)
            elif name == "loss":
                d = sdpo_token_loss(student, teacher, alpha=1.0)
                tok = advantage_blend_token_loss(logp, adv, lam, distill_mask=mask, distill_tok=d)
            else:  # the trap: D_t as a per-position constant inside the advantage
                d = sdpo_token_loss(student, teacher, alpha=1.0).detach()
                tok = policy_gradient_token_loss(logp, lam * adv.unsqueeze(-1) + (1 - lam) * d)
            tok.sum().backward()
            expect[name][0] += prob * l1.grad
            expect[name][1] += prob * l2.grad
    for a, b in zip(expect["advantage"], expect["loss"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the trap loses the whole distillation gradient: what is left is λ times the policy gradient alone
    pg_only = [lam * g for g in _expected_pg_gradient(z1, z2, reward, baseline)]
    for a, b in zip(expect["trap"], pg_only):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    distill = [a - b for a, b in zip(expect["loss"], pg_only)]
    assert max(float(d.abs().max()) for d in distill) > 1e-2 * (1 - lam) if lam < 1 else True


def _expected_pg_gradient(z1, z2, reward, baseline):
    p1, p2 = z1.softmax(-1), z2.softmax(-1)
    out = [torch.zeros(V, dtype=F64), torch.zeros(V, V, dtype=F64)]
    for y1, y2 in itertools.product(range(V), range(V)):
        l1, l2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        logp = torch.log_softmax(l1, -1)[y1] + torch.log_softmax(l2[y1], -1)[y2]
        (-(reward[y1, y2] - baseline) * logp).backward()
        out[0] += (p1[y1] * p2[y1, y2]) * l1.grad
        out[1] += (p1[y1] * p2[y1, y2]) * l2.grad
    return out


def test_advantage_form_clips_the_blended_advantage():
    logp = torch.tensor([[0.0, 0.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]], dtype=F64)  # ratio e^0.5 = 1.65 > 1.2 on the first token, 1 on the second
    adv, signal = torch.tensor([1.0], dtype=F64), torch.tensor([[0.5, 0.5]], dtype=F64)
    tok = advantage_blend_token_loss(logp, adv, 0.5, distill_mask=torch.ones(1, 2), signal=signal, old_logp=old, epsilon=0.2)
    a = 0.5 * 1.0 + 0.5 * 0.5
    torch.testing.assert_close(tok, torch.tensor([[-1.2 * a, -a]], dtype=F64), rtol=0, atol=1e-15)
    tok.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -a]], dtype=F64), rtol=0, atol=1e-15)  # the clip binds


def test_advantage_blend_needs_one_form():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs exactly one of signal"):
        advantage_blend_token_loss(x, torch.zeros(1), 0.9, distill_mask=x)
    with pytest.raises(ValueError, match="needs exactly one of signal"):
        advantage_blend_token_loss(x, torch.zeros(1), 0.9, distill_mask=x, signal=x, distill_tok=x)
    with pytest.raises(ValueError, match=r"lam=1\.5 must be a number in \[0, 1\]"):
        advantage_blend_token_loss(x, torch.zeros(1), 1.5, distill_mask=x, signal=x)


# -------------------------------------------------------------------------------------- toy form = LLM form
LOSS_TYPES = ("token_mean", "sequence_mean", "dr_grpo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_variant_gives_the_same_loss_in_its_toy_and_llm_forms(loss_type):
    """One call on [R, B, T, V] aggregated per run (the toy world) equals R calls on [B, T, V] each aggregated once
    (the LLM path), and both equal a straightforward loop over the tokens."""
    student, teacher, tokens, scores = _inputs(8)
    ref_logits = torch.randn(R, B, T, V, generator=torch.Generator().manual_seed(9), dtype=F64)
    success = scores > 0.5
    dmask = torch.rand(R, B, generator=torch.Generator().manual_seed(3)) > 0.2
    dmask_t = dmask.unsqueeze(-1).expand(-1, -1, T)
    adv = group_advantages(scores, G)
    logp, ref = _token_logp(student, tokens), _token_logp(ref_logits, tokens)
    signal = _token_logp(teacher, tokens) - logp
    d_full = sdpo_token_loss(student, teacher, alpha=1.0)
    d_ce = sdpo_token_loss(student, teacher, alpha=0.0, objective="forward_ce")
    weight = (positive_advantage_gate(scores, G) * success_std_weight(success, G).to(F64)).unsqueeze(-1) \
        * teacher_confidence_weight(token_entropy(teacher), dmask_t)
    pick = lambda x, r: x[r]  # noqa: E731
    variants = {
        "forward_ce": (lambda r: pick(d_ce, r), lambda r: pick(dmask_t, r)),
        "weighted_distill": (lambda r: pick(d_full, r) * pick(weight, r), lambda r: pick(dmask_t, r)),
        "blend_advantage": (lambda r: advantage_blend_token_loss(pick(logp, r), pick(adv, r), 0.9, distill_mask=pick(dmask_t, r),
                                                                 signal=pick(signal, r)), None),
        "blend_loss": (lambda r: advantage_blend_token_loss(pick(logp, r), pick(adv, r), 0.9, distill_mask=pick(dmask_t, r),
                                                            distill_tok=pick(d_full, r)), None),
        "srpo": (lambda r: routed_token_loss(policy_gradient_token_loss(pick(logp, r), pick(adv, r)), pick(d_full, r),
                                             pick(success, r), pick(dmask_t, r))[0],
                 lambda r: routed_token_loss(pick(logp, r), pick(logp, r), pick(success, r), pick(dmask_t, r))[1]),
        "ref_kl": (lambda r: reference_kl(pick(logp, r), pick(ref, r)), None),
        "ref_anchor": (lambda r: reference_anchor(pick(logp, r), pick(ref, r)), None),
    }
    for name, (tok_fn, mask_fn) in variants.items():
        toy, llm = _toy_and_llm(tok_fn, mask_fn, loss_type)
        torch.testing.assert_close(toy, llm, **TOL, msg=name)
        torch.testing.assert_close(toy, _straightforward(name, loss_type, student, teacher, tokens, scores, success, dmask, ref_logits),
                                   rtol=1e-11, atol=1e-12, msg=name)


def _straightforward(name, loss_type, student, teacher, tokens, scores, success, dmask, ref_logits):
    """Plain-Python loops over runs, completions and tokens, sharing no code with the library."""
    out = []
    for r in range(R):
        per_tok, mask = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
        sc = scores[r].tolist()
        group = lambda i: range(i - i % G, i - i % G + G)  # noqa: E731
        mean = lambda i: sum(sc[j] for j in group(i)) / G  # noqa: E731
        std = lambda i: math.sqrt(sum((sc[j] - mean(i)) ** 2 for j in group(i)) / (G - 1))  # noqa: E731
        adv = [(sc[i] - mean(i)) / (std(i) + 1e-4) for i in range(B)]
        p_succ = [sum(bool(success[r, j]) for j in group(i)) / G for i in range(B)]
        conf = {}
        for i in range(B):
            for t in range(T):
                q = _py_softmax(teacher[r, i, t].tolist())
                conf[i, t] = math.exp(sum(x * math.log(x) for x in q))  # exp(−H_T)
        distilled = [(i, t) for i in range(B) for t in range(T) if dmask[r, i]]
        conf_mean = sum(conf[k] for k in distilled) / max(1, len(distilled))
        for i in range(B):
            for t in range(T):
                p, q = _py_softmax(student[r, i, t].tolist()), _py_softmax(teacher[r, i, t].tolist())
                y = int(tokens[r, i, t])
                lp, lq = math.log(p[y]), math.log(q[y])
                rkl = sum(a * math.log(a / b) for a, b in zip(p, q))
                m = 1.0 if dmask[r, i] else 0.0
                ref = math.log(_py_softmax(ref_logits[r, i, t].tolist())[y])
                if name == "forward_ce":
                    per_tok[i][t], mask[i][t] = -sum(b * math.log(a) for a, b in zip(p, q)), m
                elif name == "weighted_distill":
                    gate = 1.0 if sc[i] > mean(i) else 0.0
                    w = gate * math.sqrt(p_succ[i] * (1 - p_succ[i])) * conf[i, t] / conf_mean
                    per_tok[i][t], mask[i][t] = rkl * w, m
                elif name == "blend_advantage":
                    per_tok[i][t], mask[i][t] = -(0.9 * adv[i] + 0.1 * m * (lq - lp)), 1.0
                elif name == "blend_loss":
                    per_tok[i][t], mask[i][t] = 0.9 * -adv[i] + 0.1 * m * rkl, 1.0
                elif name == "srpo":
                    s = bool(success[r, i])
                    per_tok[i][t], mask[i][t] = (-adv[i], 1.0) if s else (m * rkl, m)
                elif name == "ref_kl":
                    per_tok[i][t], mask[i][t] = math.exp(ref - lp) - (ref - lp) - 1, 1.0
                else:
                    per_tok[i][t], mask[i][t] = 0.5 * (lp - ref) ** 2, 1.0
        num = sum(per_tok[i][t] * mask[i][t] for i in range(B) for t in range(T))
        if loss_type == "token_mean":
            out.append(num / max(1.0, sum(map(sum, mask))))
        elif loss_type == "sequence_mean":
            out.append(sum(sum(per_tok[i][t] * mask[i][t] for t in range(T)) / max(1.0, sum(mask[i])) for i in range(B)) / B)
        else:
            out.append(num / (B * T))
    return torch.tensor(out, dtype=F64)


# -------------------------------------------------------------------------------------- MethodConfig
def test_method_distill_weights_compose_the_core_functions():
    _, teacher, _, scores = _inputs(10)
    success = scores > 0.4
    mask = torch.ones(R, B, T, dtype=torch.bool)
    m = MethodConfig(name="sdpo", num_generations=G, distill_gate="positive_advantage", distill_prompt_weight="success_std",
                     distill_token_weight="teacher_confidence", distill_warmup_steps=4, distill_decay_steps=2)
    h = token_entropy(teacher)
    got = m.distill_weights(scores=scores, mask=mask, success=success, teacher_entropy=h, step=1, total_steps=10, dtype=F64)
    want = 0.25 * (positive_advantage_gate(scores, G) * success_std_weight(success, G).to(F64)).unsqueeze(-1) \
        * teacher_confidence_weight(h, mask)
    torch.testing.assert_close(got, want, **TOL)
    assert MethodConfig().distill_weights(scores=scores, mask=mask) is None  # nothing set: no arithmetic at all
    with pytest.raises(ValueError, match="success_std' needs success"):
        m.distill_weights(scores=scores, mask=mask, teacher_entropy=h)


def test_method_config_knows_the_new_methods():
    blend, srpo = MethodConfig(name="blend"), MethodConfig(name="srpo")
    for m in (blend, srpo):
        assert m.distills and m.uses_policy_gradient and m.make_controller() is None
    assert srpo.needs_success and not blend.needs_success
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7]], dtype=F64)
    for m in (blend, srpo):  # GRPO's group advantages
        assert torch.equal(m.replace(num_generations=2).advantages(s), group_advantages(s, 2, "group"))
    assert MethodConfig().variants_in_use() == ()
    assert MethodConfig(blend_lambda=0.5).variants_in_use() == ()  # blend_lambda does nothing outside blend
    assert MethodConfig(name="blend", blend_lambda=0.5, ref_beta=0.1).variants_in_use() == ("name=blend", "blend_lambda", "ref_beta")
    assert set(VARIANT_FIELDS) <= set(MethodConfig.field_names())


@pytest.mark.parametrize("bad, match", [
    (dict(blend_lambda=1.5), r"MethodConfig.blend_lambda=1.5 must be a number in \[0.0, 1.0\]"),
    (dict(distill_loss="forward_ce"), r"MethodConfig.distill_loss='forward_ce' needs alpha=0.0 .* got alpha=1.0, support='full'"),
    (dict(distill_loss="forward_ce", alpha=0.0, support="sampled"), r"needs alpha=0.0 .* support='sampled'"),
    (dict(distill_loss="kl"), r"MethodConfig.distill_loss='kl' is not allowed; choose one of 'alpha', 'forward_ce'"),
    (dict(distill_gate="always"), r"MethodConfig.distill_gate='always' is not allowed; choose one of 'none', 'positive_advantage'"),
    (dict(distill_prompt_weight="sqrt"), r"choose one of 'uniform', 'success_std'"),
    (dict(distill_token_weight="entropy"), r"choose one of 'uniform', 'teacher_confidence'"),
    (dict(distill_warmup_steps=-1), r"MethodConfig.distill_warmup_steps=-1 must be an integer ≥ 0"),
    (dict(distill_decay_steps=2.5), r"MethodConfig.distill_decay_steps=2.5 must be an integer ≥ 0"),
    (dict(ref_beta=-0.1), r"MethodConfig.ref_beta=-0.1 must be a number in \[0.0, 1000.0\]"),
    (dict(ref_anchor=float("nan")), r"MethodConfig.ref_anchor=nan must be a number"),
    (dict(name="grpo", distill_gate="positive_advantage"), r"MethodConfig.distill_gate='positive_advantage' acts on the distillation term, which name='grpo' does not have"),
    (dict(name="reinforce", distill_warmup_steps=3), r"distill_warmup_steps=3 acts on the distillation term, which name='reinforce'"),
    (dict(name="srpo", num_generations=1), r"num_generations must be ≥ 2 for name='srpo'"),
])
def test_bad_variant_settings_are_refused_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        MethodConfig.from_dict(bad)
    assert "\n" not in str(err.value)


def test_ref_beta_is_named_apart_from_the_teacher_sharpness():
    cfg = RunConfig.from_dict(dict(method="grpo", beta=2.0, ref_beta=0.05))
    assert cfg.beta == 2.0 and cfg.method.ref_beta == 0.05
    assert "beta" in MethodConfig.__dataclass_fields__["ref_beta"].metadata["help"]


def test_success_is_what_the_feedback_message_establishes():
    inf = float("inf")
    lower = torch.tensor([[0.5, -inf, 0.6, 0.4, 0.5]], dtype=F64)
    upper = torch.tensor([[inf, 0.5, 0.6, 0.6, 0.5]], dtype=F64)
    fb = Feedback("continuous", lower, lower, upper, 1, 0.0)
    # binary pass (τ, ∞) → yes; fail (−∞, τ] → no; score 0.6 → yes; star bin [0.4, 0.6) → not established; score = τ → no
    assert fb.success(0.5).tolist() == [[True, False, True, False, False]]


# -------------------------------------------------------------------------------------- toy runs
SMALL = dict(vocab_size=4, seq_len=3, seeds=2, steps=4, eval_every=1, batch_size=8, num_generations=4)
SAME = ("reward", "entropy", "seq_entropy", "kl_init", "grad_cos", "batch_reward", "credit_pearson")


def _run(**kw):
    return run(RunConfig.from_dict({**SMALL, **kw})).history


@pytest.mark.parametrize("kw", [
    dict(method="blend", support="sampled"), dict(method="blend", support="topk", topk=2, alpha=0.5),
    dict(method="srpo", feedback="binary", distill_token_weight="teacher_confidence"),
    dict(method="sdpo", distill_prompt_weight="success_std", distill_gate="positive_advantage", feedback="critique"),
    dict(method="hybrid", distill_loss="forward_ce", alpha=0.0, distill_warmup_steps=2, distill_decay_steps=2),
    dict(method="reinforce", ref_beta=0.1, ref_anchor=0.1),
    dict(method="sdpo", teacher="oracle", updates_per_batch=3, ref_beta=0.05),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_every_variant_runs_in_the_toy_world(kw):
    h = _run(**kw)
    # grad_cos is NaN where a weighting zeroes the whole gradient of a batch (e.g. every group all passed or all failed)
    assert h[[c for c in SAME if c != "grad_cos"]].notna().all().all() and (h.step.max() == SMALL["steps"])
    assert h.divergence.notna().all() == (kw["method"] != "reinforce")


def test_blend_with_lambda_one_is_grpo_and_srpo_with_no_success_is_sdpo():
    grpo = _run(method="grpo")
    for support in ("sampled", "full"):
        blend = _run(method="blend", blend_lambda=1.0, support=support)
        for col in SAME:
            assert np.array_equal(blend[col].to_numpy(), grpo[col].to_numpy(), equal_nan=True), (support, col)
    sdpo = _run(method="sdpo", feedback="binary", threshold=1.0)
    srpo = _run(method="srpo", feedback="binary", threshold=1.0)  # nothing passes R + ε > 1 at noise 0
    for col in (*SAME, "divergence", "feedback_credit_pearson"):
        assert np.array_equal(srpo[col].to_numpy(), sdpo[col].to_numpy(), equal_nan=True), col


def test_forward_ce_trains_exactly_as_forward_kl():
    """Same gradient (the teacher is detached): the same updates, up to float32 rounding of the two expressions
    (each logit gradient is p_θ − p_T either way, so the runs agree to a few float32 ulps of the logits)."""
    kl = _run(method="sdpo", alpha=0.0, steps=6)
    ce = _run(method="sdpo", alpha=0.0, steps=6, distill_loss="forward_ce")
    for col in SAME:
        np.testing.assert_allclose(ce[col].to_numpy(), kl[col].to_numpy(), rtol=1e-5, atol=1e-6, err_msg=col)


def test_a_warm_up_from_zero_leaves_the_first_step_without_an_update():
    h = _run(method="sdpo", distill_warmup_steps=3)
    # weight 0 at step 0: a zero gradient, so Adam does not move and step 1 sees the initial policy again
    assert np.array_equal(h[h.step == 1].kl_init.to_numpy(), np.zeros(2)) and (h[h.step == 2].kl_init > 0).all()


def test_the_reference_kl_acts_only_once_the_policy_moves_and_then_holds_it_near_the_start():
    free = _run(method="grpo", steps=8)
    held = _run(method="grpo", steps=8, ref_beta=50.0)
    # at the initial policy π_θ = π_ref: k3 = 0 with zero gradient, the first update is unchanged
    assert np.array_equal(held[held.step == 0].grad_cos.to_numpy(), free[free.step == 0].grad_cos.to_numpy())
    last = held.step.max()
    assert (held[held.step == last].kl_init.to_numpy() < free[free.step == last].kl_init.to_numpy()).all()


# -------------------------------------------------------------------------------------- rollout reuse
def test_one_update_per_batch_is_the_default_bit_for_bit_and_clip_settings_then_do_nothing():
    base = _run(method="hybrid", steps=3)
    assert base.equals(_run(method="hybrid", steps=3, updates_per_batch=1))
    assert base.equals(_run(method="hybrid", steps=3, epsilon=0.01, is_clip=0.5))  # on-policy: neither acts


@pytest.mark.parametrize("method, setting", [("grpo", dict(epsilon=0.01)), ("sdpo", dict(is_clip=0.9)), ("blend", dict(epsilon=0.01, is_clip=0.9))])
def test_with_rollout_reuse_the_clip_settings_change_the_run(method, setting):
    kw = dict(method=method, steps=3, updates_per_batch=3, optimizer="sgd", lr=2.0, support="full")
    loose = _run(**kw, epsilon=1000.0, is_clip=1000.0)
    tight = _run(**kw, **setting)
    assert np.array_equal(loose[loose.step == 0].grad_cos, tight[tight.step == 0].grad_cos) or "is_clip" in setting
    assert not np.allclose(loose[loose.step == 3].kl_init, tight[tight.step == 3].kl_init)


def test_the_reused_updates_see_old_log_probs_and_the_ppo_clip_binds(monkeypatch):
    """The later updates of a batch get the sampling policy's log-probabilities: the ratio departs from 1, tokens
    outside [1 − ε, 1 + ε] on the advantage's side are clipped, and their gradient is exactly zero."""
    calls = []
    real = train.policy_gradient_token_loss

    def spy(logp, adv, old_logp=None, **kw):
        calls.append((logp.detach().clone(), adv.clone(), None if old_logp is None else old_logp.clone(), kw["epsilon"]))
        return real(logp, adv, old_logp, **kw)

    monkeypatch.setattr(train, "policy_gradient_token_loss", spy)
    _run(method="grpo", steps=1, seeds=1, updates_per_batch=2, optimizer="sgd", lr=3.0, epsilon=0.05, eval_every=1)
    (logp0, adv0, old0, _), (logp1, adv1, old1, eps) = calls[0], calls[1]  # step 0: its two updates
    assert torch.equal(old0, logp0) and torch.equal(old1, logp0) and torch.equal(adv1, adv0)
    ratio = (logp1 - old1).exp()
    a = adv1.unsqueeze(-1).expand_as(ratio)
    clipped = ((a > 0) & (ratio > 1 + eps)) | ((a < 0) & (ratio < 1 - eps))
    assert clipped.float().mean() > 0.3, clipped.float().mean()
    leaf = logp1.clone().requires_grad_(True)
    real(leaf, adv1, old1, epsilon=eps).sum().backward()
    assert torch.equal(leaf.grad[clipped], torch.zeros(int(clipped.sum()))) and (leaf.grad[~clipped & (a != 0)] != 0).all()


def test_the_reused_updates_cap_the_distillation_importance_weight(monkeypatch):
    calls = []
    real = train.truncated_importance_weight

    def spy(logp, old_logp, clip):
        w = real(logp, old_logp, clip)
        calls.append((w.clone(), clip))
        return w

    monkeypatch.setattr(train, "truncated_importance_weight", spy)
    _run(method="sdpo", steps=1, seeds=1, updates_per_batch=2, optimizer="sgd", lr=3.0, is_clip=1.05)
    (w0, _), (w1, clip) = calls[0], calls[1]
    assert torch.equal(w0, torch.ones_like(w0))  # the first update is on-policy: weight min(1, c) = 1
    assert (w1 == clip).any() and (w1 < 1).any()  # later: the cap binds on some tokens, others lost probability


def test_rollout_reuse_keeps_runs_independent_in_a_group():
    base = dict(SMALL, method="blend", support="sampled", updates_per_batch=2, steps=3)
    cfgs = [RunConfig.from_dict({**base, "lr": lr, "seeds": n, "seed_start": s}) for lr, n, s in ((0.3, 2, 0), (0.1, 1, 2))]
    for cfg, together in zip(cfgs, train.run_group(cfgs)):
        alone = run(cfg).history
        for col in alone.columns:
            assert np.array_equal(together.history[col].to_numpy(), alone[col].to_numpy(), equal_nan=True), col


def test_updates_per_batch_is_refused_below_one():
    with pytest.raises(ValueError, match=r"RunConfig.updates_per_batch=0 must be an integer ≥ 1"):
        RunConfig.from_dict(dict(updates_per_batch=0))
