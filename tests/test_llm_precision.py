"""Mixed precision (issue 15): a bfloat16 run keeps float32 master weights and computes in bfloat16, so AdamW's
small updates are kept; the teacher's copy is float32 and moves by exactly the rate it is given; a teacher forward
into half-precision parameters restores the student bit for bit. The float32 path is untouched (tests/test_golden.py)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm_helpers import EPS32, tiny_recipe

from llm.models import autocast, completion_outputs, teacher_outputs
from llm.teacher_weights import Teacher
from llm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LR, STEPS, RATE = 1e-6, 2, 0.01  # the measurement: 2 steps at lr 1e-6, EMA rate 0.01


def adam_step_bound(betas: tuple[float, float], t: int) -> float:
    """max |m̂_t/√v̂_t| over all gradient histories: AdamW moves a weight by at most lr times this at step t (plus
    weight decay). m̂ = Σ c_k g_k, v̂ = Σ d_k g_k² with c_k = (1−β1)β1^(t−k)/(1−β1^t), d_k = (1−β2)β2^(t−k)/(1−β2^t);
    Cauchy–Schwarz gives |Σ c_k g_k| ≤ √(Σ c_k²/d_k)·√(Σ d_k g_k²). t = 1: 1; t = 2 at (0.9, 0.999): 1.0014."""
    b1, b2 = betas
    c = [(1 - b1) * b1 ** (t - k) / (1 - b1 ** t) for k in range(1, t + 1)]
    d = [(1 - b2) * b2 ** (t - k) / (1 - b2 ** t) for k in range(1, t + 1)]
    return math.sqrt(sum(ci * ci / di for ci, di in zip(c, d)))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory) -> dict:
    """A float32 and a bfloat16 trainer on the same float32 checkpoint, each taking STEPS steps at lr 1e-6 on the
    same rollouts (sampled once by the float32 one: bfloat16 sampling may pick other tokens, whose embedding rows
    would then get gradients in one run only); weights before and after, and the teachers' copies."""
    root = tmp_path_factory.mktemp("precision")
    out: dict = {}
    batches = None
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(tiny_recipe(tiny_dir, root / dtype, model__dtype=dtype, training__learning_rate=LR,
                                      method__teacher_kind="ema", method__teacher_rate=RATE))
        if batches is None:
            batches = [trainer.rollout(s) for s in range(STEPS)]
        trainer.rollout = lambda step, b=batches: copy.deepcopy(b[step])
        dtypes: list = []
        hook = trainer.unwrapped.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        w0, t0, rows = weights(trainer), {n: w.clone() for n, w in trainer.teacher.weights.items()}, []
        updates = []
        update = trainer.teacher.update

        def checked_update(model, trainer=trainer, update=update, updates=updates):
            before = {n: w.clone() for n, w in trainer.teacher.weights.items()}
            update(model)
            updates.append((before, weights(trainer), {n: w.clone() for n, w in trainer.teacher.weights.items()}))

        trainer.teacher.update = checked_update
        for s in range(STEPS):
            rows.append(trainer.step(s))
        hook.remove()
        out[dtype] = {"trainer": trainer, "w0": w0, "w": weights(trainer), "t0": t0, "rows": rows,
                      "forward_dtypes": set(dtypes), "updates": updates}
    return out


def moved_fraction(before: dict, after: dict) -> float:
    return sum(int((after[n] != before[n]).sum()) for n in before) / sum(w.numel() for w in before.values())


def test_bfloat16_run_trains_float32_master_weights_with_bfloat16_forwards(runs):
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert bf16["trainer"].dtype == torch.bfloat16 and fp32["trainer"].dtype == torch.float32
    assert {p.dtype for p in bf16["trainer"].unwrapped.parameters()} == {torch.float32}  # master weights
    assert {w.dtype for w in bf16["trainer"].teacher.weights.values()} == {torch.float32}
    assert bf16["forward_dtypes"] == {torch.bfloat16}  # the loss's matmuls ran under bfloat16 autocast
    assert fp32["forward_dtypes"] == {torch.float32}  # and the float32 run's were not autocast
    sampled: list = []
    layer = bf16["trainer"].unwrapped.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, i, o: sampled.append(o.dtype))
    Trainer.rollout(bf16["trainer"], STEPS)  # generation too
    hook.remove()
    assert set(sampled) == {torch.bfloat16}
    for n in fp32["w0"]:  # the same float32 checkpoint loads exactly into both
        assert torch.equal(fp32["w0"][n], bf16["w0"][n]), n
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in bf16["rows"])


def test_bfloat16_run_keeps_every_update_the_float32_run_makes(runs):
    """Old behaviour (bfloat16 weights under plain AdamW): 2.2% of this model's weights moved, 99.99% in float32.
    With float32 master weights every entry the float32 run moves moves in the bfloat16 run too (a move of
    lr = 1e-6 is far above float32's half spacing |w|·2⁻²⁴ for |w| < 16); the converse may fail only where the
    float32 gradient is so small (|g| ≪ Adam's ε = 1e-8) that its move is below that spacing and bfloat16's
    rounding noise in g is not. The runs differ by at most two runs' worth of Adam moves."""
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    for n in fp32["w0"]:
        moved_32, moved_16 = fp32["w"][n] != fp32["w0"][n], bf16["w"][n] != bf16["w0"][n]
        assert not (moved_32 & ~moved_16).any(), n
    assert moved_fraction(bf16["w0"], bf16["w"]) >= moved_fraction(fp32["w0"], fp32["w"]) > 0.99
    t = fp32["trainer"].training
    betas = tuple(t.adam_betas)
    for n in fp32["w0"]:
        # each run moves a weight by ≤ lr·(Σ_t κ_t + steps·wd·|w|); the two runs by at most twice that
        w = fp32["w0"][n].abs().max().item()
        bound = 2 * LR * (sum(adam_step_bound(betas, s) for s in range(1, STEPS + 1)) + STEPS * t.weight_decay * w)
        assert (bf16["w"][n] - fp32["w"][n]).abs().max().item() <= bound * (1 + 1e-6), n
        # well inside bfloat16's resolution of the weights: the runs agree to it
        assert bound < 2.0 ** -9 * 2.0 ** -6  # half the bfloat16 spacing of any |w| ≥ 2⁻⁶


def lerp_bound(before: torch.Tensor, student: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_T + r·(θ − θ_T) in float64 and the float32 bound of a lerp on it: three roundings (θ − θ_T, r·(…), the sum)
    of at most eps/2 relative each: |error| ≤ eps·(|result| + r·|θ − θ_T|)."""
    t0, th = before.double(), student.double()
    want = t0 + rate * (th - t0)
    return want, EPS32 * (want.abs() + rate * (th - t0).abs())


def test_a_trainer_ema_update_moves_the_teacher_by_the_rate_to_float32_precision(runs):
    for dtype in ("float32", "bfloat16"):
        for before, student, after in runs[dtype]["updates"]:
            for n, w in after.items():
                want, bound = lerp_bound(before[n], student[n], RATE)
                assert ((w.double() - want).abs() <= bound).all(), (dtype, n)


class Tiny(torch.nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(64, 64, bias=True).to(dtype)
        self.b = torch.nn.Linear(64, 8, bias=False).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_((0.02 * torch.randn(p.shape, generator=g)).to(dtype))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def nudge(module: torch.nn.Module, fraction: float) -> None:
    """Move every parameter by ``fraction`` of its own size: θ ← θ·(1 + fraction)."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 + fraction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ema_copy_is_float32_and_moves_by_the_rate_where_a_bfloat16_copy_would_not(dtype):
    """Parameters of ``dtype`` (bfloat16: as DeepSpeed's bf16 partitions). A move of r·(θ − θ_T) with r = 0.01 and
    θ = 1.05·θ_T is 5e-4·|θ_T|: under bfloat16's half spacing (≥ |θ_T|·2⁻⁹ ≈ 2e-3·|θ_T|), so a bfloat16 copy keeps
    θ_T exactly, and far above float32's (≤ |θ_T|·2⁻²⁴), so the float32 copy moves everywhere, by the rate."""
    model = Tiny(dtype)
    teacher = Teacher("ema", RATE, model)
    assert {w.dtype for w in teacher.weights.values()} == {torch.float32}
    before = {n: w.clone() for n, w in teacher.weights.items()}
    nudge(model, 0.05)
    student = {n: p.detach().float() for n, p in model.named_parameters()}
    teacher.update(model)
    for n, w in teacher.weights.items():
        want, bound = lerp_bound(before[n], student[n], RATE)
        assert ((w.double() - want).abs() <= bound).all(), n
        assert bool((w != before[n]).all()), n
        as_bf16 = before[n].bfloat16()
        assert torch.equal(as_bf16.lerp(student[n].bfloat16(), RATE), as_bf16), n  # the old bfloat16 copy: lost


def test_a_teacher_forward_into_bfloat16_parameters_rounds_the_copy_in_and_restores_the_student_exactly():
    model = Tiny(torch.bfloat16)
    teacher = Teacher("frozen", 0.0, model)
    with torch.no_grad():
        for w in teacher.weights.values():
            w.add_(1e-4)  # a float32 copy that bfloat16 cannot hold exactly
    nudge(model, 0.05)
    student = {n: p.detach().clone() for n, p in model.named_parameters()}
    copies = {n: w.clone() for n, w in teacher.weights.items()}
    x = torch.randn(3, 64).bfloat16()
    with teacher.swapped_in(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, copies[n].bfloat16()), n
        inside = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, student[n]), n  # bit for bit: the student was kept aside, not rounded through the copy
        assert torch.equal(teacher.weights[n], copies[n]), n
    assert not torch.equal(inside, model(x))


def test_autocast_keeps_no_weight_cache_so_the_teacher_swap_is_seen():
    """torch.autocast's default cache keeps the first bfloat16 copy of each weight for the whole block: a teacher
    forward after a student forward would read the student's copy. The trainer's autocast has the cache off."""
    model = Tiny(torch.float32)
    teacher = Teacher("frozen", 0.0, model)
    nudge(model, 0.5)
    x = torch.randn(3, 64)

    def student_then_teacher(context):
        with context:
            student = model(x)
            with teacher.swapped_in(model), torch.no_grad():
                return student, model(x)

    student, cached = student_then_teacher(torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.equal(student, cached)  # the premise: the cached student weights served the teacher
    student, fresh = student_then_teacher(autocast("cpu", torch.bfloat16))
    assert not torch.equal(student, fresh)
    with teacher.swapped_in(model), torch.no_grad(), autocast("cpu", torch.bfloat16):
        assert torch.equal(fresh, model(x))
    assert isinstance(autocast("cpu", torch.float32), type(autocast("cpu", torch.float16)))  # both no-ops


def test_trust_region_mixes_its_two_bfloat16_teacher_outputs_in_float32(tiny_dir, tmp_path):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path / "run", model__dtype="bfloat16", method__teacher_kind="trust_region",
                                  method__teacher_rate=RATE, training__steps=1))
    batch, _ = trainer.rollout(0)
    nudge(trainer.unwrapped, 0.05)  # the live teacher now differs from the initial one
    T = batch.completion_ids.shape[1]
    with trainer.autocast():
        mixed, _ = teacher_outputs(trainer, batch.teacher_input_ids, batch.teacher_attention_mask, T)
        live = completion_outputs(trainer.model, batch.teacher_input_ids, batch.teacher_attention_mask, T, hidden=False)
        with trainer.teacher.swapped_in(trainer.unwrapped):
            initial = completion_outputs(trainer.model, batch.teacher_input_ids, batch.teacher_attention_mask, T, hidden=False)
    assert live.dtype == initial.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    want = (1 - RATE) * initial.double() + RATE * live.double()
    # two products and a sum in float32 of bfloat16 inputs: ≤ 2·eps·(|ℓ₀| + r·|ℓ|) off the exact mixture
    bound = 2 * EPS32 * ((1 - RATE) * initial.double().abs() + RATE * live.double().abs())
    assert ((mixed.double() - want).abs() <= bound).all()
    row = trainer.step(0)
    assert math.isfinite(row["loss"]) and math.isfinite(row["divergence"])


def test_lora_on_a_bfloat16_base_trains_its_float32_adapters_under_autocast(tiny_dir, tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path / "run", model__dtype="bfloat16", model__lora={"r": 2},
                                  training__steps=1))
    before = weights(trainer)
    assert {w.dtype for w in before.values()} == {torch.float32}
    assert {p.dtype for p in trainer.unwrapped.parameters() if not p.requires_grad} == {torch.bfloat16}
    trainer.step(0)
    assert any(not torch.equal(w, before[n]) for n, w in weights(trainer).items())


ACCELERATOR_MISMATCH = """
import sys
from accelerate import Accelerator
from llm.recipe import load_recipe
from llm.trainer import Trainer
try:
    Trainer(load_recipe(sys.argv[1]), accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
except ValueError as e:
    print(e)
"""


def test_an_unsharded_accelerator_with_its_own_mixed_precision_is_refused(tiny_dir, tmp_path):
    """Its autocast (weight cache on) would wrap the trainer's and go stale across the teacher swap; and it converts
    every output, all hidden states of the fused forward included, to float32. Own process: accelerate's state is
    one per process, and the other tests' accelerators say mixed_precision 'no'."""
    recipe = tmp_path / "recipe.yaml"
    tiny_recipe(tiny_dir, tmp_path / "run", model__dtype="bfloat16").save(recipe)
    done = subprocess.run([sys.executable, "-c", ACCELERATOR_MISMATCH, str(recipe)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model.dtype resolves to bfloat16 but the accelerator (distributed_type NO) has mixed_precision='bf16'; it must be 'no'" in done.stdout
