"""Our LLM trainer's SDPO loss and gradient equal TRL's SDPOTrainer on a fixed tiny model (float64).

TRL's own ``SDPOTrainer._compute_teacher_student_logits`` (its student/teacher forwards and alignment)
and ``_compute_self_distillation_loss`` (mode dispatch, IS clipping, masking, per-sequence mean) run
unchanged, bound to a minimal host object that supplies only the attributes those two methods read, so
no dataset, generation or reward plumbing is involved. Ours is ``llm.trainer``'s ``completion_outputs``
+ ``sdpo_loss`` (unfused and fused), as used by ``Trainer.compute_loss``.

Differences on purpose, avoided here and stated: TRL gives every row positions ``0..L−1`` while we
derive positions from the attention mask, so the two agree only without left padding (prompts and
teacher contexts here have equal lengths); TRL always averages per sequence (our ``sequence_mean``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from types import SimpleNamespace

import pytest
import torch

try:
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer
    from trl.trainer.utils import selective_log_softmax
except ImportError as err:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise ImportError("trl is required under CI=true: install the `peers` extra (./lab test does)") from err
    pytest.skip(f"trl not installed ({err}); install the `peers` extra", allow_module_level=True)

from llm.tiny import build_char_tokenizer, build_tiny_model
from llm.losses import sdpo_loss
from llm.models import completion_outputs
from sdpo_sim.core.method import MethodConfig
from sdpo_sim.core.losses import truncated_importance_weight

pytestmark = pytest.mark.peers
B, P, C, T = 4, 5, 9, 6  # completions, prompt length, teacher-context length, completion length
TEMPERATURE = 0.7


class _TRLHost:
    """Just what SDPOTrainer's two loss methods read from ``self``."""

    _forward_logits = SDPOTrainer._forward_logits
    _compute_teacher_student_logits = SDPOTrainer._compute_teacher_student_logits
    _compute_self_distillation_loss = SDPOTrainer._compute_self_distillation_loss

    def __init__(self, model, **distillation):
        self.args = SimpleNamespace(**distillation)
        self.temperature = TEMPERATURE
        self.model_kwarg_keys = inspect.signature(model.forward).parameters.keys()
        self.accelerator = SimpleNamespace(gather=lambda x: x)

    def _get_teacher_context_for_self_distillation(self):
        return contextlib.nullcontext()  # live teacher: the same weights

    def _log_self_distillation_metric(self, mode, value):
        pass


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=3).double()
    g = torch.Generator().manual_seed(0)
    vocab = len(tok)
    prompt = torch.randint(4, vocab, (B, P), generator=g)
    context = torch.randint(4, vocab, (B, C), generator=g)
    completion = torch.randint(4, vocab, (B, T), generator=g)
    completion_mask = torch.ones(B, T)
    completion_mask[1, 4:] = 0  # right padding of a shorter completion
    completion_mask[3, 2:] = 0
    completion[completion_mask == 0] = tok.pad_token_id
    distill = torch.tensor([1.0, 1.0, 0.0, 1.0])  # row 2 has no teacher context: no distillation loss
    inputs = {
        "prompt_ids": prompt, "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": completion, "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([context, completion], 1),
        "teacher_attention_mask": torch.cat([torch.ones(B, C, dtype=torch.long), completion_mask.long()], 1),
        "self_distillation_mask": distill,
    }
    with torch.no_grad():
        logits = completion_outputs(model, torch.cat([prompt, completion], 1),
                                    torch.cat([inputs["prompt_mask"], completion_mask.long()], 1), T, hidden=False)
        old = selective_log_softmax(logits / TEMPERATURE, completion)
    old = old + 0.8 * torch.randn(B, T, generator=g, dtype=old.dtype)  # stale rollouts: ratios beyond the clip
    return model, inputs, old


def _trl_loss_and_grads(model, inputs, **distillation):
    host = _TRLHost(model, **distillation)
    model.zero_grad()
    logits = host._compute_teacher_student_logits(model, model, inputs)
    loss = host._compute_self_distillation_loss(model, inputs, logits)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _our_loss_and_grads(model, inputs, method: MethodConfig, *, fused: bool, old=None, is_clip=None):
    model.zero_grad()
    s_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    s_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"].long()], 1)
    with torch.no_grad():
        teacher = completion_outputs(model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], T, hidden=fused)
    student = completion_outputs(model, s_ids, s_mask, T, hidden=fused)
    student, teacher = student / TEMPERATURE, teacher / TEMPERATURE
    head = model.get_output_embeddings().weight if fused else None
    token_weights = None
    if old is not None:
        logits = student @ head.T if fused else student
        logp = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
        token_weights = truncated_importance_weight(logp, old, is_clip)
    mask = inputs["completion_mask"] * inputs["self_distillation_mask"].unsqueeze(-1)
    loss = sdpo_loss(student, teacher, inputs["completion_ids"], mask, method, max_len=T, weight=head,
                     token_weights=token_weights, chunk_size=5)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


MODES = [  # (TRL distillation_mode, alpha, topk, add_tail) — every mode both implementations support
    ("full_logits", 0.0, None, False), ("full_logits", 0.5, None, False), ("full_logits", 1.0, None, False),
    ("topk_logits", 0.5, 7, True), ("topk_logits", 1.0, 7, False), ("sampled_token", 1.0, None, False),
]
SUPPORT = {"full_logits": "full", "topk_logits": "topk", "sampled_token": "sampled"}


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("mode,alpha,topk,tail", MODES)
def test_sdpo_loss_and_gradient_equal_trl_sdpo_trainer(setup, mode, alpha, topk, tail, fused):
    model, inputs, _ = setup
    theirs, their_grads = _trl_loss_and_grads(
        model, inputs, distillation_mode=mode, distillation_alpha=alpha, distillation_topk=topk,
        distillation_add_tail=tail, distillation_is_clip=None,
    )
    method = MethodConfig(name="sdpo", alpha=alpha, support=SUPPORT[mode], topk=topk, add_tail=tail,
                          loss_type="sequence_mean")
    ours, our_grads = _our_loss_and_grads(model, inputs, method, fused=fused)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    assert set(our_grads) == set(their_grads)
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-7, atol=1e-11, msg=name)
    assert theirs.abs() > 0 and sum(float(g.abs().sum()) for g in their_grads.values()) > 0


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_importance_clipped_loss_equals_trl_sdpo_trainer(setup, fused):
    model, inputs, old = setup
    theirs, their_grads = _trl_loss_and_grads(
        model, {**inputs, "old_per_token_logps": old}, distillation_mode="topk_logits", distillation_alpha=0.5,
        distillation_topk=7, distillation_add_tail=True, distillation_is_clip=2.0,
    )
    method = MethodConfig(name="sdpo", alpha=0.5, support="topk", topk=7, add_tail=True, loss_type="sequence_mean")
    ours, our_grads = _our_loss_and_grads(model, inputs, method, fused=fused, old=old, is_clip=2.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-7, atol=1e-11, msg=name)
