"""Feedback channels and retrospection teachers: controls that could fail if a teacher cheated or erred."""

import inspect
import math

import pytest
import torch
from scipy import stats

from sdpo_sim import exact, rng
from sdpo_sim.feedback import Judge, best_sibling
from sdpo_sim.metrics import pearson, ranks, spearman
from sdpo_sim.policies import TabularPolicy
from sdpo_sim.teachers import BayesTeacher, DemoTeacher, OracleTeacher, SeedPaperTeacher, SelfKnowledge, truncated_normal_mean
from sdpo_sim.world import Task

N = 4096  # completions for the correlation checks (credit is pooled over N×T tokens)


@pytest.fixture(scope="module")
def setup():
    task = Task(seed=0, vocab_size=6, seq_len=5)
    policy = TabularPolicy("markov", 6, 5)
    theta = torch.randn(1, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    logp = policy.seq_logprobs(theta)
    seqs = policy.sample(theta, rng.uniform(torch.tensor([0]), rng.SAMPLE, 0, (N, 5)))
    judge = Judge(task, threshold=float(task.rewards.median()))
    a_star = exact.advantages(task.rewards, logp, seqs)
    return task, policy, theta, seqs, judge, a_star


def taken(credit, seqs):
    return credit.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)


def bayes_corr(setup, kind, rho, noise):
    task, policy, theta, seqs, judge, a_star = setup
    fb = judge(seqs, kind, group_size=8, noise=noise, hint_noise=noise, seeds=torch.tensor([0]), step=0)
    out = BayesTeacher()(policy.logits(theta, seqs), seqs, fb, SelfKnowledge(judge, rho))
    return float(pearson(taken(out.credit, seqs), a_star))


def test_teachers_see_only_logits_attempt_feedback_knowledge():
    for cls in (BayesTeacher, DemoTeacher, SeedPaperTeacher):
        assert list(inspect.signature(cls.__call__).parameters) == ["self", "logits", "attempt", "feedback", "knowledge"]
    params = inspect.signature(OracleTeacher.__call__).parameters
    assert list(params) == ["self", "logits", "attempt", "feedback", "knowledge", "true_advantages"]
    assert params["true_advantages"].kind is inspect.Parameter.KEYWORD_ONLY


def test_feedback_channels(setup):
    task, policy, theta, seqs, judge, _ = setup
    seeds = torch.tensor([0])
    r = task.reward(seqs)
    fb = judge(seqs, "binary", group_size=8, seeds=seeds, step=0)
    assert torch.equal(fb.score, (r > judge.threshold).double())
    fb = judge(seqs, "ordinal", group_size=8, seeds=seeds, step=0)
    assert torch.equal(fb.score, (torch.ceil(r * 5).clamp(1, 5)))
    assert bool(((fb.lower < r) & (r <= fb.upper)).all())
    noisy = judge(seqs, "continuous", group_size=8, noise=0.1, seeds=seeds, step=0)
    assert float((noisy.score - r).std()) == pytest.approx(0.1, rel=0.05)
    # noise is applied before quantisation: binary from the same noisy latent
    noisy_bin = judge(seqs, "binary", group_size=8, noise=0.1, seeds=seeds, step=0)
    assert torch.equal(noisy_bin.score, (noisy.score > judge.threshold).double())
    crit = judge(seqs, "critique", group_size=8, hint_noise=0.0, seeds=seeds, step=0)
    c = judge.contributions(seqs)
    assert torch.allclose(c.sum(-1), torch.zeros((), dtype=c.dtype), atol=1e-12)
    assert torch.equal(crit.hints, taken(c, seqs))
    with pytest.raises(ValueError, match="'binary', 'ordinal'"):
        judge(seqs, "stars", group_size=8, seeds=seeds, step=0)


def test_demo_is_best_other_sibling_never_itself():
    seqs = torch.arange(8).view(1, 8, 1).expand(1, 8, 3)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.5, 0.5, 0.0, 0.4]])
    demo, better = best_sibling(seqs, scores, group_size=4)
    assert demo[0, :, 0].tolist() == [1, 2, 1, 1, 5, 4, 4, 4]
    assert better[0].tolist() == [True, False, True, True, False, False, True, True]


def test_self_knowledge_fidelity(setup):
    task, policy, theta, seqs, judge, _ = setup
    c = judge.contributions(seqs)
    for rho in (0.0, 0.5, 1.0):
        mean, var = SelfKnowledge(judge, rho).prior(seqs)
        assert var == pytest.approx((1 - rho**2) * SelfKnowledge(judge, rho).scale ** 2)
        if rho == 0:
            assert float(mean.abs().max()) == 0.0
        else:
            assert float(pearson(mean.unsqueeze(0), c.unsqueeze(0))) == pytest.approx(rho, abs=0.05)
    m1, _ = SelfKnowledge(judge, 0.5).prior(seqs)
    m2, _ = SelfKnowledge(judge, 0.5).prior(seqs)
    assert torch.equal(m1, m2)  # a fixed misbelief, not fresh noise
    with pytest.raises(ValueError, match="rho"):
        SelfKnowledge(judge, 1.5)


def test_bayes_rho0_scalar_score_gives_equal_credit_to_every_token(setup):
    task, policy, theta, seqs, judge, _ = setup
    for kind in ("continuous", "binary", "ordinal"):
        fb = judge(seqs, kind, group_size=8, noise=0.05, seeds=torch.tensor([0]), step=0)
        out = BayesTeacher()(policy.logits(theta, seqs), seqs, fb, SelfKnowledge(judge, 0.0))
        credit = taken(out.credit, seqs)
        assert torch.allclose(credit, credit[..., :1].expand_as(credit), atol=1e-12)
        assert float(credit.std()) > 0  # ... but not zero: it still follows the score
        untaken = out.credit.scatter(-1, seqs.unsqueeze(-1), 0.0)
        assert float(untaken.abs().max()) == 0.0


def test_bayes_credit_orders_channels_and_falls_with_noise(setup):
    for rho in (0.0, 0.5):
        crit, cont, ordi, bina = (bayes_corr(setup, k, rho, 0.01) for k in ("critique", "continuous", "ordinal", "binary"))
        assert crit > cont >= ordi >= bina > 0
        for kind in ("critique", "continuous", "binary"):
            by_noise = [bayes_corr(setup, kind, rho, s) for s in (0.0, 0.1, 0.3)]
            assert by_noise[0] > by_noise[1] > by_noise[2], (kind, rho, by_noise)


def test_more_self_knowledge_more_correct_credit(setup):
    corr = [bayes_corr(setup, "continuous", rho, 0.0) for rho in (0.0, 0.5, 0.9)]
    assert corr[0] < corr[1] < corr[2]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy computes skewness it does not need
def test_truncated_normal_mean_matches_scipy_including_tails():
    a = torch.tensor([-math.inf, -1.0, 0.5, 8.0, -30.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, math.inf, 9.0, -29.0, 2.0 + 1e-6], dtype=torch.float64)
    ours = truncated_normal_mean(a, b)
    ref = [stats.truncnorm.mean(float(x), float(y)) for x, y in zip(a, b)]
    assert ours.tolist() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_seed_paper_reads_quality_table_and_its_critique_shift_is_invisible(setup):
    task, policy, theta, seqs, judge, _ = setup
    logits = policy.logits(theta, seqs)
    kn = SelfKnowledge(judge, 0.0)
    teacher = SeedPaperTeacher(task.q)
    cont = teacher(logits, seqs, judge(seqs, "continuous", group_size=8, seeds=torch.tensor([0]), step=0), kn)
    crit = teacher(logits, seqs, judge(seqs, "critique", group_size=8, seeds=torch.tensor([0]), step=0), kn)
    assert not torch.allclose(cont.logits, crit.logits)
    assert torch.allclose(torch.log_softmax(cont.logits, -1), torch.log_softmax(crit.logits, -1), atol=1e-10)


def test_rank_helpers():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert ranks(x).tolist() == [[2.5, 0.0, 2.5, 1.0]]
    y = torch.randn(1, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = y**3 + 0.1 * torch.randn(1, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float(spearman(y, z)) == pytest.approx(stats.spearmanr(y[0], z[0]).statistic, abs=1e-12)
    assert math.isnan(float(pearson(torch.ones(1, 5), torch.randn(1, 5))))
