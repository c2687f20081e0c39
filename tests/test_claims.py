"""The claims pipeline end to end at the quick scale, and the verdict rules on synthetic tables with known answers."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sdpo_sim.claims import (
    CONDITIONAL,
    FAILS,
    HOLDS,
    MISSING,
    VALUE_FORMATS,
    Claim,
    Condition,
    evaluate,
    render_markdown,
    run_claims,
)
from sdpo_sim.claims.measure import claim_margin, claim_noise, claim_richness, claim_separation, robustness
from sdpo_sim.claims.report import STYLES
from sdpo_sim.provenance import code_hash


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    return out, run_claims("quick", out=out / "sweep", report_dir=out, workers=1, progress=False, figures=False)  # figures: test_plots


def test_quick_claims_write_a_row_per_claim_with_values_cis_and_verdicts(quick):
    out, res = quick
    assert res["sweep"].failed == []
    ids = [c.id for c in res["claims"]]
    assert ids == ["C1", "C2", "C3", "C4a", "C4b", "C5", "C6", "C7"]
    for c in res["claims"]:
        assert c.verdict in (HOLDS, CONDITIONAL, FAILS), (c.id, c.verdict)  # every block of the quick spec is present
        assert all(np.isfinite(x.value) or c.id == "C7" for x in c.conditions)
    md = (out / "CLAIMS.md").read_text()
    for cid in ids:
        assert f"| {cid} |" in md
    assert "Where the study's numbers come from" in md and "seed-paper" in md
    data = json.loads((out / "CLAIMS.json").read_text())
    assert [c["id"] for c in data["claims"]] == ids and data["tuning"]["selected"]
    assert {r["block"] for r in data["seed_paper_replica"]} >= {"seed_paper", "teachers", "main"}
    assert data["meta"]["git_commit"] and data["meta"]["package_version"]
    assert data["meta"]["code_hash"] == data["meta"]["report_code_hash"] == code_hash()  # every run and the report: this code
    assert "## Across tasks (block main)" in md
    rows = data["meta"]["aggregates"]
    assert {r["method"] for r in rows} >= {"sdpo", "reinforce"} and all(r["n_tasks"] >= 1 for r in rows)
    assert all((r["p_sdpo_better"] is None) == (r["method"] == "sdpo") for r in rows)
    alts = data["tuning"]["alternatives"]
    assert set(alts) == {"other", "low", "high"} and data["tuning"]["alternative_blocks"] == ["main"]
    blocks = set(res["sweep"].summary["block"])
    assert {"main@other", "main@low", "main@high"} <= blocks  # block main again at each alternative choice
    for c in res["claims"]:  # the claims of block main alone count the three tuning alternatives (quick has no main_motif/main_live)
        if c.id in ("C1", "C3", "C7"):
            assert re.match(r"(robust \(3 of 3\)|fragile \([0-2] of 3 stand\))", c.robustness), (c.id, c.robustness)
    assert "| method | chosen | other | low | high |" in md and "near-best meaning a tuning score within 0.05 of the best" in md
    c2 = next(c for c in res["claims"] if c.id == "C2")
    assert "feedback credit" in c2.metric and all("distillation signal" in x.note for x in c2.conditions)


def test_claims_resume_without_rerunning(quick):
    out, _ = quick
    res = run_claims("quick", out=out / "sweep", report_dir=out / "again", workers=1, progress=False, figures=False)
    assert res["sweep"].counts["ok"] == 0 and res["sweep"].counts["skipped"] == res["sweep"].counts["total"]


def test_verdict_rule():
    c = Claim("X", "s", "v", "m", "r", "set", "number")
    assert c.verdict == MISSING
    c.conditions = [Condition("a", 1, 0, 2, 3, True), Condition("b", 1, 0, 2, 3, False)]
    assert c.verdict == CONDITIONAL
    c.conditions[1].passes = True
    assert c.verdict == HOLDS


def test_a_claim_refuses_an_unknown_value_format():
    with pytest.raises(ValueError, match=r"claim X: value_format='pct' is not allowed; choose one of 'number', 'signed', 'percent', 'step'"):
        Claim("X", "s", "v", "m", "r", "set", "pct")


def test_every_value_format_has_a_style_in_the_report():
    assert set(STYLES) == set(VALUE_FORMATS)


@pytest.mark.parametrize("value_format, value, summary, detail", [
    ("number", 0.7341, "0.734", "0.734"),
    ("signed", 0.15, "+0.150", "0.150"),  # the sign only in the summary table
    ("signed", -0.02, "-0.020", "-0.020"),
    ("percent", 0.15, "15.0%", "15.0%"),
    ("step", 20.0, "step 20", "20"),
    ("step", float("nan"), "never", "never"),
])
def test_the_report_writes_each_value_format_as_documented(value_format, value, summary, detail):
    c = Claim("X", "s", "v", "m", "r", "set", value_format, [Condition("feedback=binary", value, 0.1, 0.2, 5, True, "a note")])
    md = render_markdown([c], [], {})
    ci = "[10.0%, 20.0%]" if value_format == "percent" else "[0.100, 0.200]"
    assert f"| X | s | binary: {summary} | {'—' if value_format == 'step' else ci} | set | **holds** |" in md
    assert f"| feedback=binary | {detail} | {ci} | 5 | yes | a note |" in md


def test_every_measured_claim_says_how_its_value_is_shown(quick):
    _, res = quick
    assert {c.id: c.value_format for c in res["claims"]} == {"C1": "signed", "C2": "number", "C3": "percent", "C4a": "signed", "C4b": "signed",
                                                            "C5": "percent", "C6": "signed", "C7": "step"}
    data = json.loads((quick[0] / "CLAIMS.json").read_text())
    assert [c["value_format"] for c in data["claims"]] == [c.value_format for c in res["claims"]]


def _seeds(margin: float, noise_loss: float = 0.0, baselines: dict | None = None) -> pd.DataFrame:
    """Synthetic per-seed table: ``baselines`` maps a baseline to (reward bonus, relative loss at noise 0.3);
    SDPO gets ``margin`` and ``noise_loss``."""
    baselines = {"reinforce": (0.0, 0.0)} if baselines is None else baselines
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(10):
        base = 0.7 + rng.normal(0, 0.02)
        for method, (bonus, loss) in {**baselines, "sdpo": (margin, noise_loss)}.items():
            for noise, block in ((0.0, "main"), (0.3, "noise")):
                reward = (base + bonus + rng.normal(0, 0.005)) * (1 - (loss if noise else 0.0))
                rows.append({"block": block, "run_id": f"{method}{noise}", "seed": seed, "task_seed": 0, "method": method, "controller": "constant",
                             "feedback": "critique", "noise": noise, "final_reward": reward, "auc": reward - 0.1})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("margin, verdict", [(0.15, HOLDS), (0.0, FAILS), (0.4, FAILS)])
def test_margin_claim_follows_the_measurement(margin, verdict):
    assert claim_margin(_seeds(margin)).verdict == verdict


def test_margin_is_measured_against_the_best_baseline():
    # SDPO is 0.15 above REINFORCE (in the claimed range) but only 0.05 above GRPO: the claim must not pass
    c = claim_margin(_seeds(0.15, baselines={"reinforce": (0.0, 0.0), "grpo": (0.10, 0.0)}))
    assert c.verdict == FAILS and c.conditions[0].value == pytest.approx(0.05, abs=0.01)
    assert "vs grpo (best)" in c.conditions[0].note and "vs reinforce:" in c.conditions[0].note


@pytest.mark.parametrize("sdpo_loss, baseline_loss, verdict", [
    (0.01, 0.10, HOLDS),  # small loss, and smaller than the baseline's
    (0.01, 0.01, FAILS),  # small, but the baseline degrades as little: not SDPO's grace
    (0.20, 0.30, FAILS),  # less than the baseline, but far from 2.6%
])
def test_noise_claim_needs_a_small_loss_and_less_than_the_baselines(sdpo_loss, baseline_loss, verdict):
    c = claim_noise(_seeds(0.1, sdpo_loss, baselines={"reinforce": (0.0, baseline_loss)}))
    assert c.verdict == verdict and c.conditions[0].value == pytest.approx(sdpo_loss, abs=0.02)


def test_noise_claim_cannot_pass_without_a_baseline():
    c = claim_noise(_seeds(0.1, 0.0, baselines={}))
    assert c.verdict == FAILS and "no baseline" in c.conditions[0].note


def _richness(gaps: dict) -> pd.DataFrame:
    """SDPO's final reward per feedback type: binary 0.5, then each adjacent step adds gaps[step] (± small noise)."""
    rng = np.random.default_rng(1)
    rows, level = [], {"binary": 0.5}
    for lo, hi in zip(("binary", "ordinal", "continuous"), ("ordinal", "continuous", "critique")):
        level[hi] = level[lo] + gaps[hi]
    for seed in range(10):
        for fb, value in level.items():
            rows.append({"block": "main", "run_id": fb, "seed": seed, "task_seed": 0, "method": "sdpo", "controller": "constant",
                         "teacher_kind": "ema", "feedback": fb, "final_reward": value + rng.normal(0, 0.002)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gaps, verdict", [
    ({"ordinal": 0.05, "continuous": 0.05, "critique": 0.05}, HOLDS),
    ({"ordinal": 0.05, "continuous": -0.01, "critique": 0.0}, FAILS),  # one step of three passes: not monotone
])
def test_monotone_needs_every_adjacent_step(gaps, verdict):
    c = claim_richness(_richness(gaps), "final_reward", "C4a", "quality")
    assert c.verdict == verdict and len(c.conditions) == 1
    assert c.conditions[0].value == pytest.approx(min(gaps.values()), abs=0.01)


def _history(lead: dict) -> pd.DataFrame:
    """Reward curves 0.5 + step/1000; from step 20 on SDPO gains 0.1 and baseline b gains 0.1 − lead[b] (SDPO leads b by lead[b])."""
    rng = np.random.default_rng(2)
    rows = []
    for seed in range(10):
        for step in range(0, 101, 10):
            for method in ("reinforce", "grpo", "sdpo"):
                gain = (0.1 if method == "sdpo" else 0.1 - lead[method]) if step >= 20 else 0.0
                rows.append({"block": "main", "run_id": method, "seed": seed, "task_seed": 0, "method": method, "controller": "constant",
                             "feedback": "critique", "step": step, "reward": 0.5 + step / 1000 + gain + rng.normal(0, 0.002)})
    return pd.DataFrame(rows)


def test_separation_is_from_every_baseline():
    # SDPO leads REINFORCE by 0.1 from step 20 but only ties GRPO: it has not separated from the baselines
    c = claim_separation(_history({"reinforce": 0.1, "grpo": 0.0}))
    assert c.verdict == FAILS and "vs reinforce: separates at step 20" in c.conditions[0].note and "vs grpo: never" in c.conditions[0].note
    c = claim_separation(_history({"reinforce": 0.1, "grpo": 0.05}))
    assert c.verdict == HOLDS and c.conditions[0].value == 20


def test_evaluate_refuses_an_empty_sweep():
    with pytest.raises(ValueError, match="no finished runs"):
        evaluate({"seeds": pd.DataFrame(), "history": pd.DataFrame()})


def test_claims_command_quick_reports_and_records_walltime(quick, capsys, monkeypatch):
    from sdpo_sim.cli import main

    out, _ = quick
    # every run is already done, so the real wall time can round to 0.0 s on a fast machine: a clock that
    # advances 1 s per reading makes the recorded figure positive however fast the machine is
    monkeypatch.setattr(time, "perf_counter", itertools.count(0.0, 1.0).__next__)
    code = main(["claims", "--quick", "--out", str(out / "sweep"), "--report", str(out / "cli"), "--no-figures", "--workers", "1",
                 "--no-progress", "--record-walltime", str(out / "wall.json")])
    text = capsys.readouterr().out
    assert code == 0 and "C1" in text and "C7" in text and (out / "cli" / "CLAIMS.md").is_file()
    record = json.loads((out / "wall.json").read_text())
    settings, (fig,) = record["settings"], record["figures"]
    assert record["wall_time_s"] > 0 and settings["runs"] == settings["skipped_already_done"] and "--scale quick" in settings["command"]
    assert fig["value"] == record["wall_time_s"] and fig["unit"] == "s" and fig["target"] is None  # a budget only for canonical
    assert record["name"] == "wall" and record["created"].endswith("Z")  # the file's stem, as run_all names results


def test_walltime_record_has_the_canonical_budget_as_its_target():
    from types import SimpleNamespace

    from sdpo_sim.commands.claims import walltime_record

    res = {"wall_time_s": 950.04, "sweep": SimpleNamespace(counts={"total": 82, "ok": 80, "skipped": 2}, tuning={"runs": 24})}
    record = walltime_record(SimpleNamespace(scale="canonical", workers=2, record_walltime="results/claims_walltime.json"), res)
    (fig,) = record["figures"]
    assert fig["target"] == "<= 1" and fig["met"] is False and fig["ratio"] == pytest.approx(950.0 / 900, abs=1e-3)
    assert "82 runs + 24 tuning runs" in fig["figure"] and record["name"] == "claims_walltime"
    assert record["settings"]["tuning_runs"] == 24 and "80 runs ran" in fig["note"]


@pytest.mark.parametrize("lead, expected", [({0: 0.0, 10: 0.0, 20: 0.1, 30: 0.1, 40: 0.0}, 20.0),  # ahead from 20, a tie at saturation is fine
                                            ({0: 0.0, 10: 0.1, 20: 0.1, 30: -0.1, 40: -0.1}, None)])  # ahead early, then behind: never
def test_separation_requires_staying_ahead(lead, expected):
    rng = np.random.default_rng(3)
    rows = [{"block": "main", "run_id": m, "method": m, "controller": "constant", "feedback": "critique", "task_seed": 0, "seed": seed, "step": step,
             "reward": 0.5 + step / 100 + (d if m == "sdpo" else 0.0) + rng.normal(0, 0.005)}
            for m in ("sdpo", "reinforce") for seed in range(8) for step, d in lead.items()]
    cond = claim_separation(pd.DataFrame(rows)).conditions[0]
    assert (cond.value == expected) if expected is not None else np.isnan(cond.value)


def test_the_committed_report_was_made_by_the_current_code():
    """Fresh by construction: the committed CLAIMS.md/CLAIMS.json must come from the code that is here now (every run of
    the sweep and the report itself), as ``sdpo_sim.provenance.code_hash`` sees it (docstrings, comments, help texts
    and the command line do not count)."""
    root = Path(__file__).resolve().parents[1]
    meta = json.loads((root / "CLAIMS.json").read_text())["meta"]
    now = code_hash()
    assert meta.get("code_hash") == now and meta.get("report_code_hash") == now, (
        f"CLAIMS.json was made by code {meta.get('code_hash')} (runs) / {meta.get('report_code_hash')} (report), the code here is "
        f"{now}: regenerate it from the repository root with `sdpo-sim claims --out <a new directory> --report . --figures figures`")
    assert f"code hash of the runs `{now}`" in (root / "CLAIMS.md").read_text()


def _with_alternative(seeds: pd.DataFrame, block: str, margin: float, arms=("sdpo",)) -> pd.DataFrame:
    """``seeds`` plus a copy of block main's rows of ``arms`` as ``block``, SDPO's final reward moved to ``margin`` over REINFORCE."""
    alt = seeds[(seeds.block == "main") & seeds.method.isin(arms)].copy()
    rf = seeds[(seeds.block == "main") & (seeds.method == "reinforce")].set_index("seed")["final_reward"]
    alt["final_reward"] = alt["seed"].map(rf) + margin
    alt["block"], alt["run_id"] = block, alt["run_id"] + "-" + block
    return pd.concat([seeds, alt], ignore_index=True)


def test_robustness_names_the_alternative_that_flips_a_verdict():
    # every column the claims read (only C1's values matter here)
    seeds = _seeds(0.15).assign(entropy_drop=0.5, entropy=1.0, credit_corr=0.5, feedback_credit_corr=0.5, teacher_kind="ema")
    claims = [claim_margin(seeds)]
    robustness(claims, seeds, pd.DataFrame())
    assert claims[0].verdict == HOLDS and claims[0].robustness == "not measured"  # no alternative was run
    flipped = _with_alternative(seeds, "main_live", 0.0)  # with a live teacher SDPO's margin vanishes
    claims = [claim_margin(flipped)]
    robustness(claims, flipped, pd.DataFrame())
    assert claims[0].verdict == HOLDS and claims[0].robustness == "fragile (0 of 1 stand): does not hold with a live teacher"
    stands = _with_alternative(seeds, "main_live", 0.15)
    claims = [claim_margin(stands)]
    robustness(claims, stands, pd.DataFrame())
    assert claims[0].robustness == "robust (1 of 1)"


def test_robustness_counts_the_tuning_alternatives_of_the_blocks_that_ran_them():
    seeds = _seeds(0.15).assign(entropy_drop=0.5, entropy=1.0, credit_corr=0.5, feedback_credit_corr=0.5, teacher_kind="ema")
    # main@low: every arm of main again (at another lr), SDPO's margin gone; main@high: the margin kept
    low = _with_alternative(seeds, "main@low", 0.0, arms=("sdpo",))
    low = pd.concat([low, seeds[(seeds.block == "main") & (seeds.method != "sdpo")].assign(block="main@low")], ignore_index=True)
    both = pd.concat([low, seeds[seeds.block == "main"].assign(block="main@high")], ignore_index=True)
    claims = [claim_margin(both)]
    robustness(claims, both, pd.DataFrame())
    assert claims[0].verdict == HOLDS  # the default choice's verdict: the alternative blocks are not block main
    assert claims[0].robustness == "fragile (1 of 2 stand): does not hold with the smallest near-best lr"
