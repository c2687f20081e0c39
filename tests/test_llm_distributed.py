"""Two processes on CPU (torchrun, gloo) train the tiny recipe: replicas stay in sync and the loss of every
step equals a single-process run on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.tiny import build_tiny
from llm_helpers import tiny_recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc: int, tmp_path, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "llm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), *(["-m", "llm"] if script is None else [script]), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(out_dir):
    return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_gloo_run_matches_single_process(tmp_path):
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run-{nproc}"
        recipe = tiny_recipe(model_dir, out, training__steps=3, training__prompts_per_step=4, training__learning_rate=3e-3,
                             training__micro_batch_size=4,  # 6 completions per rank: two slices, DDP no_sync on the first
                             method__method="hybrid", method__teacher_kind="ema", method__teacher_rate=0.2)
        path = tmp_path / f"recipe-{nproc}.yaml"
        recipe.save(path)
        _run(["train", "--recipe", str(path)], nproc, tmp_path)
        runs[nproc] = out
    single, double = _rows(runs[1]), _rows(runs[2])
    assert len(single) == len(double) == 3
    for a, b in zip(single, double):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)  # the same completions were sampled
        assert a["response_length"] == b["response_length"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-7)
    summary = json.loads((runs[2] / "summary.json").read_text())
    assert summary["replica_max_abs_diff"] == 0.0  # every replica holds the same weights
    w1 = torch.load(runs[1] / "checkpoints" / "step-000003" / "rank-0.pt", weights_only=True)["model"]
    w2 = torch.load(runs[2] / "checkpoints" / "step-000003" / "rank-0.pt", weights_only=True)["model"]
    for name in w1:  # Adam turns float-order noise in tiny gradients into small moves: < 1% of one step (lr 3e-3)
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    moved = torch.load(runs[1] / "checkpoints" / "step-000003" / "rank-0.pt", weights_only=True)["teacher"]["weights"]
    assert any(not torch.equal(moved[n], w1[n]) for n in w1)  # sanity: the EMA teacher lags the student


@pytest.mark.slow
def test_fsdp2_sharded_student_with_ema_teacher_fused_loss_and_resume(tmp_path):
    """FSDP2 (two ranks, gloo): the EMA teacher lives in local shards, the fused loss reads the gathered LM head,
    checkpoints are per rank; the run equals a single-process run, and resuming equals not stopping."""
    from llm.trainer import Trainer

    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=2, seed=4)
    script = str(Path(__file__).with_name("fsdp2_cpu_run.py"))
    common = dict(training__prompts_per_step=4, training__learning_rate=3e-3, training__fused_loss=True,
                  training__save_every=2, method__teacher_kind="ema", method__teacher_rate=0.2)
    single = Trainer(tiny_recipe(model_dir, tmp_path / "single", training__steps=4, **common))
    single.train()
    for name, extra in (("sharded", []), ("split", ["--resume"])):
        path = tmp_path / f"{name}.yaml"
        tiny_recipe(model_dir, tmp_path / name, training__steps=4, **common).save(path)
        if extra:  # restart from the uninterrupted run's step-2 checkpoint, as if it had stopped there
            shutil.copytree(tmp_path / "sharded" / "checkpoints" / "step-000002", tmp_path / name / "checkpoints" / "step-000002")
            (tmp_path / name / "checkpoints" / "latest").write_text("step-000002\n")
        _run([str(path), *extra], 2, tmp_path, script=script)
    state = torch.load(tmp_path / "sharded" / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert state["sharded"] and (tmp_path / "sharded" / "checkpoints" / "step-000004" / "rank-1.pt").is_file()
    ref, sharded, split = (_rows(tmp_path / n) for n in ("single", "sharded", "split"))
    assert [r["step"] for r in sharded] == [1, 2, 3, 4] and [r["step"] for r in split] == [3, 4]
    for a, b, c in zip(ref, sharded, [None, None, *split]):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["response_length"] == b["response_length"]
        for key in ("loss", "divergence", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
            assert c is None or c[key] == b[key], key  # resumed == uninterrupted, exactly
    assert max(r["divergence"] for r in ref) > 1e-3  # the EMA teacher and the student did separate


@pytest.mark.slow
def test_ranks_with_and_without_a_shared_prefix_plan_do_not_hang(tmp_path):
    """Rank 0 runs each forward as two calls (shared prefix), rank 1 as one: DDP's per-forward buffer broadcast
    would pair unrelated collectives across the ranks and hang (seen: gloo timeout); the Trainer turns it off."""
    model_dir = build_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1, seed=2)
    path = tmp_path / "recipe.yaml"
    tiny_recipe(model_dir, tmp_path / "out").save(path)
    done = _run([str(path)], 2, tmp_path, script=str(Path(__file__).with_name("ddp_uneven_prefix_run.py")))
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("ok")) == ["ok 0", "ok 1"]
