"""Two processes on CPU (torchrun, gloo) train the tiny recipe: replicas stay in sync, and a single-process run
on the same global batch that follows their weights computes the same gradient and loss at every update.
In bfloat16 (DDP, FSDP2, DeepSpeed ZeRO-3) the EMA teacher's copy is float32 and moves by exactly its rate."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm_helpers import (
    EPS32,
    assert_grads_close,
    batch_positions,
    follow_updates,
    kept_grads,
    metric_tolerance,
    metrics_rows,
    tiny_recipe,
)

from llm.tiny import build_tiny
from llm.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, args, tmp_path, **extra_env: str) -> None:
    """``torchrun`` two ranks of the harness ``script`` (a file next to this one); they report through files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).with_name(script)), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def _follow_and_compare(recipe, kept, leader_rows) -> list[dict]:
    """Train ``recipe`` in this process following the weights the two-rank run kept in ``kept``; assert the
    same samples, metrics and gradients at every update (all at identical weights); return this run's rows."""
    single = Trainer(recipe)
    grads = follow_updates(single, kept)
    rows = single.train()
    completions = recipe.training.prompts_per_step * recipe.method.num_generations
    tol = metric_tolerance(single)
    assert len(rows) == len(leader_rows) == recipe.training.steps
    for a, b in zip(rows, leader_rows):
        # rewards in [0, 1]: float32 sums over the ranks err by ≲ completions·eps; a different sample moves them far more
        assert a["reward"] == pytest.approx(b["reward"], rel=0, abs=completions * EPS32)
        assert a["response_length"] == b["response_length"]
        for key in ("loss", "divergence", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=0, abs=tol), key
    assert_grads_close(kept_grads(kept), grads, batch_positions(recipe))
    return rows


@pytest.mark.slow
def test_two_process_gloo_run_matches_single_process(tmp_path):
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    common = dict(training__steps=3, training__prompts_per_step=4, training__learning_rate=3e-3,
                  training__micro_batch_size=4,  # 6 completions per rank: two slices, DDP no_sync on the first
                  method__name="hybrid", method__teacher_kind="ema", method__teacher_rate=0.2)
    tiny_recipe(model_dir, tmp_path / "ddp", **common).save(tmp_path / "ddp.yaml")
    _run("ddp_cpu_run.py", [str(tmp_path / "ddp.yaml"), str(tmp_path / "kept")], tmp_path)
    # the comparison is of gradients at identical weights: Adam turns float-order noise in near-zero gradients
    # into moves of a fraction of a step, so weights after a few steps depend on the CPU's kernels
    _follow_and_compare(tiny_recipe(model_dir, tmp_path / "single", **common), tmp_path / "kept", metrics_rows(tmp_path / "ddp"))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["replica_max_abs_diff"] == 0.0  # every replica holds the same weights
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-000003" / "rank-0.pt", weights_only=True)
    assert any(not torch.equal(state["teacher"]["weights"][n], state["model"][n]) for n in state["model"])  # the EMA teacher lags


@pytest.mark.slow
def test_fsdp2_sharded_student_with_ema_teacher_fused_loss_and_resume(tmp_path):
    """FSDP2 (two ranks, gloo): the EMA teacher lives in local shards, the fused loss reads the gathered LM head,
    checkpoints are per rank; a single-process run following its weights computes the same (gathered)
    gradients and metrics, and resuming equals not stopping."""
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=2, seed=4)
    common = dict(training__steps=4, training__prompts_per_step=4, training__learning_rate=3e-3, training__fused_loss=True,
                  training__save_every=2, method__teacher_kind="ema", method__teacher_rate=0.2)
    for name, extra in (("sharded", ["--keep", str(tmp_path / "kept")]), ("split", ["--resume"])):
        path = tmp_path / f"{name}.yaml"
        tiny_recipe(model_dir, tmp_path / name, **common).save(path)
        if name == "split":  # restart from the uninterrupted run's step-2 checkpoint, as if it had stopped there
            shutil.copytree(tmp_path / "sharded" / "checkpoints" / "step-000002", tmp_path / name / "checkpoints" / "step-000002")
            (tmp_path / name / "checkpoints" / "latest").write_text("step-000002\n")
        _run("fsdp2_cpu_run.py", [str(path), *extra], tmp_path)
    state = torch.load(tmp_path / "sharded" / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert state["sharded"] and (tmp_path / "sharded" / "checkpoints" / "step-000004" / "rank-1.pt").is_file()
    sharded, split = metrics_rows(tmp_path / "sharded"), metrics_rows(tmp_path / "split")
    ref = _follow_and_compare(tiny_recipe(model_dir, tmp_path / "single", **common), tmp_path / "kept", sharded)
    assert [r["step"] for r in sharded] == [1, 2, 3, 4] and [r["step"] for r in split] == [3, 4]
    for b, c in zip(sharded[2:], split):
        for key in ("loss", "divergence", "entropy"):
            assert c[key] == b[key], key  # resumed == uninterrupted, exactly (same ranks, same arithmetic)
    assert max(r["divergence"] for r in ref) > 1e-3  # the EMA teacher and the student did separate


@pytest.mark.slow
def test_ranks_with_and_without_a_shared_prefix_plan_do_not_hang(tmp_path):
    """Rank 0 runs each forward as two calls (shared prefix), rank 1 as one: DDP's per-forward buffer broadcast
    would pair unrelated collectives across the ranks and hang (seen: gloo timeout); the Trainer turns it off."""
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    path = tmp_path / "recipe.yaml"
    tiny_recipe(model_dir, tmp_path / "out").save(path)
    _run("ddp_uneven_prefix_run.py", [str(path), str(tmp_path)], tmp_path)
    # each rank reports through its own file: two ranks printing to one pipe interleave ("ok 1ok 0")
    assert [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)] == ["ok 0\n", "ok 1\n"]


# ----------------------------------------------------------------------------- bfloat16: the teacher's float32 copy
RATE = 0.01  # official SDPO's EMA rate with rich feedback: r·(θ − θ_T) is far below bfloat16's spacing of θ_T


def ema_errors(before: dict, student: dict, after: dict) -> tuple[float, float, float]:
    """For ``θ_T' = lerp(θ_T, θ, r)`` in float32: the largest error over its bound, eps·(|θ_T'| + r·|θ − θ_T|) (three
    roundings of ≤ eps/2 relative: θ − θ_T, r·(…), the sum); the fraction of entries that moved; and the fraction a
    bfloat16 copy would have moved (the code before issue 15)."""
    worst, moved, moved16, total = 0.0, 0, 0, 0
    for n, w in after.items():
        t0, th = before[n].double(), student[n].double()
        want = t0 + RATE * (th - t0)
        bound = EPS32 * (want.abs() + RATE * (th - t0).abs())
        worst = max(worst, float(((w.double() - want).abs() / bound.clamp(min=1e-30)).max()))
        moved, total = moved + int((w != before[n]).sum()), total + w.numel()
        as_bf16 = before[n].bfloat16()
        moved16 += int((as_bf16.lerp(student[n].bfloat16(), RATE) != as_bf16).sum())
    return worst, moved / total, moved16 / total


def assert_teacher_moved_by_the_rate(run: Path, files: list[str]) -> None:
    """Between the step-1 and step-2 checkpoints each rank's teacher copy (float32, like its master weights)
    moved by r·(θ − θ_T) to float32 precision, almost everywhere; a bfloat16 copy would have lost most of it."""
    for name in files:
        one, two = (torch.load(run / "checkpoints" / f"step-00000{k}" / name, weights_only=True) for k in (1, 2))
        before, after, student = one["teacher"]["weights"], two["teacher"]["weights"], two["model"]
        assert {w.dtype for w in after.values()} == {t.dtype for t in student.values()} == {torch.float32}
        worst, moved, moved16 = ema_errors(before, student, after)
        assert worst <= 1.0, name
        assert moved > 0.99 and moved16 < 0.5, (name, moved, moved16)


def bf16_recipe(model_dir: Path, out: Path, **extra):
    return tiny_recipe(model_dir, out, **{"model__dtype": "bfloat16", "training__save_every": 1, "method__teacher_kind": "ema",
                                          "method__teacher_rate": RATE, **extra})


@pytest.mark.slow
def test_bfloat16_ddp_keeps_float32_replicas_and_a_float32_teacher(tmp_path):
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    bf16_recipe(model_dir, tmp_path / "ddp").save(tmp_path / "ddp.yaml")
    _run("ddp_cpu_run.py", [str(tmp_path / "ddp.yaml"), str(tmp_path / "kept")], tmp_path)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["replica_max_abs_diff"] == 0.0
    assert_teacher_moved_by_the_rate(tmp_path / "ddp", ["rank-0.pt"])


@pytest.mark.slow
def test_bfloat16_fsdp2_shards_float32_master_weights_with_a_float32_teacher(tmp_path):
    """accelerate's mixed_precision: bf16 under FSDP2: float32 shards, gathered in bfloat16 for the forwards (the
    harness builds the same MixedPrecisionPolicy); the teacher's copy lives in float32 local shards."""
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=2, seed=4)
    bf16_recipe(model_dir, tmp_path / "fsdp", training__fused_loss=True).save(tmp_path / "fsdp.yaml")
    _run("fsdp2_cpu_run.py", [str(tmp_path / "fsdp.yaml")], tmp_path)
    assert all(math.isfinite(r["loss"]) for r in metrics_rows(tmp_path / "fsdp"))
    assert_teacher_moved_by_the_rate(tmp_path / "fsdp", ["rank-0.pt", "rank-1.pt"])


@pytest.mark.slow
def test_bfloat16_deepspeed_zero3_teacher_copy_is_float32_and_moves_by_the_rate(tmp_path):
    """ZeRO-3 through accelerate on CPU (DS_ACCELERATOR=cpu, gloo), as llm/accelerate/deepspeed_zero3.yaml: the
    engine holds bfloat16 partitions and float32 master partitions; the teacher copies the master, moves by the
    rate at every update, and a teacher forward reads exactly the copy rounded to bfloat16 and gives the student
    back bit for bit. Two micro-batches per rank: the engine accumulates them and steps once per update."""
    pytest.importorskip("deepspeed")
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    bf16_recipe(model_dir, tmp_path / "ds", training__micro_batch_size=2).save(tmp_path / "ds.yaml")
    _run("deepspeed_cpu_run.py", [str(tmp_path / "ds.yaml"), str(tmp_path)], tmp_path, DS_ACCELERATOR="cpu")
    rows = metrics_rows(tmp_path / "ds")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (tmp_path / "ds" / "final-model" / "config.json").is_file()
    for rank in (0, 1):  # per-rank checkpoint files hold the float32 teacher partitions (the engine holds the rest)
        state = torch.load(tmp_path / "ds" / "checkpoints" / "step-000002" / f"rank-{rank}.pt", weights_only=True)
        assert {w.dtype for w in state["teacher"]["weights"].values()} == {torch.float32}
    for rank in (0, 1):
        log = json.loads((tmp_path / f"teacher-{rank}.json").read_text())
        assert log["dtypes"] == {"partition": "torch.bfloat16", "copy": ["torch.float32"], "master": "torch.float32",
                                 "persistent": 0}  # no parameter stays gathered outside the partitions the teacher swaps
        assert log["engine_steps"] == 2  # one engine step per update, not one per micro-batch
        assert len(log["updates"]) == 2 and len(log["swaps"]) >= 2
        for u in log["updates"]:
            assert u["worst_over_bound"] <= 1.0 and u["moved"] > 0.99 and u["moved_if_bf16"] < 0.5, u
        for sw in log["swaps"]:
            assert sw == {"teacher_vs_params": 0.0, "student_restored": True}
