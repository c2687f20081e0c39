"""``sdpo-llm make-tiny`` builds atomically and records how; ``train`` warns on a random-weight tiny model,
refuses float16 full fine-tuning without sharding (bfloat16 keeps float32 master weights), and says how to resume
when interrupted."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm.make_tiny as make_tiny
from llm.cli import main as cli_main
from llm.make_tiny import main
from llm.recipe import load_recipe, resolve_recipe_path
from llm.tiny import (
    build_char_tokenizer,
    build_tiny,
    build_tiny_model,
    read_metadata,
    save_pretrained_dir,
)
from llm.trainer import Trainer, check_trainable_precision

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
SMALL = ["--hidden-size", "8", "--num-layers", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Two make-tiny builds: 2 pretraining steps, and 0 (random weights)."""
    root = tmp_path_factory.mktemp("built")
    assert main(["--out", str(root / "pre"), *SMALL, "--pretrain-steps", "2", "--seed", "3"]) == 0
    assert main(["--out", str(root / "raw"), *SMALL, "--pretrain-steps", "0"]) == 0
    return {"pre": root / "pre", "raw": root / "raw"}


def recipe_on(model: Path, out: Path, **overrides):
    base = {"model.path": str(model), "training.output_dir": str(out), "training.steps": 2, "training.prompts_per_step": 2,
            "training.max_new_tokens": 4, "training.save_every": 0, "training.heatmap_every": 0,
            "method.num_generations": 2, "context.max_context_tokens": 120}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_recipe(resolve_recipe_path("tiny-cpu"), base)


# ----------------------------------------------------------------------------- the build record
def test_the_build_record_says_how_the_model_was_made(built):
    meta = read_metadata(built["pre"])
    assert meta["pretrain_steps"] == 2 and meta["seed"] == 3 and meta["task"] == "word-constraints"
    assert (meta["hidden_size"], meta["num_layers"], meta["num_heads"], meta["num_kv_heads"]) == (8, 1, 4, 2)
    assert meta["version"] == importlib.metadata.version("sdpo-lab") and math.isfinite(meta["final_pretrain_loss"])
    assert read_metadata(built["raw"])["pretrain_steps"] == 0 and read_metadata(built["raw"])["final_pretrain_loss"] is None
    assert sorted(p.name for p in built["pre"].parent.iterdir()) == ["pre", "raw"]  # no temporary directory left


def test_the_saved_weights_are_the_pretrained_ones(built):
    """The random initialisation of the same seed differs from what was saved: pretraining happened before saving."""
    saved = transformers.AutoModelForCausalLM.from_pretrained(built["pre"]).model.embed_tokens.weight
    fresh = build_tiny_model(build_char_tokenizer(), hidden_size=8, num_layers=1, seed=3).model.embed_tokens.weight
    assert saved.shape == fresh.shape and not torch.equal(saved, fresh)
    raw = transformers.AutoModelForCausalLM.from_pretrained(built["raw"]).model.embed_tokens.weight
    seed0 = build_tiny_model(build_char_tokenizer(), hidden_size=8, num_layers=1, seed=0).model.embed_tokens.weight
    assert torch.equal(raw, seed0)  # 0 steps: exactly the random weights


# ----------------------------------------------------------------------------- atomic: nothing half-made
def test_interrupted_pretraining_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(make_tiny, "pretrain", interrupted)
    out = tmp_path / "new" / "deeper" / "m"
    assert main(["--out", str(out), *SMALL, "--pretrain-steps", "5"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sdpo-llm make-tiny: interrupted; nothing was written to {out}"]
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_the_previous_model_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m"
    assert main(["--out", str(out), *SMALL, "--pretrain-steps", "0"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def save_then_interrupt(model, tokenizer, path):
        save_pretrained_dir(model, tokenizer, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(make_tiny, "save_pretrained_dir", save_then_interrupt)
    assert main(["--out", str(out), *SMALL, "--pretrain-steps", "1", "--overwrite"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    capsys.readouterr()


def test_overwrite_replaces_a_model_and_an_empty_directory_is_used(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()  # an empty directory is a fine target
    assert main(["--out", str(out), *SMALL, "--pretrain-steps", "0"]) == 0
    assert main(["--out", str(out), *SMALL, "--pretrain-steps", "0"]) == 2  # refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--out", str(out), *SMALL, "--pretrain-steps", "1", "--overwrite"]) == 0
    assert read_metadata(out)["pretrain_steps"] == 1 and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_sigint_to_a_real_build_exits_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    with open(tmp_path.parent / f"{tmp_path.name}.stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llm", "make-tiny", "--out", str(out), *SMALL, "--pretrain-steps", "100000"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()  # printed just before the model is built and pretrained
            assert "pretraining 100000 steps" in line
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        text = err.read()
    assert "Traceback" not in text
    assert text.replace("\r", "\n").strip().splitlines()[-1] == f"sdpo-llm make-tiny: interrupted; nothing was written to {out}"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- train reads the record
def test_train_warns_on_a_tiny_model_with_zero_pretraining_steps(built, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="llm.trainer"):
        Trainer(recipe_on(built["raw"], tmp_path / "raw-run"))
    untrained = [r for r in caplog.records if "0 pretraining steps (random weights)" in r.getMessage()]
    assert len(untrained) == 1 and "\n" not in untrained[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="llm.trainer"):
        Trainer(recipe_on(built["pre"], tmp_path / "pre-run"))
    assert not [r for r in caplog.records if "pretraining steps" in r.getMessage()]


# ----------------------------------------------------------------------------- half precision (tests/test_llm_precision.py)
def test_bfloat16_adamw_loses_a_small_update():
    """Why bfloat16 runs keep float32 master weights. Adam's first step moves each weight by lr·m̂/(√v̂+ε) = lr·sign(g)
    = 1e-5. A weight of 0.02 lies in [2⁻⁶, 2⁻⁵), where bfloat16's 8 significant bits space values 2⁻⁶·2⁻⁷ ≈ 1.2e-4
    apart: a move of 1e-5 (< half a spacing) rounds back to 0.02. float32 spaces them 2⁻⁶·2⁻²³ ≈ 1.9e-9 apart:
    every weight moves."""
    changed = {}
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.nn.Parameter(torch.full((1000,), 0.02, dtype=dtype))
        start = w.detach().clone()
        w.grad = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
        torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0).step()
        changed[dtype] = float((w.detach() != start).float().mean())
    assert changed[torch.bfloat16] == 0.0 and changed[torch.float32] == 1.0


def test_a_float16_recipe_is_refused_before_any_weight_loads(built, tmp_path, monkeypatch):
    """float16 needs loss scaling, which the plain trainer does not do (bfloat16 trains with float32 master weights)."""
    def no_loading(recipe, **kwargs):
        raise AssertionError("weights were loaded before the dtype was checked")

    monkeypatch.setattr("llm.trainer.load_model_and_tokenizer", no_loading)
    with pytest.raises(ValueError, match="model.dtype='float16' would train float16 weights without loss scaling.*"
                                         "set model.dtype: bfloat16 .*float32 master weights"):
        Trainer(recipe_on(built["pre"], tmp_path / "run", model__dtype="float16"))
    assert not (tmp_path / "run").exists()


def test_a_bfloat16_recipe_loads_float32_master_weights(built, tmp_path):
    trainer = Trainer(recipe_on(built["pre"], tmp_path / "run", model__dtype="bfloat16"))
    assert trainer.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.unwrapped.parameters()} == {torch.float32}


def test_auto_dtype_resolves_to_the_saved_config_before_loading(tmp_path, monkeypatch):
    tokenizer = build_char_tokenizer()
    for half in (torch.bfloat16, torch.float16):
        save_pretrained_dir(build_tiny_model(tokenizer, hidden_size=8, num_layers=1).to(half), tokenizer, tmp_path / str(half))
    trainer = Trainer(recipe_on(tmp_path / str(torch.bfloat16), tmp_path / "run", model__dtype="auto"))
    assert trainer.dtype == torch.bfloat16  # a bfloat16 run: float32 master weights, read exactly from bfloat16
    assert {p.dtype for p in trainer.unwrapped.parameters()} == {torch.float32}
    fp32 = build_tiny(tmp_path / "fp32", hidden_size=8, num_layers=1)
    trainer = Trainer(recipe_on(fp32, tmp_path / "run32", model__dtype="auto"))  # auto → float32 trains as before
    assert trainer.dtype == torch.float32 and {p.dtype for p in trainer.unwrapped.parameters()} == {torch.float32}

    def no_loading(recipe, **kwargs):
        raise AssertionError("weights were loaded before the dtype was checked")

    monkeypatch.setattr("llm.trainer.load_model_and_tokenizer", no_loading)
    with pytest.raises(ValueError, match=r"model.dtype='auto' \(resolved to float16\)"):
        Trainer(recipe_on(tmp_path / str(torch.float16), tmp_path / "run16", model__dtype="auto"))


def test_lora_on_a_bfloat16_model_trains_float32_adapters_over_a_frozen_bfloat16_base(built, tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(recipe_on(built["pre"], tmp_path / "run", model__dtype="bfloat16", model__lora={"r": 2}))
    trainable = {p.dtype for p in trainer.unwrapped.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.unwrapped.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_only_unsharded_float16_full_fine_tuning_is_refused(built, tmp_path):
    for dtype in ("bfloat16", "float32"):
        for kind in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"):
            check_trainable_precision(recipe_on(built["pre"], tmp_path / "run", model__dtype=dtype), kind)  # no error
    half = recipe_on(built["pre"], tmp_path / "run", model__dtype="float16")
    for sharded in ("FSDP", "DEEPSPEED"):  # accelerate's FSDP2 grad scaler, DeepSpeed's loss scaler
        check_trainable_precision(half, sharded)
    check_trainable_precision(recipe_on(built["pre"], tmp_path / "run", model__dtype="float16", model__lora={"r": 2}), "NO")
    for plain in ("NO", "MULTI_GPU", "MULTI_CPU"):
        with pytest.raises(ValueError, match="without loss scaling"):
            check_trainable_precision(half, plain)


# ----------------------------------------------------------------------------- Ctrl-C during train
@pytest.mark.parametrize("save_every", [1, 0])
def test_ctrl_c_during_train_says_where_it_stopped_and_how_to_resume(save_every, built, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_on(built["pre"], out, training__steps=3, training__save_every=save_every).to_yaml())
    real_step = Trainer.step

    def interrupted_at_the_second_step(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted_at_the_second_step)
    assert cli_main(["train", "--recipe", str(recipe)]) == 130
    err = capsys.readouterr().err
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sdpo-llm train:")]
    assert "Traceback" not in err and len(ours) == 1 and err.replace("\r", "\n").strip().splitlines()[-1] == ours[0]
    if save_every:
        assert ours[0] == (f"sdpo-llm train: interrupted at step 1 of 3; run the same command with --resume to continue "
                           f"from the last checkpoint ({out / 'checkpoints' / 'step-000001'})")
        monkeypatch.setattr(Trainer, "step", real_step)
        assert cli_main(["train", "--recipe", str(recipe), "--resume"]) == 0
        assert json.loads((out / "summary.json").read_text())["final"]["step"] == 3
    else:
        assert ours[0].startswith("sdpo-llm train: interrupted at step 1 of 3; no checkpoint saved yet")
        assert "--resume would start from step 0" in ours[0]
