"""Our losses equal TRL's (the peer users would pick instead) on identical tensors.

- SDPO: ``trl.experimental.sdpo.loss_utils`` for every mode both support (full vocabulary at alpha
  0 / 0.5 / 1, top-k with and without the tail bucket, sampled token, importance-ratio clipping).
- GRPO: the advantages of a real ``GRPOTrainer`` (its ``_generate_and_score_completions`` on a locally
  built tiny model with fixed rewards) and its ``_compute_loss`` for each loss type we share, with and without
  the KL to a reference policy (``beta``, our ``ref_beta``; with and without ``use_bias_correction_kl``).

Needs the ``peers`` extra (``./lab test`` installs it). Under ``CI=true`` a missing trl is an error,
not a skip, so CI can never pass without running these checks.
"""

from __future__ import annotations

import os

import pytest
import torch

try:
    from trl.experimental.sdpo import loss_utils as trl_sdpo
    from trl.trainer.utils import selective_log_softmax
except ImportError as err:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise ImportError("trl is required under CI=true: install the `peers` extra (./lab test does)") from err
    pytest.skip(f"trl not installed ({err}); install the `peers` extra", allow_module_level=True)

from sdpo_sim.core.losses import (
    aggregate,
    divergence,
    fused_linear_sdpo_loss,
    group_advantages,
    policy_gradient_token_loss,
    reference_kl,
    sdpo_token_loss,
    truncated_importance_weight,
)

pytestmark = pytest.mark.peers
F64 = torch.float64
B, T, V = 3, 5, 17


def _logits(seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(B, T, V, generator=g, dtype=F64))
    teacher = (scale * torch.randn(B, T, V, generator=g, dtype=F64))
    tokens = torch.randint(0, V, (B, T), generator=g)
    return student, teacher, tokens


def _value_and_grad(fn, student: torch.Tensor, teacher: torch.Tensor):
    leaf = student.clone().requires_grad_(True)
    out = fn(leaf, teacher)
    # a fixed, non-uniform weighting so that the gradient check sees every position separately
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), leaf.grad


def _assert_same(ours, theirs):
    (v_ours, g_ours), (v_theirs, g_theirs) = ours, theirs
    torch.testing.assert_close(v_ours, v_theirs, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-11, atol=1e-13)
    assert v_ours.abs().sum() > 0 and g_ours.abs().sum() > 0


# ------------------------------------------------------------------------------------------- SDPO
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.25])
def test_divergence_equals_trl(alpha):
    s, t, _ = _logits(0)
    s, t = s.log_softmax(-1), t.log_softmax(-1)
    torch.testing.assert_close(divergence(s, t, alpha), trl_sdpo.compute_divergence(s, t, alpha), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_full_logits_equals_trl(alpha):
    s, t, _ = _logits(1)
    ours = _value_and_grad(lambda a, b: sdpo_token_loss(a, b, alpha=alpha, support="full"), s, t)
    theirs = _value_and_grad(
        lambda a, b: trl_sdpo.compute_full_logit_self_distillation_loss(a, b, distillation_alpha=alpha), s, t
    )
    _assert_same(ours, theirs)


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("topk", [1, 4, V])
def test_topk_equals_trl(topk, alpha, add_tail):
    s, t, _ = _logits(2)
    ours = _value_and_grad(
        lambda a, b: sdpo_token_loss(a, b, alpha=alpha, support="topk", topk=topk, add_tail=add_tail), s, t
    )
    theirs = _value_and_grad(
        lambda a, b: trl_sdpo.compute_topk_self_distillation_loss(
            a, b, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail
        ),
        s, t,
    )
    if topk == 1 and not add_tail:  # one renormalised token: both are identically 0 (nothing to compare but zeros)
        torch.testing.assert_close(ours[0], theirs[0])
        assert ours[0].abs().max() == 0
        return
    _assert_same(ours, theirs)


def test_sampled_token_equals_trl():
    s, t, tokens = _logits(3)
    ours = _value_and_grad(lambda a, b: sdpo_token_loss(a, b, alpha=1.0, support="sampled", tokens=tokens), s, t)
    theirs = _value_and_grad(
        lambda a, b: trl_sdpo.compute_sampled_token_self_distillation_loss(a, b, tokens, distillation_alpha=1.0), s, t
    )
    _assert_same(ours, theirs)
    with pytest.raises(ValueError):  # both refuse alpha != 1 for the sampled-token estimator
        trl_sdpo.compute_sampled_token_self_distillation_loss(s, t, tokens, distillation_alpha=0.5)
    with pytest.raises(ValueError):
        sdpo_token_loss(s, t, alpha=0.5, support="sampled", tokens=tokens)


@pytest.mark.parametrize("clip", [2.0, 1.2])
def test_importance_clipping_equals_trl(clip):
    """Loss × min(π_θ/π_old, clip), detached ratio. Log-ratios here lie in [−3, 3]."""
    s, t, tokens = _logits(4)
    g = torch.Generator().manual_seed(5)
    old = selective_log_softmax(s, tokens) + 3 * (2 * torch.rand(B, T, generator=g, dtype=F64) - 1)

    def ours(a, b):
        per_tok = sdpo_token_loss(a, b, alpha=0.5, support="topk", topk=4)
        logp = a.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return per_tok * truncated_importance_weight(logp, old, clip)

    def theirs(a, b):
        per_tok = trl_sdpo.compute_topk_self_distillation_loss(
            a, b, distillation_topk=4, distillation_alpha=0.5, distillation_add_tail=True
        )
        return trl_sdpo.apply_importance_sampling_clipping(per_tok, selective_log_softmax(a, tokens), old, clip)

    _assert_same(_value_and_grad(ours, s, t), _value_and_grad(theirs, s, t))


def test_importance_clipping_documented_difference_below_exp_minus_20():
    """Difference on purpose: TRL floors the log-ratio at −20 (weight ≥ e^−20 ≈ 2e−9); we do not floor it.

    Both weights are negligible there; above the floor the two are identical (test above).
    """
    logp, old = torch.tensor([-1.0, -1.0], dtype=F64), torch.tensor([29.0, 10.0], dtype=F64)
    ours = truncated_importance_weight(logp, old, 2.0)
    theirs = trl_sdpo.apply_importance_sampling_clipping(torch.ones(2, dtype=F64), logp, old, 2.0)
    torch.testing.assert_close(ours, torch.exp(torch.tensor([-30.0, -11.0], dtype=F64)))
    torch.testing.assert_close(theirs, torch.exp(torch.tensor([-20.0, -11.0], dtype=F64)))


@pytest.mark.parametrize("support,alpha,kw", [("full", 0.5, {}), ("topk", 1.0, {"topk": 4}), ("sampled", 1.0, {})])
def test_fused_equals_trl_full_logit_mean(support, alpha, kw):
    """The fused path from hidden states = TRL's helper on materialised logits, averaged over masked tokens."""
    g = torch.Generator().manual_seed(6)
    n, h = 11, 6
    hs, ht, w = (torch.randn(n, h, generator=g, dtype=F64), torch.randn(n, h, generator=g, dtype=F64),
                 torch.randn(V, h, generator=g, dtype=F64))
    tokens = torch.randint(0, V, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    ours = fused_linear_sdpo_loss(hs, ht, w, mask, alpha=alpha, support=support, chunk_size=4,
                                  tokens=tokens if support == "sampled" else None, **kw)
    s, t = hs @ w.T, ht @ w.T
    if support == "full":
        per_tok = trl_sdpo.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha)
    elif support == "topk":
        per_tok = trl_sdpo.compute_topk_self_distillation_loss(
            s, t, distillation_topk=kw["topk"], distillation_alpha=alpha, distillation_add_tail=True
        )
    else:
        per_tok = trl_sdpo.compute_sampled_token_self_distillation_loss(s, t, tokens, distillation_alpha=alpha)
    theirs = (per_tok * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------------------------- GRPO
REWARDS = [0.1, 0.9, 0.3, 0.3, 1.0, 0.0, 0.5, 0.2, 0.7, 0.7, 0.7, 0.7]  # 3 prompts × 4; the last group is constant
GROUP = 4


@pytest.fixture(scope="module")
def grpo_trainer(tmp_path_factory):
    """A real GRPOTrainer on a locally built tiny model; rewards come from REWARDS in completion order."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from llm.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)

    def fixed_reward(completions, **kwargs):
        assert len(completions) == len(REWARDS)
        return list(REWARDS)

    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=len(REWARDS),
        num_generations=GROUP, max_completion_length=6, report_to=[], use_cpu=True, save_strategy="no",
        bf16=False, seed=0,
    )
    ds = Dataset.from_dict({"prompt": ["ab", "cd", "ef"]})
    trainer = GRPOTrainer(model=model, reward_funcs=fixed_reward, args=args, train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return trainer


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl_grpo_trainer(grpo_trainer, scale):
    grpo_trainer.scale_rewards = scale
    inputs = [{"prompt": p} for p in ("ab", "cd", "ef") for _ in range(GROUP)]
    with torch.no_grad():
        theirs = grpo_trainer._generate_and_score_completions(inputs)["advantages"]
    ours = group_advantages(torch.tensor(REWARDS), GROUP, scale)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[8:], torch.zeros(4))  # constant group → zero advantage in both


# TRL loss_type → our aggregation. TRL's "dapo" divides by the number of completion tokens in the whole
# generation batch; with one process and one accumulation window that is our token_mean.
LOSS_TYPES = {"grpo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "dr_grpo"}


@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("trl_type", list(LOSS_TYPES))
def test_clipped_policy_loss_equals_trl_grpo_trainer(grpo_trainer, trl_type, eps_high):
    g = torch.Generator().manual_seed(7)
    b, t = 4, grpo_trainer.max_completion_length
    logp0 = -torch.rand(b, t, generator=g) * 3
    old = logp0 + 0.4 * torch.randn(b, t, generator=g)  # ratios well outside [1 − ε, 1 + ε] for some tokens
    adv = torch.tensor([1.3, -0.7, 0.2, -2.0])
    mask = torch.ones(b, t)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
    }
    tr = grpo_trainer
    saved = (tr.loss_type, tr.epsilon_low, tr.epsilon_high)
    tr.loss_type, tr.epsilon_low, tr.epsilon_high = trl_type, 0.2, 0.2 if eps_high is None else eps_high
    their_leaf = logp0.clone().requires_grad_(True)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (their_leaf, torch.ones(b, t), None)
    try:
        theirs = tr._compute_loss(tr.model, inputs)
    finally:
        del tr._get_per_token_logps_and_entropies
        tr.loss_type, tr.epsilon_low, tr.epsilon_high = saved
    theirs.backward()

    our_leaf = logp0.clone().requires_grad_(True)
    per_tok = policy_gradient_token_loss(our_leaf, adv, old, epsilon=0.2, epsilon_high=eps_high)
    ours = aggregate(per_tok, mask, LOSS_TYPES[trl_type], max_completion_length=t)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_leaf.grad, their_leaf.grad, rtol=1e-6, atol=1e-8)
    ratio = (logp0 - old).exp()
    assert bool(((ratio > 1.3) | (ratio < 0.8)).any())  # clipping is exercised


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("trl_type", list(LOSS_TYPES))
def test_reference_kl_equals_trl_grpo_trainer(grpo_trainer, trl_type, bias_correction):
    """TRL adds beta·k3 (times the ratio with use_bias_correction_kl) to the per-token loss; ours is the policy-gradient
    term plus ref_beta·aggregate(reference_kl): the same loss and gradient, on- and off-policy."""
    g = torch.Generator().manual_seed(11)
    b, t, beta = 4, grpo_trainer.max_completion_length, 0.04
    logp0 = -torch.rand(b, t, generator=g) * 3
    old = logp0 + 0.3 * torch.randn(b, t, generator=g)
    ref = logp0 + 0.5 * torch.randn(b, t, generator=g)
    adv = torch.tensor([1.3, -0.7, 0.2, -2.0])
    mask = torch.ones(b, t)
    mask[2, 2:] = 0
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }
    tr = grpo_trainer
    saved = (tr.loss_type, tr.epsilon_low, tr.epsilon_high, tr.beta, tr.args.use_bias_correction_kl)
    tr.loss_type, tr.epsilon_low, tr.epsilon_high, tr.beta, tr.args.use_bias_correction_kl = trl_type, 0.2, 0.2, beta, bias_correction
    their_leaf = logp0.clone().requires_grad_(True)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (their_leaf, torch.ones(b, t), None)
    try:
        theirs = tr._compute_loss(tr.model, inputs)
    finally:
        del tr._get_per_token_logps_and_entropies
        tr.loss_type, tr.epsilon_low, tr.epsilon_high, tr.beta, tr.args.use_bias_correction_kl = saved
    theirs.backward()

    our_leaf = logp0.clone().requires_grad_(True)
    kind = LOSS_TYPES[trl_type]
    pg = aggregate(policy_gradient_token_loss(our_leaf, adv, old, epsilon=0.2), mask, kind, max_completion_length=t)
    kl = aggregate(reference_kl(our_leaf, ref, old, bias_correction=bias_correction), mask, kind, max_completion_length=t)
    ours = pg + beta * kl
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_leaf.grad, their_leaf.grad, rtol=1e-6, atol=1e-8)
