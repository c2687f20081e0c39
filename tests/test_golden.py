"""Results are unchanged: the toy world bitwise (to float32 training's rounding bound on another machine), the LLM trainer to float32 tolerance (see tests/golden_outputs.py).

The outputs are recomputed in a child process with CPU-independent float settings and compared with the committed
``tests/golden/``. A change that is meant to change results regenerates them (``tests/golden_outputs.py --write``).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from golden_outputs import GOLDEN, compute_in_child

# LLM metrics that come from sampled tokens and counts: equal, or the run took another path.
LLM_EXACT = ("step", "judge_failures", "nonfinite_steps", "response_length", "reward", "demo_fraction", "distill_fraction")
# tiny-cpu: 4 prompts × 4 generations × ≤ 10 new tokens × a 104-token vocabulary = 16,640 terms in the largest
# float32 sum behind a metric. Reordering such a sum moves it by at most n·2^-23 relative (the worst-case bound of
# recursive summation); the same code in the pinned environment gives the same bits, so this bound only matters when
# a refactor reorders arithmetic, and it is still ~500× tighter than a dropped term or a factor of two would show.
LLM_RTOL = 4 * 4 * 10 * 104 * 2.0 ** -23
# The quick toy sweep on a machine other than the one that wrote the goldens (golden/machine.json): its float32 training
# rounds differently in the last bits. The largest float32 sum of a step is over B·T·V = 16·4·4 = 256 terms (relative
# error ≤ 256·2^-23 by recursive summation) and a run takes 30 steps, each carrying the last one's error forward: a
# relative drift ≤ 30·256·2^-23 ≈ 9.2e-4, applied to every metric with the same absolute floor (correlations near 0).
# credit_spearman is left out there: ranks of A*'s float64 ties change with any rounding (it is not continuous).
TOY_RTOL = 30 * 16 * 4 * 4 * 2.0 ** -23
TOY_DISCONTINUOUS = ("credit_spearman",)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden-now")
    compute_in_child(out)
    return out


def _same_machine(fresh) -> bool:
    """Whether this machine is the one that wrote the goldens (then the toy world must match bit for bit)."""
    return json.loads((fresh / "machine.json").read_text()) == json.loads((GOLDEN / "machine.json").read_text())


def _close(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=TOY_RTOL, abs_tol=TOY_RTOL)
    return got == want


@pytest.mark.parametrize("table", ["history", "seeds"])
def test_toy_sweep_tables_are_unchanged(fresh, table):
    want = pd.read_csv(GOLDEN / f"toy_sweep_{table}.csv")
    got = pd.read_csv(fresh / f"toy_sweep_{table}.csv")
    if _same_machine(fresh):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        return
    keep = [c for c in want.columns if c not in TOY_DISCONTINUOUS]
    pd.testing.assert_frame_equal(got[keep], want[keep], check_exact=False, rtol=TOY_RTOL, atol=TOY_RTOL)


def test_toy_run_json_is_unchanged(fresh):
    got, want = json.loads((fresh / "toy_run.json").read_text()), json.loads((GOLDEN / "toy_run.json").read_text())
    if _same_machine(fresh):
        assert got == want
        return
    assert sorted(got) == sorted(want) and len(got["per_seed"]) == len(want["per_seed"])
    pairs = [(k, got[k], want[k]) for k in want if k != "per_seed"]
    pairs += [(f"per_seed[{i}].{k}", g[k], w[k]) for i, (g, w) in enumerate(zip(got["per_seed"], want["per_seed"])) for k in w]
    assert all(_close(g, w) for _, g, w in pairs), [p for p in pairs if not _close(p[1], p[2])]


def test_machine_fingerprint_names_the_arithmetic(fresh):
    """The record that decides bitwise vs rounding-bound comparison says what it must (torch, CPU, C library)."""
    record = json.loads((fresh / "machine.json").read_text())
    assert record["torch"] and record["torch_build"] and record["cpu"]["model"] and "libc" in record


def test_llm_two_steps_are_unchanged(fresh):
    want = json.loads((GOLDEN / "llm_steps.json").read_text())
    got = json.loads((fresh / "llm_steps.json").read_text())
    assert [sorted(r) for r in got] == [sorted(r) for r in want], "metric names changed"
    for g, w in zip(got, want):
        for key, value in w.items():
            if key in LLM_EXACT or not isinstance(value, float):
                assert g[key] == value, (w["step"], key)
            else:
                assert math.isclose(g[key], value, rel_tol=LLM_RTOL, abs_tol=1e-12), (w["step"], key, g[key], value)
