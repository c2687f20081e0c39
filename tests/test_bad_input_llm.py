"""Bad input to ``sdpo-llm``: every row exits 2 with ONE line on stderr that names the problem, no traceback,
and nothing created (each row runs in a fresh working directory whose tree is compared before and after).

Rows run in-process through ``llm.cli.main`` (argparse's exit caught); the last rows run the real entry point
``python -m llm`` in a subprocess to show it behaves the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.cli import main
from llm.tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]
OK = "ok.yaml"  # a valid recipe on the session's tiny model (written into each row's directory)


def S(*overrides: str) -> list[str]:
    """``train --recipe ok.yaml --set A --set B ...``."""
    return ["train", "--recipe", OK, *[x for o in overrides for x in ("--set", o)]]


# (argv, exit code, phrase the one stderr line must contain); {model} is the session's tiny model directory
ROWS = [
    # --- the command line itself
    ([], 2, "required: COMMAND"),
    (["fly"], 2, "invalid choice: 'fly'"),
    (["train"], 2, "required: --recipe"),
    (["train", "--recipe", OK, "--bogus"], 2, "unrecognized arguments: --bogus"),
    # --- the recipe file
    (["train", "--recipe", "missing.yaml"], 2, "'missing.yaml' does not exist"),
    (["train", "--recipe", "recipes"], 2, "is a directory; give a recipe YAML file or a shipped name"),
    (["train", "--recipe", "bad.yaml"], 2, "not valid YAML"),
    (["train", "--recipe", "list.yaml"], 2, "a recipe must be a mapping"),
    (["train", "--recipe", "binary.yaml"], 2, "not a UTF-8 text file"),
    (["train", "--recipe", "section.yaml"], 2, "unknown recipe section(s) 'optimiser'"),
    (["train", "--recipe", "field.yaml"], 2, "unknown field(s) training.stepz"),
    # --- --set
    (S("training.steps"), 2, "must look like section.field=value"),
    (S("=5"), 2, "must look like section.field=value"),
    (S("optimiser.lr=1"), 2, "must be 'section.field' with section one of"),
    (S("training.steps=[1,"), 2, "the value is not valid YAML"),
    (S("training.feedback_credit_every=-1"), 2, "recipe field training.feedback_credit_every=-1 must be an integer ≥ 0"),
    (S("training.steps=1", "training.steps=2"), 2, "training.steps is given twice by --set training.steps=...; give each field once"),
    (S("model.lora.rank=8"), 2, "unknown field(s) model.lora.rank"),
    (S("model.lora.r=0"), 2, "recipe field model.lora.r=0 must be an integer ≥ 1"),
    (S("training.steps.x=1"), 2, "override 'training.steps.x': training.steps is not a block of fields"),
    # --- the same fields by their own flags (--section.field value)
    ([*S(), "--training.steps", "0"], 2, "training.steps=0 must be an integer ≥ 1"),
    ([*S(), "--training.steps", "x"], 2, "argument --training.steps: invalid int value: 'x'"),
    ([*S(), "--training.steps", "3", "--set", "training.steps=4"], 2, "training.steps is given by --training.steps and by --set"),
    ([*S(), "--training.adam-betas", "[0.9]"], 2, "adam_betas=[0.9] must be a list of two numbers in [0, 1)"),
    ([*S(), "--training.adam-betas", "[0.9,"], 2, "argument --training.adam-betas: '[0.9,' is not valid YAML"),
    ([*S(), "--method.name", "ppo"], 2, "MethodConfig.name='ppo' is not allowed"),
    # --- issue 16's reference-policy terms (docs/variants.md): trained now, their ranges checked
    (S("method.ref_beta=-0.1"), 2, "MethodConfig.ref_beta=-0.1 must be a number in [0.0, 1000.0]"),
    (S("method.ref_anchor=1e4"), 2, "MethodConfig.ref_anchor=10000.0 must be a number in [0.0, 1000.0]"),
    (S("method.use_bias_correction_kl=maybe"), 2, "MethodConfig.use_bias_correction_kl='maybe' must be"),
    ([*S(), "--model.lora.r", "0"], 2, "recipe field model.lora.r=0 must be an integer ≥ 1"),
    ([*S(), "--training.fused-loss", "maybe"], 2, "training.fused_loss='maybe' is not allowed"),
    # --- recipe fields: types and ranges
    (S("training.steps=0"), 2, "training.steps=0 must be an integer ≥ 1"),
    (S("training.steps=abc"), 2, "training.steps='abc' must be an integer"),
    (S("training.learning_rate=1e30"), 2, "training.learning_rate=1e+30 must be a number in (0.0, 1.0]"),
    (S("training.learning_rate=-1e-5"), 2, "training.learning_rate=-1e-05 must be a number in (0.0, 1.0]"),
    (S("training.weight_decay=1e6"), 2, "AdamW multiplies every weight by 1 − lr·weight_decay"),
    (S("training.adam_betas=[0.9]"), 2, "adam_betas=[0.9] must be a list of two numbers in [0, 1)"),
    (S("training.fused_loss=maybe"), 2, "training.fused_loss='maybe' is not allowed"),
    (S("model.dtype=float64"), 2, "model.dtype='float64' is not allowed; choose one of"),
    (S("task.noise=1e308"), 2, "task.noise=1e+308 must be a number in [0.0, 100.0]"),
    (S("task.feedback=loud"), 2, "task.feedback='loud' is not allowed"),
    (S("context.reprompt_template=x"), 2, "must contain the placeholder(s) {prompt}, {demo}, {feedback}"),
    (S("generation.top_p=0"), 2, "generation.top_p=0 must be a number in (0.0, 1.0]"),
    (S("method.name=ppo"), 2, "MethodConfig.name='ppo' is not allowed"),
    (S("method.method=sdpo"), 2, "a method's name is the field 'name'"),
    # --- paths and what the trainer checks before loading weights
    (S("training.output_dir=/proc/x"), 2, "training.output_dir '/proc/x': cannot create files"),
    (S("training.output_dir=afile.txt"), 2, "training.output_dir 'afile.txt' is an existing file"),
    (S("training.output_dir=afile.txt/run"), 2, "afile.txt' is a file, not a directory"),
    (S("model.path=nowhere"), 2, "does not exist. Create the tiny model with `sdpo-llm make-tiny"),
    (S("model.path=recipes"), 2, "exists but has no config.json"),
    (S("model.dtype=float16"), 2, "would train float16 weights without loss scaling"),
    (S("task.name=nope"), 2, "unknown task 'nope'; built-in tasks: word-constraints"),
    (S("task.judge=nomodule:judge"), 2, "judge spec 'nomodule:judge': cannot import"),
    # --- a user's task (issue 14): refused before any weights load
    (S("task.dataset=data.jsonl"), 2, "needs task.reward_funcs (or task.judge)"),
    (S("task.dataset=missing.jsonl", "task.reward_funcs=[json:loads]"), 2, "task.dataset: missing.jsonl does not exist"),
    (S("task.reward_funcs=[json:loads]", "task.reward_weights=[1, 2]"), 2, "must be a list of 1 finite numbers > 0"),
    (S("task.reward_funcs=[nomodule:f]"), 2, "nomodule:f"),
    (S("task.reward_funcs=[json:loads]", "task.judge=x:y"), 2, "cannot be set together with task.reward_funcs"),
    (S("training.report_to=[jsonl, mlflow]"), 2, "unknown tracker 'mlflow'; allowed: jsonl, tensorboard, wandb"),
    (S("training.tensorboard=true"), 2, "training.tensorboard was replaced; use training.report_to"),
    (S("training.save_total_limit=0"), 2, "save_total_limit=0 must be an integer ≥ 1"),
    # --- plan
    (["plan", "--recipe", "qwen3-8b"], 2, "required: --gpus-per-node, --gpu-memory-gb"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "x", "--gpu-memory-gb", "80"], 2, "invalid int value: 'x'"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "0", "--gpu-memory-gb", "80"], 2, "gpus_per_node=0 must be a positive integer"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "8", "--gpu-memory-gb", "nan"], 2, "--gpu-memory-gb=nan must be a finite"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--strategy", "zero9"], 2, "strategy='zero9' is not allowed"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--micro-batch", "0"], 2, "--micro-batch=0 must be a positive integer"),
    (["plan", "--recipe", "recipes", "--gpus-per-node", "8", "--gpu-memory-gb", "80"], 2, "is a directory"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--training.steps", "0"], 2,
     "training.steps=0 must be an integer ≥ 1"),
    (["plan", "--recipe", "qwen3-8b", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--set", "bad"], 2, "must look like section.field=value"),
    # --- make-tiny
    (["make-tiny", "--out", "afile.txt"], 2, "--out 'afile.txt' is an existing file"),
    (["make-tiny", "--out", "afile.txt/m"], 2, "afile.txt' is a file, not a directory"),
    (["make-tiny", "--out", "/proc/x"], 2, "--out '/proc/x': cannot create files or directories in '/proc'"),
    (["make-tiny", "--out", "full"], 2, "--out='full' is a non-empty directory; pass --overwrite"),
    (["make-tiny", "--out", "full", "--overwrite"], 2, "holds files but no saved model (config.json)"),
    (["make-tiny", "--pretrain-steps", "-1"], 2, "--pretrain-steps=-1 must be >= 0"),
    (["make-tiny", "--hidden-size", "30"], 2, "hidden_size=30 must be divisible by num_heads=4"),
    (["make-tiny", "--hidden-size", "0"], 2, "hidden_size=0 must be a positive integer"),
    (["make-tiny", "--num-layers", "two"], 2, "argument --num-layers: invalid int value: 'two'"),
    (["make-tiny", "--seed", "-1"], 2, "--seed=-1 must be in [0, 4294967295]"),
    (["make-tiny", "--task", "nope"], 2, "unknown task 'nope'"),
    (["make-tiny", "--recipe", "missing.yaml"], 2, "'missing.yaml' does not exist"),
    (["make-tiny", "--recipe", "field.yaml"], 2, "unknown field(s) training.stepz"),
    # --- proof (its checks before any model is built)
    (["proof", "--seeds", "1"], 2, "needs at least 2 seeds"),
    (["proof", "--steps", "0"], 2, "ProofConfig.steps=0 must be a positive integer"),
    (["proof", "--model", "recipes"], 2, "holds no saved model (config.json missing)"),
    (["proof", "--scale", "bogus"], 2, "invalid choice: 'bogus'"),
    (["proof", "--out", "afile.txt"], 2, "--out 'afile.txt' is an existing file"),
    (["proof", "--figures", "/proc/x"], 2, "--figures '/proc/x': cannot create"),
]
SUBPROCESS_ROWS = [
    (["make-tiny", "--out", "afile.txt"], 2, "--out 'afile.txt' is an existing file"),
    (["train", "--recipe", "recipes"], 2, "is a directory; give a recipe YAML file or a shipped name"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("bad-input-model") / "m", hidden_size=8, num_layers=1)


def make_files(cwd: Path, model: Path) -> None:
    """The files and directories the rows refer to."""
    (cwd / "afile.txt").write_text("not a directory\n")
    (cwd / "recipes").mkdir()
    (cwd / "full").mkdir()
    (cwd / "full" / "notes.txt").write_text("keep me\n")
    (cwd / "bad.yaml").write_text("model: [unclosed\n")
    (cwd / "list.yaml").write_text("- model\n- task\n")
    (cwd / "binary.yaml").write_bytes(b"\xff\xfe\x00model")
    (cwd / "section.yaml").write_text("optimiser: {lr: 1}\n")
    (cwd / "field.yaml").write_text("training: {stepz: 3}\n")
    (cwd / OK).write_text(f"model: {{path: {model}}}\ntraining: {{output_dir: run, steps: 1}}\n")


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (-1 for directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = -1
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


def check(code: int, err: str, expected_code: int, phrase: str, before: dict, after: dict) -> None:
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {lines!r}"
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert after == before, f"created or changed: {sorted(set(after.items()) ^ set(before.items()))}"


@pytest.mark.parametrize("argv, code, phrase", ROWS, ids=[" ".join(r[0]) or "(none)" for r in ROWS])
def test_bad_input_in_process(argv, code, phrase, tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.chdir(tmp_path)
    make_files(tmp_path, tiny_model)
    before = tree(tmp_path)
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        got = exit_.code
    check(got, capsys.readouterr().err, code, phrase, before, tree(tmp_path))


@pytest.mark.parametrize("argv, code, phrase", SUBPROCESS_ROWS, ids=[" ".join(r[0]) for r in SUBPROCESS_ROWS])
def test_bad_input_through_the_real_entry_point(argv, code, phrase, tmp_path, tiny_model):
    make_files(tmp_path, tiny_model)
    before = tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "llm", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    check(proc.returncode, proc.stderr, code, phrase, before, tree(tmp_path))

