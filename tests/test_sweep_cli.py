"""`sdpo-sim sweep` / `figures` on the real toy world (tiny), and bad specs refused with exit code 2 naming the field."""

from __future__ import annotations

import pandas as pd
import yaml

from sdpo_sim.cli import main

SPEC = {"name": "cli", "base": {"vocab_size": 4, "seq_len": 3, "steps": 10, "seeds": 2, "batch_size": 16, "eval_every": 5},
        "grid": {"method": ["reinforce", "sdpo"], "noise": [0.0, 0.2]}}


def test_sweep_command_runs_resumes_and_feeds_figures(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 0
    assert "4 runs (0 already done, 4 ran ok, 0 failed)" in capsys.readouterr().out
    hist = pd.read_parquet(tmp_path / "out" / "history.parquet")
    assert set(hist.method) == {"reinforce", "sdpo"} and set(hist.step) == {0, 5, 10} and hist.reward.between(0, 1).all()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 0
    assert "4 already done" in capsys.readouterr().out
    assert main(["figures", str(tmp_path / "out"), "--out", str(tmp_path / "figs"), "--only", "noise_robustness", "rho_sensitivity"]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "figs" / "noise_robustness.svg").is_file() and "rho_sensitivity" in text and "skipped" in text


def test_bad_spec_exits_2_naming_the_field(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "grid": {"feedback": ["binary", "telepathy"]}}))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "feedback='telepathy'" in err and not (tmp_path / "out" / "runs").exists()
