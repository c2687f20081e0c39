"""The variants study (issue 16): the quick scale end to end, the verdict rules on synthetic tables with known answers,
the arms and the tuning key of the packaged specs, and bad input (one line, exit 2, nothing created)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sdpo_sim.claims import CONDITIONAL, FAILS, HOLDS, MISSING
from sdpo_sim.cli import main
from sdpo_sim.provenance import code_hash
from sdpo_sim.stats import per_seed_metrics
from sdpo_sim.sweep import Spec
from sdpo_sim.train import RunConfig
from sdpo_sim.tuning import TuningSpec
from sdpo_sim.variants_job import SCALES, render_markdown, run_variants, spec_path
from sdpo_sim.variants_study import (
    ARMS,
    OUTCOMES,
    SPEED_MARGIN,
    VERDICTS,
    arm_of,
    check_spec,
    evaluate,
    finite_rows,
    label_arms,
    outcome,
    verdict,
)

FEEDBACKS = ("binary", "ordinal", "continuous", "critique")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    res = run_variants("quick", out=out / "sweep", report_dir=out, figures_dir=out / "figures", workers=2, progress=False)
    return out, res


def test_quick_study_writes_a_row_per_arm_and_channel_with_finite_values_and_fixed_verdicts(quick):
    out, res = quick
    assert res["sweep"].failed == []
    study = res["study"]
    assert sorted(zip(study.table["arm"], study.table["feedback"])) == sorted((a, f) for a in ARMS for f in FEEDBACKS)
    assert finite_rows(study, steps=30)
    assert [v.arm for v in study.verdicts] == [a for a in ARMS if a != "sdpo"]
    assert all(v.verdict in VERDICTS for v in study.verdicts)
    assert all(v.robustness.startswith(("robust (", "fragile (", "not measured")) for v in study.verdicts)
    assert set(study.table.loc[study.table["arm"] != "sdpo", "outcome"]) <= set(OUTCOMES)
    assert set(study.alternatives) == {"the other tuning criterion", "the smallest near-best lr", "the largest near-best lr"}
    md = (out / "VARIANTS.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in md
    data = json.loads((out / "VARIANTS.json").read_text())
    assert data["meta"]["code_hash"] == data["meta"]["report_code_hash"] == code_hash()  # every run and the report: this code
    assert len(data["rows"]) == len(ARMS) * len(FEEDBACKS) and data["arms"] == ARMS
    assert {v["verdict"] for v in data["verdicts"]} <= set(VERDICTS)
    for name in ("variants_learning_curves", "variants_entropy_reward", "variants_verdicts"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 0


def test_every_arm_gets_its_own_tuned_lr_per_channel(quick):
    """`per` names the fields that tell arms apart: one selected row per arm × feedback (32), none shared."""
    _, res = quick
    tuning = res["sweep"].tuning
    keys = [tuple(r[p] for p in tuning["per"]) for r in tuning["selected"]]
    assert len(keys) == len(set(keys)) == len(ARMS) * len(FEEDBACKS)
    defaults = RunConfig().to_dict()
    for _, row in res["study"].table.iterrows():  # each arm × channel was evaluated at its own group's choice
        want = {p: ARMS[row["arm"]].get(p, defaults[p]) for p in tuning["per"] if p != "feedback"}
        match = [r for r in tuning["selected"] if r["feedback"] == row["feedback"] and all(r[p] == v for p, v in want.items())]
        assert len(match) == 1 and match[0]["lr"] == row["lr"], (row["arm"], row["feedback"], match)


def test_a_second_invocation_reuses_every_run(quick, tmp_path):
    out, res = quick
    again = run_variants("quick", out=out / "sweep", report_dir=tmp_path, workers=1, progress=False, figures=False)
    assert again["sweep"].counts["skipped"] == again["sweep"].counts["total"] == res["sweep"].counts["total"]
    pd.testing.assert_frame_equal(again["study"].table.drop(columns=["vs_sdpo"]), res["study"].table.drop(columns=["vs_sdpo"]))


# ----------------------------------------------------------------------------- the packaged specs
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_packaged_specs_hold_every_arm_once_and_a_tuning_key_that_separates_them(scale):
    spec = Spec.load(spec_path(scale))
    check_spec(spec)
    main_block = next(b for b in spec.blocks if b.name == "main")
    assert sorted(arm_of(c) for c in main_block.cases) == sorted(ARMS)
    assert main_block.grid["feedback"] == list(FEEDBACKS)
    assert spec.tuning["alternatives"] == ["main"]


def test_the_canonical_spec_is_the_stated_scale():
    raw = yaml.safe_load(spec_path("canonical").read_text())
    assert raw["base"]["seeds"] == 10 and raw["blocks"][0]["grid"]["task_seed"] == list(range(4))
    assert raw["tuning"]["seed_start"] >= raw["base"]["seeds"]  # tuning seeds disjoint from evaluation seeds 0..9


def test_a_tuning_key_of_method_and_feedback_alone_is_refused():
    raw = yaml.safe_load(spec_path("quick").read_text())
    raw["tuning"]["per"] = ["method", "feedback"]
    with pytest.raises(ValueError, match="one shared choice"):
        check_spec(Spec.from_dict(raw))


def test_blend_and_srpo_are_tuned_over_beta_as_distilling_methods():
    """tuning's DISTILLING is the core's (sdpo, hybrid, blend, srpo): β candidates for each, none for grpo."""
    t = TuningSpec.from_dict({"lr": [0.3], "beta": [0.5, 1.0], "per": ["method", "distill_gate"]}, ["method", "distill_gate", "lr", "beta"])
    for method in ("sdpo", "hybrid", "blend", "srpo"):
        assert t.betas({"method": method, "beta": 1.0}) == [0.5, 1.0]
    assert t.betas({"method": "grpo", "beta": 1.0}) == [1.0]


def test_arms_are_recognised_from_their_fields_and_a_foreign_run_is_refused():
    assert arm_of({"method": "sdpo"}) == "sdpo"
    assert arm_of({"method": "sdpo", "distill_gate": "positive_advantage", "distill_warmup_steps": 20}) == "sdpg"
    assert arm_of({"method": "sdpo", "distill_loss": "forward_ce", "alpha": 0.0}) == "forward-ce"
    with pytest.raises(ValueError, match="none of the study's arms"):
        arm_of({"method": "sdpo", "ref_beta": 0.5})  # another coefficient is another arm, not ref-kl
    frame = pd.DataFrame([{"method": "srpo", "distill_token_weight": "teacher_confidence"}, {"method": "grpo", "distill_token_weight": "uniform"}])
    assert list(label_arms(frame)["arm"]) == ["srpo", "grpo"]


# ----------------------------------------------------------------------------- the verdict rules
def test_outcome_rule_on_hand_made_differences():
    ci = lambda lo, hi: {"ci": [lo, hi]}  # noqa: E731
    m = SPEED_MARGIN
    assert outcome(ci(-m / 2, 0.1), ci(0.01, 0.2)) == ("keeps speed, avoids collapse", True)
    assert outcome(ci(-2 * m, 0.1), ci(0.01, 0.2)) == ("slower, avoids collapse", False)
    assert outcome(ci(-m / 2, 0.1), ci(-0.01, 0.2)) == ("keeps speed, collapses as SDPO", False)
    assert outcome(ci(-2 * m, 0.0), ci(-0.3, -0.1)) == ("slower, collapses as SDPO", False)
    assert outcome(ci(math.nan, math.nan), ci(0.1, 0.2)) == ("not measured", False)
    assert verdict([True, True]) == HOLDS and verdict([True, False, None]) == CONDITIONAL
    assert verdict([False, None]) == FAILS and verdict([None, None]) == MISSING


def _history(block: str = "main", wide_in: tuple = FEEDBACKS) -> pd.DataFrame:
    """Synthetic history with known answers. SDPO: J = 0.5 + 0.4·(1 − e^(−t/15)), entropy falls with J,
    H = 2 − 3·(J − 0.5). blend: SDPO's J and 0.3 nats more entropy at every J under the channels in ``wide_in``
    (keeps speed, avoids collapse there). grpo: J = 0.5 + 0.4·(1 − e^(−t/60)) (at step 30: 0.157 behind SDPO, far
    beyond the margin) with SDPO's entropy at every J (collapses as SDPO). Seed noise 0.003 in J."""
    rng = np.random.default_rng(0)
    rows = []
    for fb in ("binary", "critique"):
        for arm, tau in (("sdpo", 15.0), ("blend", 15.0), ("grpo", 60.0)):
            method = {"sdpo": "sdpo", "blend": "blend", "grpo": "grpo"}[arm]
            for ts in (0, 1):
                for seed in range(8):
                    run_id = f"{arm}-{fb}-{ts}"
                    for step in range(0, 101, 10):
                        j = 0.5 + 0.4 * (1 - math.exp(-step / tau)) + (rng.normal(0, 0.003) if step else 0.0)
                        h = 2 - 3 * (j - 0.5) + (0.3 if arm == "blend" and fb in wide_in and step else 0.0)
                        rows.append({"block": block, "run_id": run_id, "method": method, "feedback": fb, "task_seed": ts, "seed": seed,
                                     "step": step, "reward": j, "entropy": h, "lr": 0.3, "beta": 1.0})
    return pd.DataFrame(rows)


def _tables(history: pd.DataFrame) -> dict:
    """As the sweep makes them: the per-seed table from the history with run ids made per block (sdpo_sim.sweep)."""
    seeds = per_seed_metrics(history.assign(run_id=history["block"] + "/" + history["run_id"]), budgets=(10, 30, 100, "last"))
    return {"history": history, "seeds": seeds}


def test_verdicts_on_synthetic_tables_with_known_answers():
    study = evaluate(_tables(_history()))
    got = {v.arm: v.verdict for v in study.verdicts}
    assert got == {"grpo": FAILS, "blend": HOLDS}
    rows = study.table.set_index(["arm", "feedback"])
    assert rows.loc[("blend", "critique"), "outcome"] == "keeps speed, avoids collapse"
    assert rows.loc[("grpo", "binary"), "outcome"] == "slower, collapses as SDPO"
    d = rows.loc[("blend", "binary"), "vs_sdpo"]["entropy_matched"]
    assert abs(d["mean"] - 0.3) < 0.02  # 0.3 nats by construction; the crossing step moves by ≤ the 0.003 J noise × 3 nats/J × few
    # the matched level: J_0 + 0.9·(grpo's mean final J − J_0), grpo the weakest arm
    assert abs(study.levels["binary"] - (0.5 + 0.9 * 0.4 * (1 - math.exp(-100 / 60)))) < 0.005


def test_a_channel_that_fails_gives_the_conditional_verdict_and_names_the_one_that_passes():
    study = evaluate(_tables(_history(wide_in=("critique",))))
    blend = next(v for v in study.verdicts if v.arm == "blend")
    assert blend.verdict == CONDITIONAL and blend.passes_under == ["critique"]


def test_robustness_counts_the_tuning_alternatives_that_flip_a_verdict():
    """main@low: blend's entropy advantage gone (so it flips to does not hold); main@high: the same as main."""
    tables = [_history(), _history("main@low", wide_in=()), _history("main@high")]
    study = evaluate(_tables(pd.concat(tables, ignore_index=True)))
    got = {v.arm: v.robustness for v in study.verdicts}
    assert got["grpo"] == "robust (2 of 2)"
    assert got["blend"] == "fragile (1 of 2 stand): does not hold with the smallest near-best lr"
    md = render_markdown(study, {"command": "test", "setting": {}})
    assert "fragile (1 of 2 stand)" in md and "## Verdicts at the tuning alternatives" in md


# ----------------------------------------------------------------------------- bad input
def _bad_spec(tmp_path: Path, change) -> str:
    raw = yaml.safe_load(spec_path("quick").read_text())
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("make, phrase", [
    (lambda tmp: ["--spec", str(tmp / "missing.yaml")], "no such file"),
    (lambda tmp: ["--spec", _bad_spec(tmp, lambda r: r["tuning"].update(per=["method", "feedback"]))], "one shared choice"),
    (lambda tmp: ["--spec", _bad_spec(tmp, lambda r: r["blocks"][0].update(name="other", **{}) or r["tuning"].update(blocks=["other"], alternatives=["other"]))],
     "needs a block named 'main'"),
    (lambda tmp: ["--spec", _bad_spec(tmp, lambda r: r["blocks"][0]["cases"].append({"method": "sdpo", "ref_beta": 0.5}))], "none of the study's arms"),
    (lambda tmp: ["--spec", _bad_spec(tmp, lambda r: r["blocks"][0]["grid"].update(feedback=["binary", "smoke"]))], "feedback"),
    (lambda tmp: ["--workers", "0"], "--workers"),
], ids=["missing-spec", "shared-tuning-key", "no-main-block", "foreign-arm", "bad-feedback", "workers-0"])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(make, phrase, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["variants", *make(tmp_path), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "rep"), "--no-progress"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses by exiting
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and phrase in lines[0] and "Traceback" not in err and out == "", (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command must leave nothing behind"
