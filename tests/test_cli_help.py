"""The field help of every settings dataclass, and one convention in both command lines.

- every field of every settings dataclass has help text in its metadata;
- every argument of every parser of ``sdpo-sim`` and ``sdpo-llm`` (subcommands included) has a help line;
- ``sdpo-sim run --help`` shows each field's help; a field's flag and ``--set`` give the same ``RunConfig`` / ``Recipe``;
- the docs' settings tables are what ``docs/render_fields.py`` renders from the metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

import llm.cli
import llm.make_tiny
import llm.proof
import sdpo_sim.cli
from llm.recipe import (
    ContextConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    Recipe,
    TaskConfig,
    TrainingConfig,
)
from sdpo_sim.commands.run import config_from_args
from sdpo_sim.core.config_fields import (
    add_field_flags,
    config_class,
    field_help,
    field_table,
    given_fields,
)
from sdpo_sim.core.method import MethodConfig
from sdpo_sim.train import RunConfig

REPO = Path(__file__).resolve().parents[1]
SETTINGS = (MethodConfig, RunConfig, LoraConfig, ModelConfig, TaskConfig, ContextConfig, TrainingConfig, GenerationConfig, Recipe)
PARSERS = {"sdpo-sim": sdpo_sim.cli.build_parser, "sdpo-llm": llm.cli.build_parser,
           "sdpo-llm make-tiny": llm.make_tiny.build_parser, "sdpo-llm proof": llm.proof.build_parser}


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert field_help(cls, f.name).strip(), f"{cls.__name__}.{f.name}"


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass
    class Bare:
        x: int = 0

    with pytest.raises(ValueError, match=r"Bare.x has no help"):
        field_help(Bare, "x")


def _walk(parser: argparse.ArgumentParser, name: str):
    """``(where, action)`` for every action of ``parser`` and of its subcommands' parsers, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            # what `--help` lists per subcommand is its choice action's help; the container's own help is a heading
            for choice in action._choices_actions:
                yield f"{name} {choice.dest}", choice
            for sub_name, sub in action.choices.items():
                yield from _walk(sub, f"{name} {sub_name}")
        else:
            yield name, action


@pytest.mark.parametrize("prog", PARSERS)
def test_every_argument_of_every_parser_has_a_help_line(prog):
    seen, missing = 0, []
    for where, action in _walk(PARSERS[prog](), prog):
        seen += 1
        if not isinstance(action.help, str) or not action.help.strip() or action.help == argparse.SUPPRESS:
            missing.append(f"{where}: {'/'.join(action.option_strings) or action.dest}")
    assert seen > 3 and not missing, missing


def _help_text(argv, monkeypatch, capsys, main) -> str:
    monkeypatch.setenv("COLUMNS", "100000")  # one line per help: no wrapping to undo
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_run_help_shows_every_field_help(monkeypatch, capsys):
    text = _help_text(["run", "--help"], monkeypatch, capsys, sdpo_sim.cli.main)
    fields = [(MethodConfig, f.name) for f in dataclasses.fields(MethodConfig)]
    fields += [(RunConfig, f.name) for f in dataclasses.fields(RunConfig) if f.name != "method"]
    absent = [f"{cls.__name__}.{name}" for cls, name in fields if " ".join(field_help(cls, name).split()) not in text]
    assert not absent
    assert "--set FIELD=VALUE" in text and "--task-seed INT" in text and "--method reinforce|grpo|sdpo|hybrid" in text


def test_train_help_shows_every_recipe_field(monkeypatch, capsys):
    text = _help_text(["train", "--help"], monkeypatch, capsys, llm.cli.main)
    for section in dataclasses.fields(Recipe):
        cls = config_class(Recipe, section.name)
        for f in dataclasses.fields(cls):
            assert f"--{section.name}.{f.name.replace('_', '-')}" in text and " ".join(field_help(cls, f.name).split()) in text
    assert "--model.lora.r INT" in text and "--training.adam-betas YAML" in text


def test_sim_flags_and_set_give_the_same_run_config():
    parser = sdpo_sim.cli.build_parser()
    flags = ["--method", "hybrid", "--alpha", "0.5", "--task-seed", "3", "--no-add-tail", "--lr", "none", "--topk", "null",
             "--controller", "entropy", "--entropy-target", "1", "--steps", "7", "--policy", "factored"]
    sets = ["method=hybrid", "alpha=0.5", "task_seed=3", "add_tail=false", "lr=null", "topk=null",
            "controller=entropy", "entropy_target=1", "steps=7", "policy=factored"]
    by_flags = config_from_args(parser.parse_args(["run", *flags]))
    by_set = config_from_args(parser.parse_args(["run", *[x for s in sets for x in ("--set", s)]]))
    mixed = config_from_args(parser.parse_args(["run", *flags[:6], *[x for s in sets[3:] for x in ("--set", s)]]))
    assert by_flags == by_set == mixed
    assert by_flags != RunConfig() and by_flags.method.alpha == 0.5 and by_flags.task_seed == 3 and not by_flags.method.add_tail
    assert config_from_args(parser.parse_args(["run"])) == RunConfig()  # nothing given: the dataclass defaults


def test_llm_flags_and_set_give_the_same_recipe():
    parser = llm.cli.build_parser()
    flags = ["--method.alpha", "0.5", "--training.steps", "3", "--model.lora.r", "8", "--training.adam-betas", "[0.9, 0.99]",
             "--no-context.use-demo", "--training.fused-loss", "false", "--training.learning-rate", "1e-4", "--training.chunk-size", "none"]
    sets = ["method.alpha=0.5", "training.steps=3", "model.lora.r=8", "training.adam_betas=[0.9, 0.99]", "context.use_demo=false",
            "training.fused_loss=false", "training.learning_rate=1e-4", "training.chunk_size=null"]
    base = ["train", "--recipe", "tiny-cpu"]
    by_flags = llm.cli.recipe_from_args(parser.parse_args([*base, *flags]))
    by_set = llm.cli.recipe_from_args(parser.parse_args([*base, *[x for s in sets for x in ("--set", s)]]))
    assert by_flags == by_set
    assert (by_flags.method.alpha, by_flags.training.steps, by_flags.model.lora.r, by_flags.training.adam_betas) == (0.5, 3, 8, [0.9, 0.99])
    assert by_flags.training.fused_loss is False and by_flags.context.use_demo is False and by_flags.training.learning_rate == 1e-4
    plan = parser.parse_args(["plan", "--recipe", "tiny-cpu", "--gpus-per-node", "1", "--gpu-memory-gb", "8", "--method.alpha", "0.5"])
    assert llm.cli.recipe_from_args(plan).method.alpha == 0.5


def test_field_flags_pass_on_only_what_was_given():
    parser = argparse.ArgumentParser()
    dests = add_field_flags(parser, TrainingConfig, prefix="training")
    assert given_fields(parser.parse_args([]), dests) == {}
    args = parser.parse_args(["--training.max-new-tokens", "5", "--training.mask-truncated-completions", "--training.share-prompt-prefix", "true"])
    assert given_fields(args, dests) == {"training.max_new_tokens": 5, "training.mask_truncated_completions": True, "training.share_prompt_prefix": True}
    assert all(d.isidentifier() for d in dests)  # dests are plain attribute names


def test_field_table_has_one_row_per_field():
    table = field_table(RunConfig).splitlines()
    assert table[0] == "| field | type | default | help |" and len(table) == 2 + len(dataclasses.fields(RunConfig))
    assert any(row.startswith("| `teacher` | `bayes` \\| `demo`") for row in table)


def _render_module():
    spec = importlib.util.spec_from_file_location("render_fields", REPO / "docs" / "render_fields.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_tables_are_rendered_from_the_metadata():
    render = _render_module()
    for path in render.FILES:
        text = path.read_text()
        assert "<!-- fields:" in text, path
        assert render.render(text, str(path)) == text, f"{path.name} is stale: run `python docs/render_fields.py`"
    names = {m.group(2) for path in render.FILES for m in render.BLOCK.finditer(path.read_text())}
    assert names == set(render.CLASSES)  # every settings class has its table somewhere
