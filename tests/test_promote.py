"""Promotion: the rule picks the right configuration of a real (tiny) sweep and writes a recipe whose method block loads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from sdpo_sim.core.method import MethodConfig
from sdpo_sim.promote import promote
from sdpo_sim.sweep import Spec, run_sweep
from sdpo_sim.train import RunConfig, run

BASE = {"model": {"path": "m"}, "task": {"name": "t", "feedback": "binary", "noise": 0.0},
        "method": {"name": "grpo"}, "training": {"learning_rate": 1e-5, "steps": 3}}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("promote")
    spec = Spec.from_dict({"base": {"vocab_size": 4, "seq_len": 3, "steps": 20, "seeds": 3, "batch_size": 16, "eval_every": 10, "feedback": "critique"},
                           "cases": [{"method": "reinforce", "lr": 0.3}, {"method": "sdpo", "alpha": 0.5, "lr": 0.3},
                                     {"method": "sdpo", "teacher": "oracle", "lr": 0.3}, {"method": "grpo", "lr": 0.01}]})
    run_sweep(spec, out / "sweep", workers=1, progress=False)
    (out / "base.yaml").write_text(yaml.safe_dump(BASE))
    return out


def test_promote_applies_the_stated_rule_and_writes_a_loadable_recipe(sweep_dir, capsys):
    out = sweep_dir / "recipe.yaml"
    res = promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", out=out, entropy_floor=0.0)
    table = res.candidates
    eligible = table[table.eligible]
    assert "oracle" not in set(eligible.teacher)  # a teacher that reads A* cannot exist in an LLM
    assert res.chosen["method"] == eligible.iloc[0]["method"] and eligible.iloc[0]["final_reward"] == eligible["final_reward"].max()
    recipe = yaml.safe_load(out.read_text())
    assert MethodConfig.from_dict(recipe["method"]) == RunConfig.from_dict(res.chosen).method
    assert recipe["training"]["learning_rate"] == 1e-5 and recipe["task"]["feedback"] == "critique" and recipe["model"] == BASE["model"]
    assert any(name == "lr" for name, _, _ in res.not_transferred) and "Rule:" in out.read_text()


def test_entropy_floor_changes_the_choice_and_an_impossible_floor_is_refused(sweep_dir):
    low = promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", entropy_floor=0.0)
    floor = float(low.candidates[low.candidates.eligible].iloc[0]["entropy"]) + 1e-6
    high = promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", entropy_floor=floor)
    assert high.candidates[high.candidates.eligible]["entropy"].min() >= floor and high.chosen != low.chosen
    with pytest.raises(ValueError, match="entropy-floor"):
        promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", entropy_floor=99.0)


def test_bad_inputs_are_refused(sweep_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        promote(sweep_dir / "sweep", base=tmp_path / "missing.yaml")
    (tmp_path / "norecipe.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match="method"):
        promote(sweep_dir / "sweep", base=tmp_path / "norecipe.yaml")
    with pytest.raises(ValueError, match="no sweep results"):
        promote(tmp_path, base=sweep_dir / "base.yaml")
    with pytest.raises(ValueError, match="metric"):
        promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", metric="best")


def test_cli_prints_what_does_not_transfer(sweep_dir, capsys):
    from sdpo_sim.cli import main

    assert main(["promote", str(sweep_dir / "sweep"), "--base", str(sweep_dir / "base.yaml"), "--out", str(sweep_dir / "cli.yaml"), "--entropy-floor", "0"]) == 0
    text = capsys.readouterr().out
    assert "does not transfer" in text and "lr = 0.3" in text and (sweep_dir / "cli.yaml").is_file()


def test_promote_to_a_users_task_writes_its_dataset_and_reward_functions(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi", "answer": "x"}\n')
    (tmp_path / "my_rewards.py").write_text("def score(prompts, completions, **kw):\n    return [0.5 for _ in completions]\n")
    out = tmp_path / "recipe.yaml"
    promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", out=out, entropy_floor=0.0, dataset="data.jsonl",
            reward_funcs=["my_rewards.py:score", "json:loads"], reward_weights=[2.0, 1.0], eval_dataset="data.jsonl")
    task = yaml.safe_load(out.read_text())["task"]
    assert task["dataset"] == str(tmp_path / "data.jsonl") and task["eval_dataset"] == str(tmp_path / "data.jsonl")
    assert task["reward_funcs"] == [f"{tmp_path / 'my_rewards.py'}:score", "json:loads"]  # absolute: runs from anywhere
    assert task["reward_weights"] == [2.0, 1.0] and task["judge"] is None and task["feedback"] == "critique"


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "missing.jsonl", "reward_funcs": ["json:loads"]}, "--dataset 'missing.jsonl' does not exist"),
    ({"dataset": "data.jsonl"}, "--dataset needs --reward-funcs"),
    ({"reward_funcs": ["json:loads"]}, "give --dataset too"),
    ({"dataset": "data.jsonl", "reward_funcs": ["nofile.py:f"]}, "--reward-funcs 'nofile.py:f'"),
    ({"dataset": "data.jsonl", "reward_funcs": ["json:loads"], "reward_weights": [1.0, 2.0]}, "must be 1 finite numbers > 0"),
    ({"dataset": "data.jsonl", "reward_funcs": ["json:loads"], "reward_weights": [0.0]}, "must be 1 finite numbers > 0"),
])
def test_promote_refuses_a_user_task_that_cannot_run_and_writes_nothing(sweep_dir, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", out=tmp_path / "r.yaml", entropy_floor=0.0, **kwargs)
    assert not (tmp_path / "r.yaml").exists()


def _calibration(tmp_path, channel="critique", status="ok", rho=0.3, name="cal.json"):
    payload = {"scale": "test", "fit": {"per_channel": [{"channel": channel, "step": 0, "truth": "counterfactual", "status": status,
                                                          "rho_hat": rho if status == "ok" else None, "nearest_rho": 0.0}]},
               "transfer": {"kendall": [{"metric": "auc", "tau": 0.5, "ci_lo": 0.1, "ci_hi": 0.8, "points": 24}],
                            "signs": [{"metric": "auc", "agree": 5, "pairs": 24}], "steps": 10}}
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return path


def test_promote_with_a_calibration_writes_the_predicted_curve_and_the_agreement(sweep_dir, tmp_path):
    out = tmp_path / "recipe.yaml"
    res = promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", out=out, entropy_floor=0.0, calibration=_calibration(tmp_path))
    curve = pd.read_csv(tmp_path / "recipe-predicted-curve.csv")
    assert list(curve.step) == [0, 1, 2, 3]  # the base recipe's training.steps = 3, every step evaluated
    assert (curve.reward_lo <= curve.reward).all() and (curve.reward <= curve.reward_hi).all() and set(curve.rho) == {0.3}
    assert (tmp_path / "recipe-predicted-curve.png").stat().st_size > 0
    trust = json.loads((tmp_path / "recipe-agreement.json").read_text())
    assert trust["channel"] == "critique" and trust["rho"] == 0.3 and trust["agreement"]["kendall"][0]["tau"] == 0.5
    # the curve is the toy run of the chosen config at ρ = 0.3 for 3 steps, on the chosen config's seeds
    want = run(RunConfig.from_dict({**res.chosen, "rho": 0.3, "steps": 3, "eval_every": 1})).history
    np.testing.assert_allclose(curve.reward, want.groupby("step").reward.mean().to_numpy(), rtol=0, atol=1e-12)


def test_a_below_range_channel_uses_the_nearest_toy_teacher_and_says_so(sweep_dir, tmp_path):
    res = promote(sweep_dir / "sweep", base=sweep_dir / "base.yaml", entropy_floor=0.0, calibration=_calibration(tmp_path, status="below"))
    assert res.prediction["rho"] == 0.0 and res.prediction["rho_status"].startswith("below")


@pytest.mark.parametrize("make, says", [
    (lambda p: p / "missing.json", "does not exist"),
    (lambda p: (p / "bad.json").write_text("{") and p / "bad.json", "not readable JSON"),
    (lambda p: (p / "nofit.json").write_text("{}") and p / "nofit.json", "fit.per_channel"),
    (lambda p: _calibration(p, channel="binary"), "not calibrated"),
    (lambda p: _calibration(p, status="not identifiable"), "no calibrated"),
])
def test_bad_calibrations_exit_2_with_one_line_and_write_nothing(sweep_dir, tmp_path, make, says):
    cal, out = make(tmp_path), tmp_path / "r.yaml"
    proc = subprocess.run([sys.executable, "-m", "sdpo_sim", "promote", str(sweep_dir / "sweep"), "--base", str(sweep_dir / "base.yaml"),
                           "--out", str(out), "--entropy-floor", "0", "--calibration", str(cal)], capture_output=True, text=True)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and not list(tmp_path.glob("r-*"))
