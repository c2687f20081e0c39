"""Recipes: the shipped ones load, the method block is a MethodConfig, bad ones are refused naming the field."""

from __future__ import annotations

import pytest
import yaml

from llm.cli import main as cli_main
from llm.memory_plan import KNOWN_CONFIGS, format_plan, memory_plan, parameter_count
from llm.recipe import (
    check_model_path,
    load_recipe,
    resolve_recipe_path,
    shipped_recipes,
)
from sdpo_sim.core.config_fields import parse_override
from sdpo_sim.core.method import MethodConfig


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _base():
    return yaml.safe_load(resolve_recipe_path("tiny-cpu").read_text())


def test_shipped_recipes_load_and_method_block_is_a_method_config():
    names = {p.stem for p in shipped_recipes()}
    assert {"tiny-cpu", "qwen3-8b"} <= names
    for path in shipped_recipes():
        recipe = load_recipe(path)
        raw = yaml.safe_load(path.read_text())["method"]
        assert MethodConfig.from_dict(raw) == recipe.method  # the toy world accepts the block unchanged
        assert MethodConfig.load(path) == recipe.method
    big = load_recipe(resolve_recipe_path("qwen3-8b"))
    assert big.model.dtype == "bfloat16" and big.model.gradient_checkpointing
    assert big.method.num_generations == 8 and big.method.support == "topk" and big.method.topk == 100
    assert big.training.weight_decay == 0.01 and big.training.max_grad_norm == 1.0


@pytest.mark.parametrize("section, field, value, words", [
    ("training", "learning_rate", -1.0, "training.learning_rate"),
    ("training", "steps", 0, "training.steps"),
    ("training", "fused_loss", "sometimes", "training.fused_loss"),
    ("model", "dtype", "float8", "model.dtype"),
    ("task", "feedback", "telepathy", "task.feedback"),
    ("generation", "backend", "magic", "generation.backend"),
    ("context", "reprompt_template", "{prompt} only", "{demo}"),
    ("method", "name", "ppo", "MethodConfig.name"),
    ("method", "alpha", 2.0, "MethodConfig.alpha"),
    ("training", "bogus_field", 1, "training.bogus_field"),
])
def test_bad_fields_are_named(tmp_path, section, field, value, words):
    data = _base()
    data[section][field] = value
    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("{", r"\{").replace("}", r"\}")):
        load_recipe(_write(tmp_path, data))


def test_unknown_section_bad_yaml_and_unsafe_yaml(tmp_path):
    data = _base()
    data["optimiser"] = {}
    with pytest.raises(ValueError, match="unknown recipe section.*optimiser"):
        load_recipe(_write(tmp_path, data))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError):  # the safe loader refuses python tags
        load_recipe(unsafe)
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_missing_model_path_says_how_to_create_it(tmp_path):
    recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {"model.path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="model.path=.*does not exist.*sdpo-llm make-tiny"):
        check_model_path(recipe)


def test_train_refuses_bad_recipe_before_loading_a_model(tmp_path, capsys):
    data = _base()
    data["model"]["path"] = str(tmp_path / "no-model")
    code = cli_main(["train", "--recipe", str(_write(tmp_path, data))])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "make-tiny" in err
    code = cli_main(["train", "--recipe", "tiny-cpu", "--set", "training.max_new_tokens=-3"])
    assert code == 2 and "training.max_new_tokens" in capsys.readouterr().err


def test_overrides_round_trip(tmp_path):
    assert parse_override("training.steps=5") == ("training.steps", 5)
    assert parse_override("model.lora={r: 8}") == ("model.lora", {"r": 8})
    recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {"training.steps": 5, "model.lora": {"r": 8}})
    assert recipe.training.steps == 5 and recipe.model.lora.r == 8
    recipe.save(tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml") == recipe
    with pytest.raises(ValueError, match="section.field"):
        parse_override("steps")
    assert parse_override("training.learning_rate=1e-5") == ("training.learning_rate", 1e-5)  # a float, not '1e-5'


def test_overrides_reach_into_sub_blocks():
    """``model.lora.r`` turns a null LoRA block into the defaults with that field; whole blocks go first."""
    base = load_recipe(resolve_recipe_path("tiny-cpu"))
    assert base.model.lora is None
    lora = base.with_overrides({"model.lora.r": 8}).model.lora
    assert lora.r == 8 and lora.alpha == 32
    both = base.with_overrides({"model.lora.alpha": 4, "model.lora": {"r": 2}}).model.lora
    assert (both.r, both.alpha) == (2, 4)
    with pytest.raises(ValueError, match="training.steps is not a block of fields"):
        base.with_overrides({"training.steps.x": 1})


def test_memory_plan_knows_qwen3_8b_offline(capsys):
    assert 8.1e9 < parameter_count(KNOWN_CONFIGS["Qwen/Qwen3-8B"]) < 8.3e9  # published: 8.2 B
    recipe = load_recipe(resolve_recipe_path("qwen3-8b"))
    one = memory_plan(recipe, gpus_per_node=8, nodes=1, gpu_memory_gb=80)
    four = memory_plan(recipe, gpus_per_node=8, nodes=4, gpu_memory_gb=80)
    assert abs(one["weights_gb"] / four["weights_gb"] - 4) < 1e-9  # FSDP2 shards weights over all GPUs
    # fused: the float32 [V, H] gradient (2.32 GiB) and [55, V] chunks, not [8·2048, V] logits (~23 GiB unfused)
    assert one["fused_loss"] and one["logits_gb"] < 3.0 and one["teacher_gb"] > 0
    live = memory_plan(recipe.with_overrides({"method.teacher_kind": "live"}), gpus_per_node=8, gpu_memory_gb=80)
    assert live["teacher_gb"] == 0
    small = memory_plan(recipe, gpus_per_node=1, gpu_memory_gb=24, strategy="ddp")
    assert not small["fits"]
    assert "DOES NOT FIT" in format_plan(small)
    assert cli_main(["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "8", "--nodes", "1", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "activations" in out and "teacher" in out and "fits" in out
    with pytest.raises(ValueError, match="strategy"):
        memory_plan(recipe, gpus_per_node=8, gpu_memory_gb=80, strategy="zero9")


def test_cli_dispatches_make_tiny_and_then_the_model_path_check_passes(tmp_path, capsys):
    out = tmp_path / "tiny-model"
    assert cli_main(["make-tiny", "--out", str(out), "--pretrain-steps", "0", "--hidden-size", "32", "--num-layers", "1"]) == 0
    assert (out / "config.json").is_file()
    check_model_path(load_recipe(resolve_recipe_path("tiny-cpu"), {"model.path": str(out)}))  # no error now
    with pytest.raises(SystemExit):
        cli_main(["plan", "--recipe", "tiny-cpu"])  # --gpus-per-node and --gpu-memory-gb are required
