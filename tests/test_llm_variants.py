"""Issue 16's variants in the LLM trainer (docs/variants.md): on a fixed batch of the tiny model the trainer's loss
equals the shared core functions' value on the same logits (the toy world's composition, sdpo_sim/train.py), fused
and unfused; a short run with each variant trains and logs finite metrics. The reference-policy terms (ref_beta,
use_bias_correction_kl, ref_anchor): the reference is the initial weights read from disk, their gradient is the
equation's, the reference log-probabilities are the initial policy's at step 0 (KL 0), full fine-tuning and LoRA both
train, and no reference copy exists when the terms are off (or when the teacher's copy already holds θ_0)."""

from __future__ import annotations

import math

import pytest
import torch
from llm_helpers import EPS32, assert_grads_close, batch_positions, metric_tolerance, metrics_rows, tiny_recipe
from test_llm_distributed import _follow_and_compare, _run
from transformers import AutoModelForCausalLM

from llm.losses import token_logprobs
from llm.memory_plan import format_plan, memory_plan
from llm.models import completion_outputs, teacher_outputs
from llm.recipe import LLM_UNWIRED_VARIANTS
from llm.rollout import completion_variants
from llm.teacher_weights import make_teacher
from llm.tiny import build_tiny
from llm.trainer import Trainer
from sdpo_sim.core.losses import (
    advantage_blend_token_loss,
    aggregate,
    hybrid_loss,
    policy_gradient_token_loss,
    reference_anchor,
    reference_kl,
    routed_token_loss,
    sdpo_token_loss,
    token_entropy,
)
from sdpo_sim.core.method import VARIANT_FIELDS, MethodConfig

# B = prompts_per_step · num_generations = 2 · 3 completions; groups [0.9, 0.1, 0.5] and [0.2, 0.2, 0.95]: with
# context.success_threshold 0.8 rows 0 and 5 succeed (p_g = 1/3 in both groups), the gate opens rows 0 and 5
SCORES = [0.9, 0.1, 0.5, 0.2, 0.2, 0.95]
DISTILL = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # row 2 has no teacher: a failed completion without one gets no loss under srpo
STEP = 1  # of training.steps = 2: warm-up 2 gives 1/2, decay 3 gives (2 − 1)/3

VARIANTS = [
    {"method__distill_loss": "forward_ce", "method__alpha": 0.0},
    {"method__distill_loss": "forward_ce", "method__alpha": 0.0, "method__support": "topk", "method__topk": 5,
     "method__loss_type": "sequence_mean"},
    {"method__distill_gate": "positive_advantage", "method__distill_prompt_weight": "success_std",
     "method__distill_warmup_steps": 2, "method__distill_decay_steps": 3},
    {"method__distill_token_weight": "teacher_confidence", "method__loss_type": "sequence_mean"},
    {"method__name": "hybrid", "method__distill_prompt_weight": "success_std", "method__loss_type": "dr_grpo"},
    {"method__name": "blend", "method__blend_lambda": 0.7, "method__distill_gate": "positive_advantage"},
    {"method__name": "blend", "method__support": "sampled", "method__loss_type": "dr_grpo",
     "method__distill_token_weight": "teacher_confidence"},
    {"method__name": "srpo", "method__distill_token_weight": "teacher_confidence"},
    {"method__name": "srpo", "method__support": "topk", "method__topk": 5, "method__loss_type": "sequence_mean",
     "method__distill_warmup_steps": 2},
    # the reference-policy terms (docs/variants.md §4, §6): π_ref the initial weights (the model on disk)
    {"method__ref_beta": 0.5},
    {"method__name": "grpo", "method__ref_beta": 0.5, "method__use_bias_correction_kl": False, "method__loss_type": "sequence_mean"},
    {"method__name": "hybrid", "method__ref_anchor": 0.2, "method__ref_beta": 0.1, "method__loss_type": "dr_grpo"},
    {"method__name": "blend", "method__ref_anchor": 0.2, "method__distill_gate": "positive_advantage"},
]


def _ids(overrides: dict) -> str:
    return ",".join(f"{k.split('__')[1]}={v}" for k, v in overrides.items())


def _peaked_trainer(tiny_dir, out_dir, **overrides) -> Trainer:
    """A trainer whose frozen teacher and student differ, on a model far from uniform: the tiny model's initial
    logits are near uniform (every teacher entropy ≈ ln V, so teacher_confidence's weights would all be ≈ 1); its
    weights moved by 0.3·N(0, 1) give entropies of about 2.9 of ln V = 4.6 nats and confidence weights in [0.4, 5]
    on the fixed batch. The teacher is then frozen there and the student moved by 0.05·N(0, 1) more."""
    trainer = Trainer(tiny_recipe(tiny_dir, out_dir, method__teacher_kind="frozen", **overrides))
    torch.manual_seed(0)
    for scale in (0.3, 0.05):
        with torch.no_grad():
            for p in trainer.unwrapped.parameters():
                p.add_(scale * torch.randn_like(p))
        if scale == 0.3:
            trainer.teacher = make_teacher("frozen", trainer.method.teacher_rate, trainer.unwrapped)
    return trainer


def _fixed_batch(trainer):
    """A rollout of the tiny model with the test's scores, teacher rows and per-completion quantities in place of
    the judge's (the per-completion quantities from the rollout's own helper, :func:`completion_variants`)."""
    m = trainer.method
    batch, _ = trainer.rollout(0)
    batch.distill_mask = torch.tensor(DISTILL)
    batch.judged = torch.ones(len(SCORES))
    batch.advantages = m.advantages(torch.tensor(SCORES))
    success, weight = completion_variants(m, SCORES, [True] * len(SCORES), trainer.recipe.context.success_threshold,
                                          STEP, trainer.training.steps)
    batch.success, batch.distill_weight = success, weight
    return batch


def _initial_logp(trainer, batch) -> torch.Tensor:
    """``log π_0(y_t)`` ``[B, T]`` of ``batch``'s completions under the model as saved on disk (the initial weights), over
    the temperature: a second model object, independent of the trainer's reference machinery."""
    model = AutoModelForCausalLM.from_pretrained(trainer.recipe.model.path)
    with torch.no_grad():
        out = completion_outputs(model, batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1], hidden=False)
    return token_logprobs(out / trainer.method.temperature, batch.completion_ids)


def _core_loss(trainer, batch, m: MethodConfig) -> tuple[float, float]:
    """The loss of method ``m`` as the toy world's loop composes it from the core functions (sdpo_sim/train.py
    ``update_loss``), on the trainer's unfused student and teacher logits ``[B, T, V]`` of ``batch``, plus the
    reference terms on the initial model's log-probabilities; and the largest magnitude of a per-token term it
    aggregates (for the tolerance)."""
    total, size = _core_method_loss(trainer, batch, m)
    if not m.uses_reference:
        return total, size
    s = completion_outputs(trainer.model, batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1],
                           hidden=False, share_prefix=False).detach() / m.temperature
    logp, ref, comp = token_logprobs(s, batch.completion_ids), _initial_logp(trainer, batch), batch.completion_mask
    max_len = trainer.training.max_new_tokens
    kl = reference_kl(logp, ref, bias_correction=m.use_bias_correction_kl)
    anchor = reference_anchor(logp, ref)
    total += m.ref_beta * float(aggregate(kl, comp, m.loss_type, max_len)) + m.ref_anchor * float(aggregate(anchor, comp, m.loss_type, max_len))
    return total, max(size, float((m.ref_beta * kl * comp).abs().max()), float((m.ref_anchor * anchor * comp).abs().max()))


def _core_method_loss(trainer, batch, m: MethodConfig) -> tuple[float, float]:
    """:func:`_core_loss` without the reference terms."""
    T, max_len = batch.completion_ids.shape[1], trainer.training.max_new_tokens
    fused, trainer.fused = trainer.fused, False
    with torch.no_grad():
        s = completion_outputs(trainer.model, batch.input_ids, batch.attention_mask, T, hidden=False, share_prefix=False) / m.temperature
        t = teacher_outputs(trainer, batch.teacher_input_ids, batch.teacher_attention_mask, T)[0]
    trainer.fused = fused
    ids, comp = batch.completion_ids, batch.completion_mask
    logp = torch.log_softmax(s.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    scores, success = torch.tensor(SCORES), torch.tensor(SCORES) >= trainer.recipe.context.success_threshold
    d_mask = comp * batch.distill_mask.unsqueeze(-1)
    carried = d_mask * (~success).float().unsqueeze(-1) if m.name == "srpo" else d_mask
    w = m.distill_weights(scores=scores, mask=carried, success=success, step=STEP, total_steps=trainer.training.steps,
                          teacher_entropy=token_entropy(t))
    sd_tok = sdpo_token_loss(s, t, alpha=m.alpha, support=m.support, topk=m.topk, add_tail=m.add_tail, tokens=ids,
                             objective=m.distill_loss)
    sd_tok = sd_tok if w is None else sd_tok * w
    adv = m.advantages(scores)
    pg_tok = policy_gradient_token_loss(logp, adv)
    size = float(max((sd_tok * d_mask).abs().max(), (pg_tok * comp).abs().max()))
    if m.name == "sdpo":
        return float(aggregate(sd_tok, d_mask, m.loss_type, max_len)), size
    if m.name in ("grpo", "reinforce"):
        return float(aggregate(pg_tok, comp, m.loss_type, max_len)), size
    if m.name == "hybrid":
        pg = aggregate(pg_tok, comp, m.loss_type, max_len)
        return float(hybrid_loss(aggregate(sd_tok, d_mask, m.loss_type, max_len), pg, m.alpha_mix)), size
    if m.name == "blend":
        if m.support == "sampled":
            signal = torch.log_softmax(t.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logp
            tok = advantage_blend_token_loss(logp, adv, m.blend_lambda, distill_mask=d_mask,
                                             signal=signal if w is None else signal * w)
        else:
            tok = advantage_blend_token_loss(logp, adv, m.blend_lambda, distill_mask=d_mask, distill_tok=sd_tok)
        return float(aggregate(tok, comp, m.loss_type, max_len)), max(size, float((tok * comp).abs().max()))
    tok, routed = routed_token_loss(pg_tok, sd_tok, success, d_mask, comp)
    return float(aggregate(tok, routed, m.loss_type, max_len)), size


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("overrides", VARIANTS, ids=[_ids(o) for o in VARIANTS])
def test_the_trainer_loss_equals_the_core_functions_on_the_same_logits(tiny_dir, tmp_path, overrides, fused):
    trainer = _peaked_trainer(tiny_dir, tmp_path, training__fused_loss=fused, **overrides)
    batch = _fixed_batch(trainer)
    with torch.no_grad():
        loss, _ = trainer.compute_loss(batch)
    m = trainer.method
    expected, size = _core_loss(trainer, batch, m)
    plain = m.replace(**{f: MethodConfig().to_dict()[f] for f in VARIANT_FIELDS if f != "blend_lambda"})
    # Both sides add the same per-token terms in different float32 orders (chunks, the teacher on fewer rows, the
    # fused path's log-sum-exp per chunk, a part-by-part aggregation) from logits that differ by float32 rounding:
    # a mean of n terms of magnitude ≤ S errs by ≤ n·eps·S on each side (Higham), n = completions·max_new_tokens,
    # S = the largest per-token term (weights included) or ln V (each term's own rounding, logits of size ≤ ln V).
    t = trainer.training
    tol = 2 * t.prompts_per_step * m.num_generations * t.max_new_tokens * EPS32 * max(size, math.log(batch_vocab(trainer)))
    assert abs(expected) > 10 * tol, "the fixed batch must have a loss clearly away from 0"
    assert abs(expected - _core_loss(trainer, batch, plain)[0]) > 10 * tol, "the variant must change the loss"
    assert float(loss) == pytest.approx(expected, rel=0, abs=tol)


def batch_vocab(trainer) -> int:
    return trainer.unwrapped.get_output_embeddings().weight.shape[0]


def test_the_rollout_fills_the_gate_success_and_schedule(tiny_dir, tmp_path):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, method__name="srpo", method__distill_gate="positive_advantage",
                                  method__distill_decay_steps=4))
    batch, _ = trainer.rollout(0)
    # the gate is GRPO's A_i > 0 (scale group); the schedule at step 0 of 2 with decay 4 is (2 − 0)/4
    assert torch.equal(batch.distill_weight, 0.5 * (batch.advantages > 0).float())
    assert batch.success.dtype == torch.bool and batch.success.shape == batch.advantages.shape
    sdpo, _ = Trainer(tiny_recipe(tiny_dir, tmp_path / "sdpo")).rollout(0)
    assert sdpo.success is None and sdpo.distill_weight is None  # the default path carries nothing new


@pytest.mark.parametrize("overrides", [
    {"method__name": "blend", "method__distill_token_weight": "teacher_confidence", "training__micro_batch_size": 4},
    {"method__name": "srpo", "method__distill_loss": "forward_ce", "method__alpha": 0.0, "training__fused_loss": True},
    {"method__distill_gate": "positive_advantage", "method__distill_warmup_steps": 1, "training__updates_per_batch": 2},
], ids=["blend-confidence-micro", "srpo-forward_ce-fused", "sdpo-gate-warmup-reuse"])
def test_a_short_run_with_a_variant_trains_and_logs_finite_metrics(tiny_dir, tmp_path, overrides):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, **overrides))
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    rows = trainer.train()
    assert len(rows) == 2
    for r in rows:
        for key in ("loss", "reward", "entropy", "divergence", "grad_norm"):
            assert math.isfinite(r[key]), key
    assert any(not torch.equal(before[n], p) for n, p in trainer.unwrapped.named_parameters())


def test_micro_batches_and_the_global_confidence_mean_give_the_whole_batch_loss(tiny_dir, tmp_path):
    """teacher_confidence's mean runs over the whole batch: split into micro-batches (whose groups are cut apart,
    B = 6 in parts of 4 and 2), the parts' losses under the step's counts sum to the whole batch's loss."""
    trainer = _peaked_trainer(tiny_dir, tmp_path, method__name="srpo", method__distill_token_weight="teacher_confidence",
                              method__distill_gate="positive_advantage")
    batch = _fixed_batch(trainer)
    counts, parts = trainer._counts(batch), batch.split(4)
    with torch.no_grad():
        whole = float(trainer.compute_loss(batch, dict(counts))[0])
        stats = [trainer.compute_loss(p, counts)[1] for p in parts]
        counts["confidence_mean"] = sum(s["confidence_sum"] for s in stats) / sum(s["confidence_tokens"] for s in stats)
        split = sum(float(trainer.compute_loss(p, counts)[0]) for p in parts)
    tol = 4 * metric_tolerance(trainer)  # the same terms in another float32 order (above), with weights ≤ 4 (≤ 5 ≈ 4 once
    # the routed mask's larger normaliser is in), so 4· the per-token size metric_tolerance assumes
    assert abs(whole) > 10 * tol and split == pytest.approx(whole, rel=0, abs=tol)


# ----------------------------------------------------------------------------- the reference-policy terms
LORA = {"r": 4, "alpha": 8}


def _moved(trainer, scale: float, only_lora: bool = False) -> None:
    """Move the trainable weights by ``scale``·N(0, 1) (LoRA: the adapters only, so the base, π_ref, stays θ_0)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in trainer.unwrapped.named_parameters():
            if p.requires_grad and (not only_lora or "lora_" in n):
                p.add_(scale * torch.randn_like(p))


def _grads(trainer, batch) -> dict:
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.compute_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


# (recipe overrides, the per-token coefficient c_t of ∇log π_θ(y_t) in the gradient of the term, docs/variants.md)
REF_GRADIENTS = [
    ({"method__name": "grpo", "method__ref_beta": 0.7},  # k3·ρ on-policy: d/dl = l − r (the reverse KL's)
     lambda m, l, r: m.ref_beta * (l - r)),
    ({"method__name": "grpo", "method__ref_beta": 0.7, "method__use_bias_correction_kl": False, "method__loss_type": "sequence_mean"},
     lambda m, l, r: m.ref_beta * (1 - torch.exp(r - l))),  # plain k3: d/dl = 1 − π_ref/π_θ (the forward KL's)
    ({"method__ref_anchor": 0.3, "method__loss_type": "dr_grpo", "training__fused_loss": True},  # ½(l − r)²: d/dl = l − r
     lambda m, l, r: m.ref_anchor * (l - r)),
    ({"method__name": "grpo", "method__ref_beta": 0.7, "method__ref_anchor": 0.3, "model__lora": LORA},
     lambda m, l, r: (m.ref_beta + m.ref_anchor) * (l - r)),
]


@pytest.mark.parametrize("overrides, coef", REF_GRADIENTS, ids=["kl-corrected", "kl-plain", "anchor-fused", "both-lora"])
def test_the_reference_terms_gradient_is_the_equations(tiny_dir, tmp_path, overrides, coef):
    """The trainer's gradient of a loss made of the reference terms alone (grpo with zero advantages, or sdpo without
    a teacher row: the other terms are exactly 0) equals ``∇ aggregate(stopgrad(c_t)·log π_θ(y_t))`` with ``c_t`` the
    derivative the equation gives, ``log π_ref`` from the model on disk."""
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, **overrides))
    lora = "model__lora" in overrides
    _moved(trainer, 0.3, only_lora=lora)  # LoRA's B starts at 0: moving the adapters makes π_θ ≠ π_ref
    m, batch = trainer.method, trainer.rollout(0)[0]
    batch.advantages, batch.judged = torch.zeros_like(batch.advantages), torch.ones_like(batch.judged)
    batch.distill_mask = torch.zeros_like(batch.distill_mask)
    got = _grads(trainer, batch)
    T, comp = batch.completion_ids.shape[1], batch.completion_mask
    s = completion_outputs(trainer.model, batch.input_ids, batch.attention_mask, T, hidden=False) / m.temperature
    logp, ref = token_logprobs(s, batch.completion_ids), _initial_logp(trainer, batch)
    assert float(((logp.detach() - ref) * comp).abs().max()) > 0.1, "π_θ must differ from π_ref on the batch"
    surrogate = aggregate(coef(m, logp.detach(), ref).detach() * logp, comp, m.loss_type, trainer.training.max_new_tokens)
    trainer.optimizer.zero_grad(set_to_none=True)
    surrogate.backward()
    want = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None}
    assert not lora or all("lora_" in n for n in want)
    # the same per-position terms summed in two float32 orders (the k3 term's autograd vs the closed form c_t, the
    # fused path's chunks): assert_grads_close's atol positions·eps·max|g| (Higham's bound on a float32 sum)
    assert_grads_close([got], [want], batch_positions(trainer.recipe))


@pytest.mark.parametrize("overrides", [
    {"method__ref_beta": 0.5},  # ema teacher: the reference's own frozen copy
    {"method__ref_beta": 0.5, "method__teacher_kind": "frozen", "training__fused_loss": True},  # the teacher's copy
    {"method__name": "grpo", "method__ref_anchor": 0.5, "model__lora": LORA},  # the base without adapters
    {"method__ref_beta": 0.5, "model__lora": LORA, "training__fused_loss": True, "training__micro_batch_size": 4},
], ids=["full-ema", "full-frozen-fused", "lora-grpo", "lora-fused-micro"])
def test_the_reference_is_the_initial_policy_at_step_0(tiny_dir, tmp_path, overrides):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, **overrides))
    batch = trainer.rollout(0)[0]
    T = batch.completion_ids.shape[1]
    ref = trainer.reference_logprobs(batch)
    head = trainer.unwrapped.get_output_embeddings().weight if trainer.fused else None
    with torch.no_grad():
        own = token_logprobs(completion_outputs(trainer.model, batch.input_ids, batch.attention_mask, T, hidden=trainer.fused,
                                                share_prefix=trainer.share_prefix) / trainer.method.temperature,
                             batch.completion_ids, head)
    comp = batch.completion_mask.bool()
    # the same forward on the same weights (LoRA: the adapters add B·A·x = 0 while B = 0): equal up to one rounding
    # of a log-probability of size ≤ ln V at most, eps·ln V (observed: bit for bit)
    tol = EPS32 * math.log(batch_vocab(trainer))
    assert float((ref - own)[comp].abs().max()) <= tol
    assert float((ref - _initial_logp(trainer, batch))[comp].abs().max()) <= 1e-5  # the model on disk: another object,
    # another forward (fused: chunked LM-head matmuls), ~T·H·eps for these sizes
    row = trainer.train()[0]  # one update per batch: the first row's kl is measured at the initial weights
    assert 0.0 <= row["kl"] <= tol  # k3 ≥ 0; a mean of values ≤ eps·ln V
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])


@pytest.mark.parametrize("overrides", [
    {"method__ref_beta": 0.5, "training__updates_per_batch": 2},
    {"method__name": "hybrid", "method__ref_beta": 0.5, "method__use_bias_correction_kl": False, "training__micro_batch_size": 4},
    {"method__ref_anchor": 1.0, "training__fused_loss": True},
    {"method__name": "grpo", "method__ref_beta": 0.5, "model__lora": LORA},
    {"method__ref_beta": 0.5, "method__use_bias_correction_kl": False, "model__lora": LORA, "training__updates_per_batch": 2},
    {"method__name": "blend", "method__ref_anchor": 1.0, "model__lora": LORA, "training__fused_loss": True},
], ids=["full-kl-reuse", "full-hybrid-plain-kl-micro", "full-anchor-fused", "lora-grpo-kl", "lora-plain-kl-reuse", "lora-blend-anchor"])
def test_a_short_run_with_a_reference_term_trains(tiny_dir, tmp_path, overrides):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, training__learning_rate=3e-2, **overrides))
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    rows = trainer.train()
    assert len(rows) == 2
    for r in rows:
        for key in ("loss", "reward", "entropy", "grad_norm", "kl"):
            assert math.isfinite(r[key]), key
    assert rows[1]["kl"] > 0  # the policy has moved from π_ref by the second step
    assert any(not torch.equal(before[n], p) for n, p in trainer.unwrapped.named_parameters() if p.requires_grad)


def test_no_reference_copy_exists_unless_a_reference_term_is_on(tiny_dir, tmp_path):
    off = Trainer(tiny_recipe(tiny_dir, tmp_path / "off", method__use_bias_correction_kl=False))  # no coefficient: off
    assert off.reference is None and not off.method.uses_reference
    batch = off.rollout(0)[0]
    assert batch.ref_logp is None and "kl" not in off.train()[0]
    own = Trainer(tiny_recipe(tiny_dir, tmp_path / "ema", method__ref_beta=0.1))  # ema teacher: a frozen copy of θ_0
    assert own.reference.owns_copy and set(own.reference.copy.weights) == {n for n, p in own.unwrapped.named_parameters()}
    shared = Trainer(tiny_recipe(tiny_dir, tmp_path / "frozen", method__ref_beta=0.1, method__teacher_kind="frozen"))
    assert shared.reference.copy is shared.teacher and not shared.reference.owns_copy  # θ_0 already held by the teacher
    lora = Trainer(tiny_recipe(tiny_dir, tmp_path / "lora", method__ref_anchor=0.1, model__lora=LORA))
    assert lora.reference.copy is None and not lora.reference.owns_copy  # peft's disable_adapter(): no copy
    # the memory plan counts the reference's copy exactly when the trainer makes one
    for trainer, copies in ((off, 0), (own, 1), (shared, 0), (lora, 0)):
        plan = memory_plan(trainer.recipe, gpus_per_node=1, gpu_memory_gb=80, strategy="single", device="cpu")
        assert plan["reference_gb"] == pytest.approx(copies * plan["teacher_gb"], rel=1e-12)
        assert ("reference_forward" in plan["phases"]) == trainer.method.uses_reference  # its no-gradient forward
        assert ("\n    reference  " in format_plan(plan)) == bool(copies)  # a held line only for a copy
    assert LLM_UNWIRED_VARIANTS == ()  # nothing of docs/variants.md is refused any more


@pytest.mark.slow
def test_two_processes_with_routing_confidence_and_gate_match_a_single_process(tmp_path):
    """The global normalisers (srpo's routed tokens, teacher_confidence's mean over both ranks' carried tokens):
    a two-rank gloo run (micro-batches of 4 of each rank's 6 completions, cutting a group) computes the gradient and
    loss of a single process on the same global batch at every update (the harness of test_llm_distributed)."""
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # far from uniform, so the confidence weights differ between ranks (see _peaked_trainer)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(model_dir)
    common = dict(training__steps=2, training__prompts_per_step=4, training__learning_rate=3e-3, training__micro_batch_size=4,
                  method__name="srpo", method__distill_token_weight="teacher_confidence",
                  method__distill_gate="positive_advantage", method__teacher_kind="ema", method__teacher_rate=0.2)
    tiny_recipe(model_dir, tmp_path / "ddp", **common).save(tmp_path / "ddp.yaml")
    _run("ddp_cpu_run.py", [str(tmp_path / "ddp.yaml"), str(tmp_path / "kept")], tmp_path)
    _follow_and_compare(tiny_recipe(model_dir, tmp_path / "single", **common), tmp_path / "kept", metrics_rows(tmp_path / "ddp"))


@pytest.mark.slow
def test_fsdp2_reference_terms_match_a_single_process(tmp_path):
    """The reference's frozen copy in FSDP2 local shards (an ema teacher beside it, so two copies) and the fused path's
    LM head read while θ_0 is swapped in: a two-rank FSDP2 run computes the gradients, loss and ``kl`` of a single
    process following its weights (the harness of test_llm_distributed)."""
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=2, seed=4)
    common = dict(training__steps=2, training__prompts_per_step=4, training__learning_rate=3e-2, training__fused_loss=True,
                  method__teacher_kind="ema", method__teacher_rate=0.2, method__ref_beta=0.5, method__ref_anchor=0.2,
                  training__feedback_credit_every=0)  # see docs/variants.md: the credit's reshard before the backward
    tiny_recipe(model_dir, tmp_path / "sharded", **common).save(tmp_path / "sharded.yaml")
    _run("fsdp2_cpu_run.py", [str(tmp_path / "sharded.yaml"), "--keep", str(tmp_path / "kept")], tmp_path)
    sharded = metrics_rows(tmp_path / "sharded")
    recipe = tiny_recipe(model_dir, tmp_path / "single", **common)
    single = _follow_and_compare(recipe, tmp_path / "kept", sharded)
    # kl is a per-token mean like the entropy: metric_tolerance's n·eps·ln V (n = completions·max_new_tokens, Higham)
    t, vocab = recipe.training, AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    tol = t.prompts_per_step * recipe.method.num_generations * t.max_new_tokens * EPS32 * math.log(vocab)
    assert sharded[0]["kl"] == pytest.approx(0.0, abs=tol) and sharded[1]["kl"] > 10 * tol  # θ_0 at the first update
    for a, b in zip(single, sharded):
        assert a["kl"] == pytest.approx(b["kl"], rel=0, abs=tol)
