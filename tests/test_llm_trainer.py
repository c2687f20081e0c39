"""The trainer on a locally built tiny model: fused == unfused, resume == uninterrupted, a raising judge,
non-finite losses, every method and teacher kind, the teacher's weight bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from llm.tasks import get_task
from llm.teacher_weights import Teacher
from llm.trainer import Batch, NonFiniteLossError, Trainer
from llm_helpers import assert_grads_close, batch_positions, follow_updates, keep_updates, kept_grads, metric_tolerance, metrics_rows, tiny_recipe


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}


def _loss_and_grads(trainer, batch, fused: bool, counts=None):
    trainer.fused = fused
    loss, _ = trainer.compute_loss(batch, counts)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("overrides", [
    {"method__support": "full", "method__loss_type": "token_mean"},
    {"method__support": "topk", "method__topk": 7, "method__loss_type": "sequence_mean", "method__teacher_kind": "live"},
    {"method__name": "hybrid", "method__support": "sampled", "method__loss_type": "dr_grpo", "method__teacher_kind": "frozen"},
])
def test_fused_loss_equals_unfused_inside_the_trainer(tiny_dir, tmp_path, overrides):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, **overrides))
    trainer.optimizer.step = lambda: None  # noqa: E731 — only gradients are compared
    trainer.step(0)  # move the student away from the teacher so the loss is not zero
    with torch.no_grad():  # and make student and teacher differ clearly
        for p in trainer.unwrapped.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch, info = trainer.rollout(1)
    assert info["distilled"] > 0
    loss_u, grads_u = _loss_and_grads(trainer, batch, fused=False)
    loss_f, grads_f = _loss_and_grads(trainer, batch, fused=True)
    tol = metric_tolerance(trainer)  # float32 accumulation order: see llm_helpers
    assert abs(loss_u) > 10 * tol and loss_f == pytest.approx(loss_u, rel=0, abs=tol)
    assert_grads_close([grads_f], [grads_u], batch.input_ids.numel())


@pytest.mark.parametrize("overrides", [
    {"method__name": "hybrid", "method__controller": "divergence", "method__loss_type": "sequence_mean"},
    {"method__name": "sdpo", "training__fused_loss": True, "training__updates_per_batch": 2},
])
def test_micro_batches_give_the_whole_batch_update(tiny_dir, tmp_path, overrides):
    """The gradient accumulated over micro-batches equals the whole batch's, at every update: the two trainers
    run in lock-step from identical weights (the micro-batched one takes the whole-batch one's weights after
    each update), so the comparison never passes through Adam, which turns float-order noise in near-zero
    gradients into moves of a fraction of a step."""
    whole, micro = (Trainer(tiny_recipe(tiny_dir, tmp_path / str(size), training__micro_batch_size=size,
                                        training__learning_rate=3e-3, method__teacher_rate=0.2, **overrides))
                    for size in (0, 2))
    keep_updates(whole, tmp_path / "kept")
    grads_micro = follow_updates(micro, tmp_path / "kept")
    rows = [(whole.step(s), micro.step(s)) for s in range(whole.training.steps)]
    tol = metric_tolerance(whole)
    for a, b in rows:
        assert b["reward"] == a["reward"] and b["response_length"] == a["response_length"]  # the same samples
        for key in ("loss", "divergence", "entropy", "alpha_mix", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=0, abs=tol), key
    assert len(grads_micro) == whole.training.steps * whole.training.updates_per_batch
    assert_grads_close(grads_micro, kept_grads(tmp_path / "kept"), batch_positions(whole.recipe))


def _rows(out_dir):
    """The logged rows without their wall time."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(out_dir)]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_dir, tmp_path):
    common = dict(training__steps=4, training__save_every=2, method__name="hybrid", method__controller="entropy",
                  method__entropy_target=4.0, method__teacher_kind="ema", method__teacher_rate=0.2, training__learning_rate=3e-3)
    straight = Trainer(tiny_recipe(tiny_dir, tmp_path / "straight", **common))
    straight.train()
    first = Trainer(tiny_recipe(tiny_dir, tmp_path / "split", **{**common, "training__steps": 2}))
    first.train()
    resumed = Trainer(tiny_recipe(tiny_dir, tmp_path / "split", **common))
    resumed.train(resume=True)
    assert resumed.start_step == 2
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    for n, w in straight.teacher.weights.items():
        assert torch.equal(w, resumed.teacher.weights[n])
    assert _rows(tmp_path / "straight") == _rows(tmp_path / "split")
    assert any(not torch.equal(a[n], p) for n, p in _params(Trainer(tiny_recipe(tiny_dir, tmp_path / "fresh"))).items())
    state = torch.load(tmp_path / "split" / "checkpoints" / "step-000004" / "rank-0.pt", weights_only=True)
    assert {"model", "optimizer", "teacher", "rng"} <= set(state)


def test_a_raising_judge_costs_only_that_sample_its_feedback(tiny_dir, tmp_path, caplog):
    task = get_task("word-constraints")
    calls = {"n": 0}

    def flaky(prompt, completion):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("judge service timed out")
        return task.judge(prompt, completion)

    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, training__steps=2, method__name="hybrid"), judge=flaky)
    batch, info = trainer.rollout(0)
    failed = batch.judged == 0
    assert info["judge_failures"] == int(failed.sum()) == 2
    assert "judge service timed out" in caplog.text
    ok = [s for s, f in zip(info["texts"], failed.tolist()) if not f]
    assert len(ok) == info["completions"] - 2 and torch.isfinite(batch.advantages).all()
    rows = trainer.train()
    assert len(rows) == 2 and all(r["judge_failures"] >= 1 for r in rows) and all(math.isfinite(r["loss"]) for r in rows)


def test_failed_judge_gets_no_feedback_context(tiny_dir, tmp_path):
    def never(prompt, completion):
        raise ValueError("no verdict")

    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, method__name="sdpo"), judge=never)
    batch, info = trainer.rollout(0)
    assert info["judge_failures"] == info["completions"]
    assert float(batch.distill_mask.sum()) == 0  # no feedback and no successful sibling: no distillation loss
    loss, _ = trainer.compute_loss(batch)
    assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("fused", [False, True])
def test_the_teacher_reads_only_the_rows_with_a_context(tiny_dir, tmp_path, fused):
    """Rows without a teacher context get no distillation loss, so the teacher forward skips them: same loss
    and gradients as the distilled rows alone (under the whole batch's normaliser), and no teacher forward
    at all when no row has a context."""
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, method__name="sdpo", method__loss_type="sequence_mean",
                                  training__fused_loss=fused))
    with torch.no_grad():
        for p in trainer.unwrapped.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch, _ = trainer.rollout(0)
    batch.distill_mask = torch.tensor([1.0, 0.0] * (batch.distill_mask.numel() // 2))
    rows = batch.distill_mask.nonzero().squeeze(-1)
    teacher_rows = []
    hook = trainer.unwrapped.register_forward_pre_hook(
        lambda m, args, kwargs: teacher_rows.append(kwargs["input_ids"].shape[0]) if not torch.is_grad_enabled() else None,
        with_kwargs=True)
    trainer.share_prefix = False  # one teacher call, so its batch size is the number of rows it read
    counts = trainer._counts(batch)  # the whole batch's normaliser, for the distilled rows alone below
    loss, grads = _loss_and_grads(trainer, batch, fused)
    assert teacher_rows == [rows.numel()]
    alone = Batch(**{f: None if getattr(batch, f) is None else getattr(batch, f)[rows] for f in Batch.__dataclass_fields__})
    loss_ref, grads_ref = _loss_and_grads(trainer, alone, fused, counts)
    tol = metric_tolerance(trainer)  # float32 accumulation order: see llm_helpers
    assert abs(loss) > 10 * tol and loss == pytest.approx(loss_ref, rel=0, abs=tol)
    assert_grads_close([grads], [grads_ref], batch.input_ids.numel())
    teacher_rows.clear()
    batch.distill_mask = torch.zeros_like(batch.distill_mask)
    loss, _ = trainer.compute_loss(batch)
    hook.remove()
    assert teacher_rows == [] and float(loss.detach()) == 0.0


def test_nonfinite_loss_is_skipped_counted_and_stops_the_run(tiny_dir, tmp_path):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path / "skip", training__steps=3))
    real = trainer.compute_loss
    calls = {"n": 0}

    def once_nan(batch, *args):
        loss, stats = real(batch, *args)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] == 1 else (loss, stats)

    trainer.compute_loss = once_nan
    before = _params(trainer)
    trainer.step(0)
    assert trainer.nonfinite_steps == 1 and all(torch.equal(before[n], p) for n, p in _params(trainer).items())
    metrics = trainer.step(1)
    assert metrics["nonfinite_steps"] == 1 and trainer.nonfinite_run == 0
    assert any(not torch.equal(before[n], p) for n, p in _params(trainer).items())

    stuck = Trainer(tiny_recipe(tiny_dir, tmp_path / "stop", training__steps=10, training__max_consecutive_nonfinite=2))
    real_stuck = stuck.compute_loss
    stuck.compute_loss = lambda *args: (lambda ls: (ls[0] * float("inf"), ls[1]))(real_stuck(*args))
    with pytest.raises(NonFiniteLossError, match="max_consecutive_nonfinite=2"):
        stuck.train()
    assert (tmp_path / "stop" / "checkpoints" / "step-000002" / "state.pt").is_file()
    rows = _rows(tmp_path / "stop")
    assert [r["nonfinite_steps"] for r in rows] == [1, 2]


@pytest.mark.parametrize("overrides", [
    {"method__name": "grpo"},
    {"method__name": "reinforce", "method__num_generations": 1},
    {"method__name": "hybrid", "method__controller": "divergence", "method__teacher_kind": "trust_region"},
    {"method__name": "sdpo", "task__feedback": "none", "training__updates_per_batch": 2, "training__heatmap_every": 1},
    {"method__name": "sdpo", "model__lora": {"r": 4, "alpha": 8}, "training__fused_loss": True, "training__learning_rate": 1e-2},
])
def test_every_method_and_teacher_kind_trains(tiny_dir, tmp_path, overrides):
    trainer = Trainer(tiny_recipe(tiny_dir, tmp_path, **overrides))
    before = _params(trainer)
    rows = trainer.train()
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 for r in rows)
    assert any(not torch.equal(before[n], p) for n, p in _params(trainer).items())
    method = trainer.method.name
    assert all(math.isnan(r["divergence"]) for r in rows) == (method in ("grpo", "reinforce"))
    if method == "hybrid":
        assert all(0 <= r["alpha_mix"] <= 1 for r in rows)
    if "model__lora" in overrides:  # only the adapters train, and only they have a teacher copy
        assert trainer.teacher.names and all("lora_" in n for n in trainer.teacher.names)
        assert (tmp_path / "final-model" / "adapter_config.json").is_file()
    else:
        assert (tmp_path / "final-model" / "config.json").is_file()
    if overrides.get("training__heatmap_every") and any(r["distill_fraction"] > 0 for r in rows):
        assert list((tmp_path / "heatmaps").glob("*.html"))


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_dir, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="vllm.*not installed"):
        Trainer(tiny_recipe(tiny_dir, tmp_path, generation__backend="vllm"))


def test_teacher_kinds_bookkeeping():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = Teacher("ema", 0.25, model)
    frozen = Teacher("frozen", 0.25, model)
    region = Teacher("trust_region", 0.25, model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.weights["weight"], start["weight"] + 0.25)  # θ_T ← θ_T + r·(θ − θ_T)
    frozen.update(model)
    assert torch.equal(frozen.weights["weight"], start["weight"])
    x = torch.randn(4, 3)
    (c, out), = frozen.outputs(model, lambda: model(x))
    torch.testing.assert_close(out, x @ start["weight"].T + start["bias"])
    assert torch.equal(model.weight, start["weight"] + 1.0)  # swapped back
    terms = region.outputs(model, lambda: model(x))
    assert [c for c, _ in terms] == [0.75, 0.25]
    torch.testing.assert_close(terms[1][1], model(x))
    with pytest.raises(ValueError, match="teacher kind"):
        Teacher("oracle", 0.1, model)


@pytest.mark.parametrize("fused", [False, True])
def test_feedback_credit_is_the_distillation_signal_for_a_live_teacher(tiny_dir, tmp_path, fused):
    """A live teacher has no lag, so the feedback credit (the teacher with its context vs the same weights without
    it, an extra forward) must equal the distillation signal (teacher with context vs the student) to float32
    accumulation: the two come from different forwards of the same weights on different row selections."""
    recipe = tiny_recipe(tiny_dir, tmp_path, method__teacher_kind="live", training__feedback_credit_every=1,
                         training__fused_loss=fused, training__steps=1)
    trainer = Trainer(recipe)
    row = trainer.step(0)
    tol = metric_tolerance(trainer)
    assert math.isfinite(row["feedback_credit"]) and math.isfinite(row["distillation_signal"])
    assert abs(row["feedback_credit"] - row["distillation_signal"]) <= tol and abs(row["teacher_lag"]) <= tol, row


def test_a_frozen_teacher_lags_and_the_lag_is_the_signal_minus_the_credit(tiny_dir, tmp_path):
    recipe = tiny_recipe(tiny_dir, tmp_path, method__teacher_kind="frozen", training__feedback_credit_every=1,
                         training__learning_rate=3e-2, training__steps=2)
    trainer = Trainer(recipe)
    first, second = trainer.step(0), trainer.step(1)
    tol = metric_tolerance(trainer)
    assert abs(first["teacher_lag"]) <= tol  # before any update the frozen teacher is the student
    assert abs(second["teacher_lag"]) > 10 * tol, second  # after one: the distillation signal carries the lag
    assert second["teacher_lag"] == pytest.approx(second["distillation_signal"] - second["feedback_credit"])


def test_feedback_credit_is_measured_only_when_asked_and_only_for_distilling_methods(tiny_dir, tmp_path):
    off = Trainer(tiny_recipe(tiny_dir, tmp_path / "off", training__steps=1, training__feedback_credit_every=0)).step(0)
    assert math.isnan(off["feedback_credit"]) and math.isfinite(off["distillation_signal"])
    every2 = Trainer(tiny_recipe(tiny_dir, tmp_path / "two", training__steps=2, training__feedback_credit_every=2))
    assert math.isfinite(every2.step(0)["feedback_credit"]) and math.isnan(every2.step(1)["feedback_credit"])
    grpo = Trainer(tiny_recipe(tiny_dir, tmp_path / "grpo", method__name="grpo", training__steps=1, training__feedback_credit_every=1)).step(0)
    assert all(math.isnan(grpo[k]) for k in ("feedback_credit", "distillation_signal", "teacher_lag"))
