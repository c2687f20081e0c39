"""run(): every method through one loop, reproducibility, the controls, RunConfig and the `run` command."""

import json
import math

import numpy as np
import pytest

from sdpo_sim.cli import main as cli_main
from sdpo_sim.train import DEFAULT_LR, HISTORY_COLUMNS, RunConfig, group_key, run, run_group

SMALL = dict(vocab_size=4, seq_len=4, seeds=2, steps=6, eval_every=3, batch_size=16)


def small(**kw) -> RunConfig:
    return RunConfig.from_dict({**SMALL, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="reinforce"),
        dict(method="grpo", feedback="binary"),
        dict(method="sdpo", support="full", teacher_kind="live", feedback="ordinal"),
        dict(method="sdpo", support="topk", topk=2, alpha=0.5, teacher_kind="ema", feedback="critique", hint_noise=0.1),
        dict(method="sdpo", support="sampled", teacher_kind="frozen", teacher="null", rho=0.0),
        dict(method="sdpo", teacher_kind="trust_region", teacher="seed-paper"),
        dict(method="sdpo", feedback="demo", teacher="demo", alpha=0.0),
        dict(method="sdpo", teacher="oracle", policy="factored", optimizer="sgd", lr=0.5),
        dict(method="hybrid", controller="constant", alpha_mix=0.3),
        dict(method="hybrid", controller="divergence", divergence_tau=0.05),
        dict(method="hybrid", controller="entropy", entropy_target=1.0),
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_every_method_runs_and_logs_every_metric(kw):
    result = run(small(**kw))
    h = result.history
    assert tuple(h.columns) == HISTORY_COLUMNS
    assert sorted(h.step.unique().tolist()) == [0, 3, 6] and sorted(h.seed.unique().tolist()) == [0, 1]
    for col in ("reward", "entropy", "seq_entropy", "kl_init", "credit_pearson", "grad_cos"):
        assert h[col].notna().all(), col
    assert (h[h.step == 0].kl_init.abs() < 1e-12).all()
    assert h.entropy.le(math.log(4) + 1e-9).all()
    distills = kw["method"] in ("sdpo", "hybrid")
    assert h.divergence.notna().all() == distills and h.divergence.isna().all() != distills
    assert h.alpha_mix.notna().all() == (kw["method"] == "hybrid")
    if kw["method"] == "hybrid":
        assert h.alpha_mix.between(0, 1).all()
    if kw["method"] in ("reinforce", "grpo"):
        assert h.credit_pearson_within.isna().all()  # one credit per completion: undefined within it
    s = result.summary()
    assert set(s) >= {"final_reward", "final_reward_ci95", "credit_corr", "entropy", "per_seed", "config"}
    assert [p["seed"] for p in s["per_seed"]] == [0, 1]
    assert RunConfig.from_dict(s["config"]) == result.config


def test_same_seed_bit_identical_and_different_seeds_differ():
    cfg = small(method="hybrid", controller="divergence", feedback="critique", noise=0.05, hint_noise=0.05, teacher="null", rho=0.0)
    a, b = run(cfg).history, run(cfg).history
    assert a.equals(b)
    c = run(cfg.replace(seed_start=2)).history
    assert not np.allclose(a.reward[a.step > 0], c.reward[c.step > 0])
    assert a[a.seed == 0].reward.iloc[-1] != a[a.seed == 1].reward.iloc[-1]
    # a seed's run does not depend on how many seeds share the tensor
    alone = run(cfg.replace(seed_start=1, seeds=1)).history
    assert np.allclose(alone.reward, a[a.seed == 1].reward, atol=1e-6)


def test_methods_learn_on_a_small_task():
    for method, kw in (("reinforce", {}), ("sdpo", dict(rho=0.5)), ("grpo", {})):
        h = run(small(method=method, steps=60, eval_every=60, seeds=2, **kw)).history
        gain = h[h.step == 60].reward.mean() - h[h.step == 0].reward.mean()
        assert gain > 0.1, (method, gain)


def test_oracle_credit_is_the_exact_advantage():
    h = run(RunConfig.from_dict(dict(method="sdpo", teacher="oracle", teacher_kind="live", seeds=2, steps=10, eval_every=5))).history
    assert (h.credit_pearson > 0.95).all(), h.credit_pearson.tolist()


def test_null_teacher_without_self_knowledge_has_no_credit_signal():
    h = run(RunConfig.from_dict(dict(method="sdpo", teacher="null", rho=0.0, seeds=4, steps=1, batch_size=1024))).history.query('step == 0')
    assert abs(h.credit_pearson.mean()) < 0.05, h.credit_pearson.tolist()
    # the same rollouts with their own feedback do carry signal
    own = run(RunConfig.from_dict(dict(method="sdpo", teacher="bayes", rho=0.0, seeds=4, steps=1, batch_size=1024))).history.query('step == 0')
    assert own.credit_pearson.mean() > 0.2


CONTROL = dict(method="sdpo", seeds=8, steps=30, eval_every=5, feedback="continuous")


@pytest.mark.parametrize("teacher_kind", ["live", "ema", "frozen", "trust_region"])
def test_controls_hold_on_feedback_credit_for_every_teacher_kind(teacher_kind):
    """The feedback credit (teacher with feedback vs the same network without it) carries no teacher lag, so the
    controls must hold under every teacher kind: the oracle's > 0.9, the null control's (ρ = 0) ≈ 0.

    Tolerance of the null: one correlation pools 32 × 6 = 192 tokens, standard error ≈ 1/√192 = 0.072; the
    mean over 8 seeds × 7 evaluation steps = 56 nearly independent batches has s.e. ≈ 0.0096, so ±0.05 is
    five standard errors."""
    oracle = run(RunConfig.from_dict({**CONTROL, "teacher": "oracle", "teacher_kind": teacher_kind})).history
    assert oracle.feedback_credit_pearson.mean() > 0.9, oracle.feedback_credit_pearson.describe()
    null = run(RunConfig.from_dict({**CONTROL, "teacher": "null", "rho": 0.0, "teacher_kind": teacher_kind})).history
    assert abs(null.feedback_credit_pearson.mean()) < 0.05, null.feedback_credit_pearson.describe()
    if teacher_kind == "live":  # a live teacher has no lag: the two credits are the same numbers
        assert np.allclose(oracle.feedback_credit_pearson, oracle.credit_pearson, equal_nan=True)


def test_the_distillation_signal_of_a_lagging_teacher_is_not_feedback_credit():
    """Under EMA the update's signal log p_T − log p_θ includes the lag between teacher network and student; the
    feedback credit does not. With the oracle teacher this is visible as a lower correlation of the signal."""
    h = run(RunConfig.from_dict({**CONTROL, "teacher": "oracle", "teacher_kind": "ema", "steps": 60})).history.query("step > 0")
    assert h.feedback_credit_pearson.mean() > h.credit_pearson.mean() + 0.1, (h.feedback_credit_pearson.mean(), h.credit_pearson.mean())


def test_policy_gradient_methods_have_no_feedback_credit():
    h = run(RunConfig.from_dict(dict(method="grpo", seeds=2, steps=2, eval_every=1))).history
    assert h.feedback_credit_pearson.isna().all() and h.credit_pearson.notna().all()


def test_config_round_trip_and_nested_method():
    cfg = RunConfig.from_dict({"method": "hybrid", "controller": "entropy", "entropy_target": 1.5, "noise": 0.1, "seeds": 3})
    assert cfg.method.controller == "entropy" and cfg.noise == 0.1 and cfg.lr == DEFAULT_LR["hybrid"]
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    nested = RunConfig.from_dict({"method": {"name": "sdpo", "alpha": 0.5}, "rho": 0.2})
    assert nested.method.alpha == 0.5 and nested.rho == 0.2


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "ppo"}, "'reinforce', 'grpo', 'sdpo', 'hybrid'"),
        ({"teacher": "sage"}, "'bayes', 'demo', 'oracle', 'null', 'seed-paper'"),
        ({"feedback": "stars"}, "'binary', 'ordinal', 'continuous', 'critique', 'demo'"),
        ({"policy": "lstm"}, "'markov', 'factored'"),
        ({"noise": -0.1}, "noise"),
        ({"hint_noise": -1.0}, "hint_noise"),
        ({"rho": 1.5}, r"rho.*\[0, 1\]"),
        ({"lr": 0.0}, "lr"),
        ({"beta": -1.0}, "beta"),
        ({"batch_size": 12}, "multiple of num_generations"),
        ({"teacher": "demo"}, "feedback='demo'"),
        ({"teacher": "null"}, r"RunConfig.rho=0.5 must be 0 with teacher=.null.: .* would not be a control"),
        ({"vocab_size": 16, "seq_len": 8}, "MAX_SEQUENCES"),
        ({"colour": "red"}, "unknown RunConfig field.*'colour'"),
    ],
)
def test_bad_input_is_refused_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(bad)


def test_cli_json(capsys):
    assert cli_main(["run", "--method", "grpo", "--seeds", "2", "--steps", "3", "--vocab-size", "4", "--seq-len", "3",
                     "--batch-size", "8", "--eval-every", "2", "--no-add-tail", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["method"] == "grpo" and out["config"]["add_tail"] is False and out["config"]["eval_every"] == 2
    assert len(out["per_seed"]) == 2 and 0 <= out["final_reward"] <= 1
    assert cli_main(["run", "--rho", "2"]) == 2
    assert "rho" in capsys.readouterr().err


def test_cli_table(capsys):
    assert cli_main(["run", "--method", "sdpo", "--seeds", "2", "--steps", "2", "--vocab-size", "4", "--seq-len", "3",
                     "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "final reward" in out and "credit_pearson" in out


GROUP_CASES = [
    dict(method="sdpo", feedback="critique", teacher="bayes"),
    dict(method="hybrid", controller="divergence", feedback="binary", teacher="bayes", teacher_kind="live"),
    dict(method="grpo", feedback="ordinal"),
    dict(method="sdpo", feedback="demo", teacher="demo", teacher_kind="trust_region"),
    dict(method="sdpo", feedback="continuous", teacher="oracle", teacher_kind="frozen"),
    dict(method="sdpo", feedback="ordinal", teacher="seed-paper"),
]


@pytest.mark.parametrize("shared", GROUP_CASES, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_a_run_in_a_group_gets_bit_for_bit_what_it_gets_alone(shared):
    """Configurations that differ in per-run fields train as one tensor program; each run's history equals, bit for
    bit, the history of the same configuration trained alone (runs never interact), its own task included."""
    base = dict(shared, steps=12, eval_every=4, batch_size=16, num_generations=4)
    cfgs = [RunConfig.from_dict({**base, **per}) for per in (
        dict(lr=0.3, beta=1.0, rho=0.5, noise=0.0, hint_noise=0.0, seeds=5, seed_start=0),  # 12 runs: more than one exact chunk
        dict(lr=0.1, beta=0.3, rho=0.3, noise=0.1, hint_noise=0.05, seeds=6, seed_start=5, task_seed=2, threshold=0.4),  # a chunk spans two tasks
        dict(lr=1.0, beta=2.0, rho=0.75, noise=0.3, hint_noise=0.2, seeds=1, seed_start=0, task_seed=1),  # same seed as the first: still its own run
    )]
    grouped = run_group(cfgs)
    for cfg, together in zip(cfgs, grouped):
        alone = run(cfg).history
        assert together.config == cfg and list(together.history.columns) == list(alone.columns)
        for col in alone.columns:
            assert np.array_equal(together.history[col].to_numpy(), alone[col].to_numpy(), equal_nan=True), col


def test_run_group_refuses_configurations_that_differ_in_shared_fields():
    a, b = RunConfig.from_dict(dict(method="sdpo")), RunConfig.from_dict(dict(method="sdpo", feedback="binary"))
    with pytest.raises(ValueError, match=r"configuration\(s\) \[1\] differ from the first in a field other than lr, beta, rho"):
        run_group([a, b])
    with pytest.raises(ValueError, match="at least one configuration"):
        run_group([])
    assert group_key(a) == group_key(a.replace(lr=0.01, noise=0.2, seeds=3, task_seed=4, threshold=0.3)) != group_key(b)
