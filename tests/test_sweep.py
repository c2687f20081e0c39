"""Sweep machinery on a fake run function: validation, tables, resume, conflicts, failures, workers, tuning."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml
from sweep_fakes import fake_config, fake_run

from sdpo_sim.execution import groups
from sdpo_sim.sweep import Spec, plan, run_sweep, toy_run
from sdpo_sim.tuning import TuningSpec, alternative_choices

SPEC = {"name": "t", "base": {"steps": 10, "seeds": 2}, "grid": {"method": ["reinforce", "sdpo"], "noise": [0.0, 0.1]}}


def sweep(spec, out, **kw):
    return run_sweep(Spec.from_dict(spec), out, config_fn=fake_config, run_fn=fake_run, progress=False, **kw)


@pytest.fixture
def runlog(tmp_path, monkeypatch):
    path = tmp_path / "runs.log"
    monkeypatch.setenv("FAKE_RUN_LOG", str(path))
    return lambda: path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("bad, needle", [
    ({**SPEC, "gird": {}}, "gird"),
    ({**SPEC, "grid": {"noise": []}}, "grid.noise"),
    ({**SPEC, "grid": {"nois": [0.1]}}, "nois"),
    ({**SPEC, "base": {"stepz": 3}}, "stepz"),
    ({**SPEC, "grid": {"method": ["reinforce", "ppo"]}}, "method='ppo'"),
    ({**SPEC, "grid": {"method": ["sdpo"]}, "cases": [{"noise": -1.0}]}, "noise=-1.0"),
    ({**SPEC, "cases": [{"noise": 0.3}]}, "'noise' set by both grid and cases"),
    ({**SPEC, "tuning": {"lr": [0.1], "seed_start": 1}}, "overlap"),
    ({**SPEC, "grid": {"lr": [0.1]}, "tuning": {"lr": [0.1], "seed_start": 100}}, "lr is chosen by tuning"),
    ({**SPEC, "tuning": {"lr": [], "seed_start": 100}}, "tuning.lr"),
    ({**SPEC, "tuning": {"lr": [0.1], "seed_start": 100, "criterion": "best"}}, "tuning.criterion"),
    ({**SPEC, "tuning": {"lr": [0.1], "seed_start": 100, "margin": -0.1}}, "tuning.margin=-0.1 must be a number in [0, 1)"),
    ({**SPEC, "tuning": {"lr": [0.1], "seed_start": 100, "margin": True}}, "tuning.margin=True"),
    ({**SPEC, "tuning": {"lr": [0.1], "seed_start": 100, "alternatives": "main"}}, "tuning.alternatives='main' must be a non-empty list"),
    ({**SPEC, "tuning": {"lr": [0.1], "seed_start": 100, "alternatives": ["nope"]}}, "tuning.alternatives names unknown block(s) ['nope']"),
    ({"blocks": [{"name": "a@b", "grid": {"method": ["sdpo"]}}], "tuning": {"lr": [0.1], "seed_start": 100}}, "block names must not contain '@'"),
    ([1, 2], "must be a mapping"),
])
def test_bad_specs_are_refused_before_any_run_naming_the_field(tmp_path, runlog, bad, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        sweep(bad, tmp_path / "out")
    assert runlog() == [] and not (tmp_path / "out" / "runs").exists()


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\ngrid: {method: [sdpo]}\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Spec.load(path)


def test_grid_cases_and_blocks_expand_and_deduplicate():
    spec = Spec.from_dict({"base": {"steps": 10}, "blocks": [
        {"name": "a", "grid": {"method": ["reinforce", "sdpo"], "seed_start": [0, 10]}},
        {"name": "b", "grid": {"noise": [0.0, 0.2]}, "cases": [{"method": "sdpo"}, {"method": "reinforce", "lr": 0.3}]},
    ]})
    planned = plan(spec, fake_config)
    assert len(planned) == 4 + 4 - 1  # (sdpo, noise 0, seed 0) is in both blocks
    shared = [p for p in planned if len(p.blocks) == 2]
    assert len(shared) == 1 and shared[0].config["method"] == "sdpo" and shared[0].config["noise"] == 0.0


def test_tables_carry_version_commit_and_full_config(tmp_path, runlog):
    res = sweep(SPEC, tmp_path / "out")
    assert res.failed == [] and len(runlog()) == 4
    for stem in ("history", "summary", "seeds"):
        for ext in ("parquet", "csv"):
            assert (tmp_path / "out" / f"{stem}.{ext}").is_file()
    hist = pd.read_parquet(tmp_path / "out" / "history.parquet")
    assert len(hist) == 4 * 2 * 3  # runs × seeds × eval steps (0, 5, 10)
    for col in ("package_version", "git_commit", "config", "method", "noise", "lr", "steps", "seed", "step", "reward", "block", "run_id"):
        assert col in hist.columns, col
    assert json.loads(hist["config"].iloc[0])["steps"] == 10
    summ = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert len(summ) == 4 and set(summ.status) == {"ok"} and "final_reward" in summ
    assert len(res.seeds) == 8 and {"auc", "reward_at_10", "reward_at_last", "entropy_drop"} <= set(res.seeds.columns)


def test_restart_skips_finished_runs_and_redoes_only_missing_ones(tmp_path, runlog):
    out = tmp_path / "out"
    sweep(SPEC, out)
    first = sorted(runlog())
    res = sweep(SPEC, out)
    assert sorted(runlog()) == first and res.counts["skipped"] == 4
    victim = sorted((out / "runs").glob("*.json"))[0]  # as if the sweep was killed before this run finished
    victim.unlink()
    res = sweep(SPEC, out)
    assert len(runlog()) == 5 and res.counts["ok"] == 1 and len(res.summary) == 4


def test_conflicting_spec_is_refused_but_extending_the_grid_resumes(tmp_path, runlog):
    out = tmp_path / "out"
    sweep(SPEC, out)
    with pytest.raises(ValueError, match=r"changed top-level key\(s\): base.*conflicts with the existing results"):
        sweep({**SPEC, "base": {"steps": 20, "seeds": 2}}, out)
    res = sweep({**SPEC, "grid": {**SPEC["grid"], "noise": [0.0, 0.1, 0.2]}}, out)
    assert res.counts == {"total": 6, "skipped": 4, "ok": 2, "failed": []}


def test_a_crashed_run_is_recorded_and_the_sweep_goes_on(tmp_path, runlog):
    spec = {**SPEC, "grid": {"noise": [0.0, 0.1]}, "cases": [{"method": "reinforce"}, {"method": "sdpo"}, {"fail": True, "method": "sdpo", "lr": 0.2}]}
    res = sweep(spec, tmp_path / "out")
    assert len(res.failed) == 2 and "boom" in res.failed[0]["error"]  # 2 noise values × the failing case
    assert "FAILED" in res.report()
    summ = res.summary
    assert (summ.status == "failed").sum() == 2 and summ.loc[summ.status == "failed", "error"].str.contains("RuntimeError").all()
    assert (summ.status == "ok").sum() == 4 and res.history["run_id"].nunique() == 4
    rec = json.loads(next(p for p in (tmp_path / "out" / "runs").glob("*.json") if "boom" in p.read_text()).read_text())
    assert "Traceback" in rec["traceback"]
    sweep(spec, tmp_path / "out")  # failed runs are retried on restart, finished ones are not
    assert len(runlog()) == 6 + 2


def test_parallel_workers_give_the_same_tables_as_serial(tmp_path):
    serial = sweep(SPEC, tmp_path / "serial", backend="serial")
    parallel = sweep(SPEC, tmp_path / "parallel", workers=2)
    cols = ["run_id", "seed", "step", "reward"]
    pd.testing.assert_frame_equal(serial.history[cols].sort_values(cols).reset_index(drop=True), parallel.history[cols].sort_values(cols).reset_index(drop=True))


def test_ray_backend_without_ray_says_how_to_install(tmp_path):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"sdpo-lab\[ray\]"):
        sweep(SPEC, tmp_path / "out", backend="ray")


def test_tuning_picks_the_best_lr_per_method_on_disjoint_seeds(tmp_path, runlog):
    spec = {**SPEC, "tuning": {"lr": [0.03, 0.1, 0.3, 1.0], "seeds": 2, "seed_start": 100, "criterion": "auc", "where": {"noise": 0.0}}}
    res = sweep(spec, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "tuning.json").read_text())
    assert {r["method"]: r["lr"] for r in record["selected"]} == {"reinforce": 0.3, "sdpo": 0.1}
    assert record["tuning_seeds"] == [100, 101] and "auc" in record["rule"]
    assert dict(res.summary.groupby("method")["lr"].first()) == {"reinforce": 0.3, "sdpo": 0.1}
    assert set(res.history["seed"]) == {0, 1} and res.summary["lr_selected_by"].str.contains("tuning seeds 100..101").all()
    tuning_calls = [line for line in runlog() if line.split()[2] == "100"]
    assert len(tuning_calls) == 2 * 4  # methods × lrs, on noise 0 only
    n = len(runlog())
    sweep(spec, tmp_path / "out")
    assert len(runlog()) == n  # tuning and evaluation both resume


def test_tuning_alternatives_evaluate_a_block_again_at_each_other_choice(tmp_path, runlog):
    # fake reward curves (tests/sweep_fakes.py): reward 0.3 + 0.5 (1 − e^{−rate·s}), rate 0.2·e^{−|ln(lr/0.3)|}: rates 0.2,
    # 0.06, 0.02 at lr 0.3, 1.0, 0.03, so the trapezoid AUC over steps 0, 5, 10 is 0.3 + 0.266, 0.121, 0.046: lr 1.0 is
    # 0.145 below the best, 0.03 is 0.220 below; margin 0.18 puts 1.0 in the near-best set and 0.03 out.
    tuning = {"lr": [0.03, 0.3, 1.0], "seeds": 2, "seed_start": 100, "where": {"noise": 0.0}, "margin": 0.18, "blocks": ["b"], "alternatives": ["b"]}
    spec = {"base": {"steps": 10, "seeds": 2}, "tuning": tuning, "blocks": [{"name": "b", "grid": {"method": ["reinforce"], "noise": [0.0, 0.1]}}]}
    res = sweep(spec, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "tuning.json").read_text())
    scores = pd.DataFrame(record["scores"]).set_index("lr")["mean"]
    near = sorted(scores[scores >= scores.max() - 0.18].index)
    assert near == [0.3, 1.0]  # the premise of the comment above, measured
    alt = {name: a["selected"][0]["lr"] for name, a in record["alternatives"].items()}
    assert alt == {"low": 0.3, "high": 1.0, "other": 0.3} and record["margin"] == 0.18 and record["alternative_blocks"] == ["b"]
    lrs = res.summary.groupby("block")["lr"].agg(set).to_dict()
    assert lrs == {"b": {0.3}, "b@low": {0.3}, "b@other": {0.3}, "b@high": {1.0}}
    # a choice equal to the chosen one is the same run, listed under both blocks: only b@high costs runs
    evaluation = [line for line in runlog() if line.split()[2] == "0"]
    assert sorted(evaluation) == sorted(["reinforce 0.3 0 0.0", "reinforce 0.3 0 0.1", "reinforce 1.0 0 0.0", "reinforce 1.0 0 0.1"])


def test_alternative_choices_follow_the_margin_and_the_other_criterion():
    # hand-made tuning scores: two seeds per candidate; auc ranks 0.3 > 1.0 > 0.1, final ranks 1.0 first
    rows = [{"method": "sdpo", "lr": lr, "beta": beta, "seed": s, "task_seed": 0, "auc": auc, "final_reward": fin}
            for lr, beta, auc, fin in [(0.1, 1.0, 0.70, 0.80), (0.3, 1.0, 0.75, 0.82), (0.3, 2.0, 0.74, 0.81), (1.0, 1.0, 0.735, 0.90),
                                       (1.0, 2.0, 0.745, 0.85)] for s in (0, 1)]
    tspec = TuningSpec.from_dict({"lr": [0.1, 0.3, 1.0], "beta": [1.0, 2.0], "margin": 0.01}, ["method", "lr", "beta", "noise"])
    alt = alternative_choices(pd.DataFrame(rows), tspec)
    assert alt["other"][("sdpo",)] == {"lr": 1.0, "beta": 1.0}  # best final reward
    assert alt["low"][("sdpo",)] == {"lr": 0.3, "beta": 1.0}  # 0.1 is 0.05 below the best: outside the margin
    assert alt["high"][("sdpo",)] == {"lr": 1.0, "beta": 2.0}  # at lr 1.0 the best β within the margin (0.745 > 0.735)
    assert alternative_choices(pd.DataFrame(rows), TuningSpec.from_dict({"lr": [0.1], "beta": [1.0], "margin": 0.0}, ["method"]))["high"][("sdpo",)] == {"lr": 0.3, "beta": 1.0}


def test_spec_file_round_trip(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    assert len(plan(Spec.load(path), fake_config)) == 4


def test_a_block_that_fixes_lr_keeps_it_and_is_not_tuned_on(tmp_path, runlog):
    spec = {"base": {"steps": 10, "seeds": 2}, "tuning": {"lr": [0.1, 0.3], "seeds": 1, "seed_start": 50},
            "blocks": [{"name": "tuned", "grid": {"method": ["reinforce", "sdpo"]}},
                       {"name": "replica", "base": {"lr": 0.02, "method": "sdpo", "noise": 0.1}}]}
    res = sweep(spec, tmp_path / "out")
    lrs = res.summary.set_index("block")["lr"]
    assert lrs["replica"] == 0.02 and set(res.summary[res.summary.block == "tuned"]["lr"]) == {0.1, 0.3}
    assert len([line for line in runlog() if line.split()[2] == "50"]) == 2 * 2  # replica's points are not tuned on
    with pytest.raises(ValueError, match="base.lr"):
        sweep({**spec, "base": {"lr": 0.1}}, tmp_path / "other")


def _alone(config):
    """The toy world's run function without the ability to share a program: every run trains by itself."""
    return toy_run(config)


def test_toy_runs_that_can_share_a_program_do_and_get_the_same_tables(tmp_path):
    spec = {"name": "g", "base": {"steps": 8, "eval_every": 4, "seeds": 2, "batch_size": 16, "num_generations": 4, "method": "sdpo"},
            "grid": {"lr": [0.1, 0.3, 1.0], "noise": [0.0, 0.2], "feedback": ["binary", "critique"]}}
    planned = plan(Spec.from_dict(spec))
    programs = groups(planned, toy_run)
    assert len(planned) == 12 and len(programs) == 2  # one program per feedback type: lr and noise vary within it
    assert sorted(len(g) for g in programs) == [6, 6] and all(len({p.config["feedback"] for p in g}) == 1 for g in programs)
    shared = run_sweep(Spec.from_dict(spec), tmp_path / "shared", workers=1, progress=False)
    alone = run_sweep(Spec.from_dict(spec), tmp_path / "alone", workers=1, progress=False, run_fn=_alone)
    for table in ("history", "seeds"):
        a, b = getattr(shared, table), getattr(alone, table)
        metrics = [c for c in a.columns if c not in ("wall_time_s", "git_commit", "code_hash", "package_version")]
        pd.testing.assert_frame_equal(a[metrics], b[metrics], check_exact=True)
    record = json.loads(next((tmp_path / "shared" / "runs").glob("*.json")).read_text())
    assert record["shared_program"] == 6


def test_programs_hold_at_most_group_runs_seeds():
    assert toy_run.group_runs == 80
    spec = {"name": "g", "base": {"seeds": 41}, "grid": {"lr": [0.1, 0.3, 1.0]}}
    assert [len(g) for g in groups(plan(Spec.from_dict(spec)), toy_run)] == [1, 1, 1]  # 41 + 41 > 80
    spec["base"]["seeds"] = 20
    assert [len(g) for g in groups(plan(Spec.from_dict(spec)), toy_run)] == [3]
    spec = {"name": "g", "base": {"seeds": 10}, "grid": {"task_seed": list(range(8))}}  # a claims condition: one program
    assert [len(g) for g in groups(plan(Spec.from_dict(spec)), toy_run)] == [8]


def test_tuning_chooses_beta_for_distilling_methods_only(tmp_path, runlog):
    spec = {**SPEC, "tuning": {"lr": [0.1, 0.3], "beta": [1.0, 2.0, 4.0], "seeds": 2, "seed_start": 100, "where": {"noise": 0.0}}}
    res = sweep(spec, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "tuning.json").read_text())
    sel = {r["method"]: r for r in record["selected"]}
    assert sel["sdpo"]["lr"] == 0.1 and sel["sdpo"]["beta"] == 2.0 and not sel["sdpo"]["beta_at_edge"]
    assert sel["reinforce"]["lr"] == 0.3 and "beta" not in sel["reinforce"]  # reinforce ignores beta: tuned over lr alone
    assert len([line for line in runlog() if line.split()[2] == "100"]) == 2 * 3 + 2  # sdpo: lr × beta; reinforce: lr
    assert dict(res.summary.groupby("method")["beta"].first()) == {"reinforce": 1.0, "sdpo": 2.0}
    assert "β in [1.0, 2.0, 4.0]" in record["rule"]
    ran = len(runlog())
    again = sweep(spec, tmp_path / "out")  # resumed: the stored runs carry the tuned β, and are found rather than refused
    assert len(runlog()) == ran and again.counts["skipped"] == again.counts["total"] > 0
    pd.testing.assert_frame_equal(again.summary, res.summary)


@pytest.mark.parametrize("tuning, needle", [
    ({"lr": [0.1], "beta": []}, "tuning.beta must be a non-empty list of positive numbers"),
    ({"lr": [0.1], "beta": [0.0]}, "tuning.beta must be a non-empty list of positive numbers"),
    ({"lr": [0.1], "beta": [1.0], "per": ["noise"]}, "tuning.beta needs method in tuning.per"),
    ({"lr": [0.1], "per": ["beta"]}, "tuning.per must not contain beta"),
])
def test_bad_beta_tuning_is_refused(tmp_path, tuning, needle):
    with pytest.raises(ValueError, match=needle):
        sweep({**SPEC, "tuning": {"seed_start": 100, **tuning}}, tmp_path / "out")


def test_base_beta_and_tuned_beta_are_refused_together(tmp_path):
    spec = {**SPEC, "base": {**SPEC["base"], "beta": 1.0}, "tuning": {"lr": [0.1], "beta": [1.0, 2.0], "seed_start": 100}}
    with pytest.raises(ValueError, match="base.beta is set but tuning.beta chooses beta"):
        sweep(spec, tmp_path / "out")
