"""Every bad input to `sdpo-sim` is refused the same way: exit 2, ONE line on stderr naming what is wrong and
what is allowed, no traceback, and nothing created (the working directory and the sweep it reads are unchanged).

One row per case: (argv, expected exit code, a phrase the message must contain, files to put in the working
directory first). Placeholders: ``{SWEEP}`` is a finished tiny sweep. Rows run in-process (``sdpo_sim.cli.main``);
a few run through the real entry point (``python -m sdpo_sim``) to show it behaves the same.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdpo_sim.cli import main
from sdpo_sim.sweep import run_sweep

TINY = {"vocab_size": 3, "seq_len": 2, "steps": 2, "seeds": 2, "batch_size": 4, "num_generations": 2, "eval_every": 1}
SPEC = yaml.safe_dump({"name": "tiny", "base": TINY, "grid": {"method": ["sdpo", "reinforce"]}})


def spec_with(**changes) -> str:
    """The tiny spec with top-level keys replaced (``base`` merged)."""
    data = {"name": "tiny", "base": TINY, "grid": {"method": ["sdpo", "reinforce"]}}
    if "base" in changes:
        changes["base"] = {**TINY, **changes["base"]}
    return yaml.safe_dump({**data, **changes})


NO_PROC = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, the stand-in for a place nothing can be created in")
HAS_RAY = pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here, so backend='ray' is valid")
S = {"spec.yaml": SPEC}  # a valid spec in the working directory
F = {"afile": "not a directory\n"}  # an existing file
RUN = ["run", "--steps", "1", "--seeds", "1", "--vocab-size", "3", "--seq-len", "2", "--batch-size", "4", "--num-generations", "2"]

ROWS = [
    # -- sweep: output places ------------------------------------------------------------------------------------
    (["sweep", "spec.yaml", "--out", "afile"], 2, "'afile' is an existing file", {**S, **F}),
    pytest.param(["sweep", "spec.yaml", "--out", "/proc/x"], 2, "cannot create files or directories in '/proc'", S, marks=NO_PROC),
    (["sweep", "spec.yaml", "--out", "afile/sub"], 2, "is a file, not a directory", {**S, **F}),
    (["sweep", "spec.yaml"], 2, "the following arguments are required: --out", S),
    # -- sweep: the spec argument ------------------------------------------------------------------------------------
    (["sweep", ".", "--out", "o"], 2, "is a directory; a sweep spec file (YAML) or a packaged spec name (claims | main | quick)", {}),
    (["sweep", "missing.yaml", "--out", "o"], 2, "spec file 'missing.yaml' does not exist", {}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "not valid YAML", {"bad.yaml": "base: {steps: [1, 2\ngrid: :\n"}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "a sweep spec must be a mapping", {"bad.yaml": "- 1\n- 2\n"}),
    (["sweep", "bin.yaml", "--out", "o"], 2, "is not a UTF-8 text file; it must be YAML text", {"bin.yaml": bytes(range(128, 256))}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "unknown top-level key(s) 'grdi'", {"bad.yaml": "grdi: {method: [sdpo]}\n"}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "unknown field(s) 'nois'", {"bad.yaml": spec_with(base={"nois": 0.1})}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "must be a non-empty list of values", {"bad.yaml": spec_with(grid={"method": "sdpo"})}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "RunConfig.noise=1e+308 must be a number in [0, 1000]", {"bad.yaml": spec_with(grid={"noise": [0.0, 1e308]})}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "RunConfig.steps=0 must be an integer ≥ 1", {"bad.yaml": spec_with(base={"steps": 0})}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "vocab_size='big' must be an integer", {"bad.yaml": spec_with(base={"vocab_size": "big"})}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "tuning.lr must be a non-empty list of positive numbers", {"bad.yaml": spec_with(tuning={"lr": [-1.0], "seed_start": 100})}),
    (["sweep", "bad.yaml", "--out", "o"], 2, "MethodConfig.temperature=1e-30 must be a number in [0.001, 1000.0]", {"bad.yaml": spec_with(base={"temperature": 1e-30})}),
    # -- sweep: workers and backend (refused before the output directory, spec.yaml or runs/ exist) ---------------
    (["sweep", "spec.yaml", "--out", "o", "--workers", "0"], 2, "argument --workers: must be a positive integer, got '0'", S),
    (["sweep", "spec.yaml", "--out", "o", "--workers", "-2"], 2, "argument --workers: must be a positive integer, got '-2'", S),
    (["sweep", "spec.yaml", "--out", "o", "--workers", "two"], 2, "must be a positive integer, got 'two'", S),
    pytest.param(["sweep", "spec.yaml", "--out", "o", "--backend", "ray"], 2, "backend='ray' needs Ray, which is not installed", S, marks=HAS_RAY),
    (["sweep", "spec.yaml", "--out", "o", "--backend", "dask"], 2, "invalid choice: 'dask'", S),
    # -- run: every magnitude that overflows or cannot be meant, types, choices ------------------------------------
    ([*RUN, "--noise", "1e308"], 2, "RunConfig.noise=1e+308 must be a number in [0, 1000]", {}),
    ([*RUN, "--noise", "-1"], 2, "RunConfig.noise=-1.0 must be a number in [0, 1000]", {}),
    ([*RUN, "--noise", "nan"], 2, "RunConfig.noise=nan must be a number", {}),
    ([*RUN, "--teacher", "null", "--rho", "0.3"], 2, "RunConfig.rho=0.3 must be 0 with teacher='null'", {}),
    ([*RUN, "--hint-noise", "1e308"], 2, "RunConfig.hint_noise=1e+308 must be a number in [0, 1000]", {}),
    ([*RUN, "--lr", "1e30"], 2, "RunConfig.lr=1e+30 must be a number in (0, 1000]", {}),
    ([*RUN, "--lr", "0"], 2, "RunConfig.lr=0.0 must be a number in (0, 1000]", {}),
    ([*RUN, "--steps", "0"], 2, "RunConfig.steps=0 must be an integer ≥ 1", {}),
    ([*RUN, "--steps", "1.5"], 2, "argument --steps: invalid int value: '1.5'", {}),
    ([*RUN, "--beta", "1e308"], 2, "RunConfig.beta=1e+308 must be a number in (0, 1000]", {}),
    ([*RUN, "--temperature", "1e-30"], 2, "MethodConfig.temperature=1e-30 must be a number in [0.001, 1000.0]", {}),
    ([*RUN, "--temperature", "1e30"], 2, "MethodConfig.temperature=1e+30 must be a number in [0.001, 1000.0]", {}),
    ([*RUN, "--alpha-mix", "2"], 2, "MethodConfig.alpha_mix=2.0 must be a number in [0.0, 1.0]", {}),
    ([*RUN, "--entropy-gain", "1e308"], 2, "MethodConfig.entropy_gain=1e+308 must be a number in [0.0, 1000.0]", {}),
    ([*RUN, "--divergence-tau", "0"], 2, "MethodConfig.divergence_tau=0.0 must be a number in [1e-06, 1000.0]", {}),
    ([*RUN, "--teacher-rate", "1.5"], 2, "MethodConfig.teacher_rate=1.5 must be a number in [0.0, 1.0]", {}),
    ([*RUN, "--epsilon", "1e308"], 2, "MethodConfig.epsilon=1e+308 must be a number in [0.0, 1000.0]", {}),
    ([*RUN, "--is-clip", "1e308"], 2, "MethodConfig.is_clip=1e+308 must be a number in (0.0, 1000.0]", {}),
    ([*RUN, "--rho", "2"], 2, "RunConfig.rho=2.0 must be a number in [0, 1]", {}),
    ([*RUN, "--threshold", "2"], 2, "RunConfig.threshold=2.0 must be a number in [0, 1]", {}),
    ([*RUN, "--seeds", "0"], 2, "RunConfig.seeds=0 must be an integer ≥ 1", {}),
    ([*RUN, "--seeds", "100000", "--batch-size", "1024"], 2, "exceeds 2**27 = 134,217,728 elements", {}),
    ([*RUN, "--task-seed", str(10**20)], 2, "RunConfig.task_seed=100000000000000000000 must be ≤", {}),
    ([*RUN, "--vocab-size", "100", "--seq-len", "10"], 2, "exceeds the enumeration limit", {}),
    ([*RUN, "--method", "ppo"], 2, "MethodConfig.name='ppo' is not allowed; choose one of", {}),
    ([*RUN, "--teacher", "sage"], 2, "RunConfig.teacher='sage' is not allowed; choose one of", {}),
    ([*RUN, "--feedback", "stars"], 2, "RunConfig.feedback='stars' is not allowed; choose one of", {}),
    ([*RUN, "--batch-size", "5"], 2, "must be a multiple of num_generations=2", {}),
    ([*RUN, "--method", "hybrid", "--controller", "entropy", "--entropy-target", "5"], 2, "must be ≤ ln(vocab_size) = 1.099 nats", {}),
    ([*RUN, "--support", "topk", "--topk", "0"], 2, "MethodConfig.topk=0 must be a positive integer", {}),
    ([*RUN, "--colour", "red"], 2, "unrecognized arguments: --colour red", {}),
    # -- run: --set FIELD=VALUE (the same fields as the flags, flat keys, YAML values) ---------------------------------
    ([*RUN, "--set", "alpha"], 2, "argument --set: --set 'alpha' must look like field=value", {}),
    ([*RUN, "--set", "=0.5"], 2, "--set '=0.5' must look like field=value", {}),
    ([*RUN, "--set", "alpha=[1,"], 2, "the value is not valid YAML", {}),
    ([*RUN, "--set", "colour=red"], 2, "unknown RunConfig field(s) 'colour'", {}),
    ([*RUN, "--set", "alpha=2"], 2, "MethodConfig.alpha=2.0 must be a number in [0.0, 1.0]", {}),
    ([*RUN, "--set", "eval_every=abc"], 2, "RunConfig.eval_every='abc' must be an integer ≥ 1", {}),
    ([*RUN, "--set", "method=ppo"], 2, "MethodConfig.name='ppo' is not allowed; choose one of", {}),
    ([*RUN, "--alpha", "0.5", "--set", "alpha=0.7"], 2, "alpha is given by --alpha and by --set alpha=...; give each field once", {}),
    ([*RUN, "--set", "rho=0.1", "--set", "rho=0.2"], 2, "rho is given twice by --set rho=...; give each field once", {}),
    ([*RUN, "--set", "steps=2"], 2, "steps is given by --steps and by --set steps=...", {}),
    # -- figures ------------------------------------------------------------------------------------------------------
    (["figures", "missing"], 2, "sweep directory 'missing' does not exist", {}),
    (["figures", "afile"], 2, "'afile' is a file, not a sweep directory", F),
    (["figures", "."], 2, "holds no sweep results (no summary.parquet)", {}),
    (["figures", "{SWEEP}", "--out", "afile"], 2, "figures directory 'afile' is an existing file", F),
    pytest.param(["figures", "{SWEEP}", "--out", "/proc/x"], 2, "cannot create files or directories in '/proc'", {}, marks=NO_PROC),
    (["figures", "{SWEEP}", "--only", "nonsense"], 2, "invalid choice: 'nonsense'", {}),
    # -- claims (refused before its sweep runs) ----------------------------------------------------------------------
    (["claims", "--quick", "--out", "afile"], 2, "sweep output directory 'afile' is an existing file", F),
    pytest.param(["claims", "--quick", "--report", "/proc/x"], 2, "report directory '/proc/x': cannot create", {}, marks=NO_PROC),
    (["claims", "--quick", "--figures", "afile"], 2, "figures directory 'afile' is an existing file", F),
    (["claims", "--quick", "--record-walltime", "."], 2, "--record-walltime file '.' is a directory", {}),
    (["claims", "--quick", "--spec", "missing.yaml"], 2, "spec file 'missing.yaml' does not exist", {}),
    (["claims", "--quick", "--spec", "."], 2, "spec file '.' is a directory", {}),
    (["claims", "--quick", "--workers", "0"], 2, "argument --workers: must be a positive integer", {}),
    (["claims", "--quick", "--scale", "main"], 2, "not allowed with argument --quick", {}),
    # -- main ---------------------------------------------------------------------------------------------------------
    (["main", "--out", "afile"], 2, "output directory 'afile' is an existing file", F),
    (["main", "--workers", "-2"], 2, "argument --workers: must be a positive integer, got '-2'", {}),
    # -- promote: the sweep directory is checked first ----------------------------------------------------------------
    (["promote", "missing"], 2, "sweep directory 'missing' does not exist", {}),
    (["promote", "missing", "--base", "missing.yaml"], 2, "sweep directory 'missing' does not exist", {}),
    (["promote", "{SWEEP}", "--base", "missing.yaml"], 2, "base recipe 'missing.yaml' does not exist", {}),
    (["promote", "{SWEEP}", "--base", "."], 2, "base recipe '.' is a directory", {}),
    (["promote", "{SWEEP}", "--base", "spec.yaml"], 2, "has no `method:` mapping; is it an LLM recipe?", S),
    (["promote", "{SWEEP}", "--base", "bad.yaml"], 2, "not valid YAML", {"bad.yaml": "method: {a: [1\n"}),
    pytest.param(["promote", "{SWEEP}", "--out", "/proc/x/r.yaml"], 2, "recipe output file '/proc/x/r.yaml': cannot create", {}, marks=NO_PROC),
    (["promote", "{SWEEP}", "--out", "."], 2, "recipe output file '.' is a directory", {}),
    (["promote", "{SWEEP}", "--out", "afile/r.yaml"], 2, "is a file, not a directory", F),
    (["promote", "{SWEEP}", "--dataset", "missing.jsonl", "--reward-funcs", "json:loads"], 2, "--dataset 'missing.jsonl' does not exist", {}),
    (["promote", "{SWEEP}", "--reward-funcs", "json:loads"], 2, "give --dataset too", {}),
    (["promote", "{SWEEP}", "--entropy-floor", "nan"], 2, "entropy_floor=nan must be a number ≥ 0", {}),
    (["promote", "{SWEEP}", "--entropy-floor", "100"], 2, "no configuration passes the rule", {}),
    (["promote", "{SWEEP}", "--top", "0"], 2, "argument --top: must be a positive integer", {}),
    # -- the command itself --------------------------------------------------------------------------------------------
    ([], 2, "the following arguments are required: COMMAND", {}),
    (["teleport"], 2, "invalid choice: 'teleport'", {}),
]


def _argv_id(row) -> str:
    values = row.values if hasattr(row, "values") else row
    return " ".join(values[0])[:80] or "(no arguments)"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A finished tiny sweep (2 configurations × 2 seeds) for promote and figures to read."""
    out = tmp_path_factory.mktemp("finished") / "sweep"
    spec = tmp_path_factory.mktemp("spec") / "spec.yaml"
    spec.write_text(SPEC)
    run_sweep(spec, out, workers=1, progress=False)
    return out


def tree(*roots: Path) -> list[str]:
    """Every file and directory under ``roots`` (hidden ones included), as sorted paths."""
    found = []
    for root in roots:
        for here, dirs, files in os.walk(root):
            found += [os.path.join(here, name) for name in dirs + files]
    return sorted(found)


def prepare(tmp_path: Path, argv: list, files: dict, sweep_dir: Path) -> list:
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return [a.replace("{SWEEP}", str(sweep_dir)) for a in argv]


def check_refusal(code, out: str, err: str, expected: int, phrase: str) -> None:
    assert code == expected, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be exactly one non-empty line, got {err!r}"
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    assert "Traceback" not in err and out == "", (out, err)


@pytest.mark.parametrize("argv, expected, phrase, files", ROWS, ids=[_argv_id(r) for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, expected, phrase, files, tmp_path, monkeypatch, capsys, sweep_dir):
    monkeypatch.chdir(tmp_path)
    argv = prepare(tmp_path, argv, files, sweep_dir)
    before = tree(tmp_path, sweep_dir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses by exiting
        code = exit_.code
    out, err = capsys.readouterr()
    check_refusal(code, out, err, expected, phrase)
    assert tree(tmp_path, sweep_dir) == before, "a refused command must leave nothing behind"


def test_the_table_is_large_enough():
    assert len(ROWS) >= 28


SUBPROCESS_ROWS = [
    (["sweep", "spec.yaml", "--out", "afile"], 2, "'afile' is an existing file", {**S, **F}),
    ([*RUN, "--noise", "1e308"], 2, "RunConfig.noise=1e+308 must be a number in [0, 1000]", {}),
    (["promote", "missing"], 2, "sweep directory 'missing' does not exist", {}),
]


@pytest.mark.parametrize("argv, expected, phrase, files", SUBPROCESS_ROWS, ids=[_argv_id(r) for r in SUBPROCESS_ROWS])
def test_the_real_entry_point_refuses_the_same_way(argv, expected, phrase, files, tmp_path, sweep_dir):
    argv = prepare(tmp_path, argv, files, sweep_dir)
    before = tree(tmp_path, sweep_dir)
    proc = subprocess.run([sys.executable, "-m", "sdpo_sim", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    check_refusal(proc.returncode, proc.stdout, proc.stderr, expected, phrase)
    assert tree(tmp_path, sweep_dir) == before


def test_promote_finds_its_default_recipe_from_any_directory(tmp_path, monkeypatch, capsys, sweep_dir):
    """The default --base is llm's package data, not a path relative to the repository root."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "recipe.yaml"
    assert main(["promote", str(sweep_dir), "--out", str(out), "--entropy-floor", "0"]) == 0
    recipe = yaml.safe_load(out.read_text())
    assert recipe["method"]["name"] in ("sdpo", "reinforce") and "training" in recipe
    assert "tiny-cpu.yaml" in out.read_text().splitlines()[0]


def test_the_default_recipe_is_located_without_importing_llm(tmp_path):
    """The toy world never runs LLM code: finding llm's package data must not import the llm package."""
    code = "import sys; from sdpo_sim.promote import default_base; p = default_base(); assert p.is_file(), p; print(sorted(m for m in sys.modules if m.split('.')[0] == 'llm'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
