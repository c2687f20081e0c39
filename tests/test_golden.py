"""Results are unchanged: the toy world bitwise, the LLM trainer to float32 tolerance (see tests/golden_outputs.py).

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


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden-now")
    compute_in_child(out)
    return out


@pytest.mark.parametrize("table", ["history", "seeds"])
def test_toy_sweep_tables_are_bitwise_unchanged(fresh, table):
    want = pd.read_csv(GOLDEN / f"toy_sweep_{table}.csv")
    got = pd.read_csv(fresh / f"toy_sweep_{table}.csv")
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_toy_run_json_is_bitwise_unchanged(fresh):
    assert json.loads((fresh / "toy_run.json").read_text()) == json.loads((GOLDEN / "toy_run.json").read_text())


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
