"""Calibrated ρ (sdpo_sim/calibration.py): the inverse-interpolation fit, the CI mapping, the out-of-range cases, the toy
measurement against train.run's own feedback-credit metric, the common ρ, and bad inputs of ``sdpo-sim calibrate``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from sdpo_sim.calibration import (
    CalibrationConfig,
    calibrated_rho,
    fit,
    fit_common,
    invert,
    is_monotone,
    map_interval,
    read_credit_truth,
    step0_correlations,
    summarise_curves,
    toy_curves,
)
from sdpo_sim.train import run

GRID = np.round(np.linspace(0, 1, 21), 2)


def test_invert_recovers_the_known_rho_of_a_monotone_curve():
    curve = 0.2 + 0.6 * GRID  # r(ρ) = 0.2 + 0.6ρ: the inverse of 0.5 is 0.5, of 0.35 is 0.25
    assert invert(GRID, curve, 0.5) == (pytest.approx(0.5, abs=1e-12), "ok")
    assert invert(GRID, curve, 0.35) == (pytest.approx(0.25, abs=1e-12), "ok")
    sq = GRID**2  # piecewise-linear between nodes: between ρ = 0.5 (0.25) and 0.55 (0.3025), 0.27 maps to 0.5 + 0.05·0.02/0.0525
    assert invert(GRID, sq, 0.27)[0] == pytest.approx(0.5 + 0.05 * 0.02 / 0.0525, abs=1e-12)
    assert is_monotone(curve) and not is_monotone([0.1, 0.3, 0.2])


def test_values_outside_the_toy_range_are_below_or_above_not_clamped():
    curve = 0.3 + 0.6 * GRID
    rho, status = invert(GRID, curve, -0.1)
    assert status == "below" and math.isnan(rho)
    assert invert(GRID, curve, 0.95)[1] == "above"
    assert invert(GRID, np.full(21, 0.5), 0.5)[1] == "not identifiable"  # a flat curve says nothing about ρ
    assert invert(GRID, np.full(21, 0.5), 0.1)[1] == "below"  # ... but a value under it is still under every teacher
    assert invert(GRID, curve, math.nan)[1] == "missing"


def test_bootstrap_replicates_map_through_the_same_inverse():
    curve = 0.2 + 0.5 * GRID  # ρ = (r − 0.2) / 0.5
    reps = np.linspace(0.25, 0.65, 101)
    lo, hi, source = map_interval(GRID, curve, replicates=reps)
    q = np.quantile(reps, [0.025, 0.975], method="lower")  # an order statistic of the replicates, mapped
    assert source == "replicates" and (lo, hi) == (pytest.approx((q[0] - 0.2) / 0.5, abs=1e-12), pytest.approx((q[1] - 0.2) / 0.5, abs=1e-12))
    # endpoints: a monotone map commutes with the percentile
    lo2, hi2, source2 = map_interval(GRID, curve, lo=q[0], hi=q[1])
    assert (lo2, hi2) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12)) and "endpoints" in source2
    # replicates under the curve's range keep their place at the bottom: the lower bound is below the toy's range
    lo3, hi3, _ = map_interval(GRID, curve, replicates=np.r_[np.full(10, 0.0), np.linspace(0.3, 0.6, 90)])
    # 100 mapped values, 10 of them −∞: the 97.5% "lower" order statistic is sorted index floor(0.975·99) = 96, the 87th
    # of the 90 finite ones (index 86), ρ = (0.3 + 86·0.3/89 − 0.2) / 0.5
    assert lo3 == -math.inf and hi3 == pytest.approx((0.3 + 86 * 0.3 / 89 - 0.2) / 0.5, abs=1e-12)


def test_one_rho_for_all_channels_by_least_squares():
    curves = {"a": GRID, "b": GRID + 0.1}
    res = fit_common(GRID, curves, {"a": 0.4, "b": 0.6})  # argmin (ρ − 0.4)² + (ρ − 0.5)² = 0.45
    assert res["rho"] == pytest.approx(0.45, abs=1e-9)
    assert res["residuals"] == {"a": pytest.approx(-0.05, abs=1e-9), "b": pytest.approx(0.05, abs=1e-9)}
    assert res["rms"] == pytest.approx(0.05, abs=1e-9)


def test_step0_measurement_is_train_runs_feedback_credit_metric():
    cfg = CalibrationConfig(task_seeds=1, seeds=3, batch_size=16, vocab_size=4, seq_len=4).run_config("continuous", 0, rho=0.5)
    d = step0_correlations(cfg, [0.0, 0.5, 1.0])
    h = run(cfg.replace(steps=1, eval_every=1)).history
    want = h[h.step == 0].sort_values("seed").feedback_credit_pearson.to_numpy()
    # train.run forms the credit from float32 logits; here the same logits are log-softmaxed in float64: float32 rounding
    # of logits ~1 (eps 1.2e-7) through a Pearson of 64 tokens stays far under 1e-4
    np.testing.assert_allclose(d[d.rho == 0.5].sort_values("seed").advantage.to_numpy(), want, atol=1e-4)
    means = d.groupby("rho")[["counterfactual", "advantage"]].mean()
    assert means.counterfactual.is_monotonic_increasing and means.counterfactual.iloc[-1] > 0.9  # ρ = 1 knows c exactly


def test_fit_on_a_tiny_world_and_the_calibrated_rho(tmp_path):
    config = CalibrationConfig(task_seeds=1, seeds=2, batch_size=16, vocab_size=4, seq_len=4)
    curves = summarise_curves(toy_curves(config, ["binary"], [0, 2], [0.0, 0.5, 1.0], progress=False))
    assert set(curves.step) == {0, 2} and set(curves[curves.step == 2].truth) == {"advantage"}
    mid = float(curves[(curves.step == 0) & (curves.truth == "counterfactual")].r.mean())
    llm = read_credit_truth(_credit_truth(tmp_path, r=mid))
    res = fit(llm, curves)
    row = next(f for f in res["per_channel"] if f["step"] == 0 and f["truth"] == "counterfactual")
    assert row["status"] == "ok" and 0 < row["rho_hat"] < 1 and "endpoints" in row["ci_source"]
    assert calibrated_rho({"fit": res}, "binary")[0] == pytest.approx(row["rho_hat"])
    low = fit(read_credit_truth(_credit_truth(tmp_path, r=-0.5)), curves)
    row = next(f for f in low["per_channel"] if f["step"] == 0 and f["truth"] == "counterfactual")
    assert row["status"] == "below" and row["rho_hat"] is None and row["rho_ci"] == ["below", "below"]
    assert calibrated_rho({"fit": low}, "binary")[1].startswith("below")
    with pytest.raises(ValueError, match="not calibrated"):
        calibrated_rho({"fit": low}, "critique")


def _credit_truth(tmp_path, r: float, channel: str = "binary"):
    rows = [{"channel": channel, "step": s, "ground_truth": gt, "estimator": est, "r": r, "ci_lo": r - 0.1, "ci_hi": r + 0.1, "completions": 64,
             "tokens": 373} for s in (0, 2) for gt, est in (("counterfactual", "pearson"), ("advantage_mc", "disattenuated"))]
    path = tmp_path / f"ct-{r}.json"
    path.write_text(json.dumps({"settings": {}, "rows": rows}))
    return path


def test_bad_credit_truth_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_credit_truth(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        read_credit_truth(tmp_path / "bad.json")
    (tmp_path / "norows.json").write_text(json.dumps({"rows": [{"r": 1}]}))
    with pytest.raises(ValueError, match="no `rows` list"):
        read_credit_truth(tmp_path / "norows.json")


@pytest.mark.parametrize("args, says", [
    (["--credit-truth", "MISSING"], "does not exist"),
    (["--credit-truth", "CT", "--scale", "huge"], "invalid choice"),
    (["--credit-truth", "CT", "--llm-grid", "MISSING"], "not an sdpo-llm grid directory"),
])
def test_the_command_refuses_bad_input_with_one_line_before_creating_anything(tmp_path, args, says):
    ct = _credit_truth(tmp_path, r=0.1)
    args = [str(tmp_path / "missing") if a == "MISSING" else str(ct) if a == "CT" else a for a in args]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sdpo_sim", "calibrate", *args, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
