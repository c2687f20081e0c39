"""World, exact quantities and tabular policies against brute-force loops on tiny worlds."""

import itertools
import math

import pytest
import torch

from sdpo_sim import exact
from sdpo_sim.policies import TabularPolicy
from sdpo_sim.world import MAX_SEQUENCES, Task, all_sequences, sequence_index

V, T = 3, 3


def brute(rewards, logp):
    """Dictionaries of π(y), Q(prefix) by explicit loops over itertools.product."""
    seqs = list(itertools.product(range(V), repeat=T))
    p = {y: math.exp(float(logp[i])) for i, y in enumerate(seqs)}
    r = {y: float(rewards[i]) for i, y in enumerate(seqs)}

    def q(prefix):
        ext = [y for y in seqs if y[: len(prefix)] == prefix]
        mass = sum(p[y] for y in ext)
        return sum(p[y] * r[y] for y in ext) / mass

    return seqs, p, r, q


@pytest.fixture
def world():
    task = Task(seed=3, vocab_size=V, seq_len=T)
    gen = torch.Generator().manual_seed(0)
    # an arbitrary autoregressive policy: any distribution over sequences factorises autoregressively
    logp = torch.log_softmax(torch.randn(V**T, generator=gen, dtype=torch.float64) * 2, -1)
    return task, logp


def test_enumeration_order_matches_itertools():
    seqs = all_sequences(V, T)
    assert seqs.tolist() == [list(y) for y in itertools.product(range(V), repeat=T)]
    assert sequence_index(seqs, V).tolist() == list(range(V**T))


def test_rewards_are_rescaled_to_unit_interval_and_reproducible():
    task = Task(seed=5, vocab_size=4, seq_len=4)
    assert task.rewards.min() == 0 and task.rewards.max() == 1
    assert torch.equal(task.rewards, Task(seed=5, vocab_size=4, seq_len=4).rewards)
    assert not torch.equal(task.rewards, Task(seed=6, vocab_size=4, seq_len=4).rewards)
    seqs = torch.tensor([[0, 1, 2, 3], [3, 3, 3, 3]])
    raw = task.raw(task.sequences)
    expected = (task.raw(seqs) - raw.min()) / (raw.max() - raw.min())
    assert torch.allclose(task.reward(seqs), expected)


def test_reward_terms_by_hand():
    task = Task(seed=1, vocab_size=3, seq_len=4, motif_len=2)
    y = torch.tensor([2, 0, 2, 2])
    q, b, m = task.q, task.b, task.motif.tolist()
    local = sum(float(q[t, y[t]]) for t in range(4)) / 2.0
    coh = sum(float(b[y[t - 1], y[t]]) for t in range(1, 4)) / math.sqrt(3)
    motif = max(sum(int(y[j + i]) == m[i] for i in range(2)) / 2 for j in range(3))
    div = (2 - 1) / (3 - 1)
    assert float(task.raw(y)) == pytest.approx(local + 0.5 * coh + motif + 0.5 * div)


def test_too_large_world_names_the_limit():
    with pytest.raises(ValueError, match="MAX_SEQUENCES"):
        Task(vocab_size=16, seq_len=6)
    assert 8**7 <= MAX_SEQUENCES
    with pytest.raises(ValueError, match="vocab_size"):
        Task(vocab_size=1)


def test_exact_quantities_match_brute_force(world):
    task, logp = world
    seqs, p, r, q = brute(task.rewards, logp)
    J = sum(p[y] * r[y] for y in seqs)
    assert float(exact.expected_reward(task.rewards, logp)) == pytest.approx(J, abs=1e-12)
    A = exact.advantages(task.rewards, logp, torch.tensor(seqs))
    for i, y in enumerate(seqs):
        for t in range(T):
            assert float(A[i, t]) == pytest.approx(q(y[: t + 1]) - q(y[:t]), abs=1e-12)
    # per-position conditional entropy by loops
    H = []
    for t in range(T):
        h = 0.0
        for prefix in itertools.product(range(V), repeat=t):
            mass = sum(p[y] for y in seqs if y[:t] == prefix)
            cond = [sum(p[y] for y in seqs if y[: t + 1] == prefix + (v,)) / mass for v in range(V)]
            h += mass * -sum(c * math.log(c) for c in cond if c > 0)
        H.append(h)
    assert exact.position_entropies(logp, V, T).tolist() == pytest.approx(H, abs=1e-12)
    assert float(exact.token_entropy(logp, V, T)) == pytest.approx(sum(H) / T, abs=1e-12)
    Hseq = -sum(p[y] * math.log(p[y]) for y in seqs)
    assert float(exact.sequence_entropy(logp)) == pytest.approx(Hseq, abs=1e-12)
    other = torch.log_softmax(torch.zeros(V**T, dtype=torch.float64), -1)
    kl = sum(p[y] * (math.log(p[y]) - float(other[0])) for y in seqs)
    assert float(exact.kl_divergence(logp, other)) == pytest.approx(kl, abs=1e-12)


def test_advantages_telescope_and_have_zero_mean(world):
    task, logp = world
    seqs = task.sequences
    A = exact.advantages(task.rewards, logp, seqs)
    J = exact.expected_reward(task.rewards, logp)
    assert torch.allclose(A.sum(-1), task.rewards - J, atol=1e-12)
    assert torch.allclose((logp.exp().unsqueeze(-1) * A).sum(0), torch.zeros(T, dtype=torch.float64), atol=1e-12)
    # action values: expectation over v under the conditional policy is zero, gathered at y_t gives A*
    Q = exact.action_values(task.rewards, logp, seqs)
    assert torch.allclose(Q.gather(-1, seqs.unsqueeze(-1)).squeeze(-1), A)


@pytest.mark.parametrize("kind", ["markov", "factored"])
def test_policy_tables_agree_with_logits_and_sampling(kind):
    pol = TabularPolicy(kind, vocab_size=V, seq_len=T)
    theta = torch.randn(2, T, pol.num_contexts, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logp = pol.seq_logprobs(theta)
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    seqs = all_sequences(V, T).unsqueeze(0).expand(2, -1, -1)
    per_token = torch.log_softmax(pol.logits(theta, seqs), -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(per_token.sum(-1), logp, atol=1e-12)
    u = torch.rand(2, 20000, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sampled = pol.sample(theta, u)
    freq = torch.stack([torch.bincount(sequence_index(sampled[r], V), minlength=V**T) for r in range(2)]) / 20000
    assert (freq - logp.exp()).abs().max() < 0.02


def test_exact_gradient_matches_finite_differences():
    task = Task(seed=2, vocab_size=V, seq_len=T)
    pol = TabularPolicy("markov", vocab_size=V, seq_len=T)
    theta = torch.randn(1, T, V, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grad = exact.reward_gradient(task.rewards, theta, pol.seq_logprobs)
    J = lambda th: float(exact.expected_reward(task.rewards, pol.seq_logprobs(th)))  # noqa: E731
    for idx in [(0, 0, 0, 1), (0, 1, 2, 0), (0, 2, 1, 2)]:
        e = torch.zeros_like(theta)
        e[idx] = 1e-6
        assert float(grad[idx]) == pytest.approx((J(theta + e) - J(theta - e)) / 2e-6, abs=1e-8)
    assert float(grad[0, 0, 1:].abs().sum()) == 0.0  # position 0 only uses context 0


@pytest.mark.parametrize("kind", ["markov", "factored"])
def test_exact_state_agrees_with_the_library_functions(kind):
    from sdpo_sim.metrics import exact_state

    task = Task(seed=4, vocab_size=V, seq_len=T)
    pol = TabularPolicy(kind, vocab_size=V, seq_len=T, temperature=0.7)
    theta = torch.randn(3, T, pol.num_contexts, V, generator=torch.Generator().manual_seed(5))
    theta0 = torch.randn(3, T, pol.num_contexts, V, generator=torch.Generator().manual_seed(6))
    seqs = torch.randint(V, (3, 5, T), generator=torch.Generator().manual_seed(7))
    got = exact_state(task, pol, theta, theta0, seqs)
    logp, logp0 = pol.seq_logprobs(theta.double()), pol.seq_logprobs(theta0.double())
    # each quantity is a sum of ≤ N = V**T float64 terms; entropies and KL terms are ≤ T·max|log π| each, so N·eps
    # scaled by the largest log-probability bounds the rounding of either order of summation
    tol = V**T * torch.finfo(torch.float64).eps * max(1.0, float(-logp.min()), float(-logp0.min()))
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=tol)  # noqa: E731
    close(got["reward"], exact.expected_reward(task.rewards, logp))
    close(got["entropy"], exact.token_entropy(logp, V, T))
    close(got["seq_entropy"], exact.sequence_entropy(logp))
    close(got["kl_init"], exact.kl_divergence(logp, logp0))
    close(got["advantages"], exact.advantages(task.rewards, logp, seqs))
    close(got["grad_J"], exact.reward_gradient(task.rewards, theta.double(), pol.seq_logprobs))


@pytest.mark.parametrize("kind", ["markov", "factored"])
def test_chain_tables_are_the_enumerations_tables(kind):
    """The two-pass chain recursion gives the enumeration's prefix masses and values. Tolerance: each entry is a sum or
    product of at most N = V**T float64 terms of magnitude ≤ 1 (probabilities, rewards in [0, 1]), so both sides are
    within N·eps of the exact value (a crude, safe bound on the rounding of either summation order)."""
    task = Task(seed=2, vocab_size=V, seq_len=T)
    pol = TabularPolicy(kind, vocab_size=V, seq_len=T, temperature=0.7)
    theta = torch.randn(3, T, pol.num_contexts, V, generator=torch.Generator().manual_seed(1)).double() * 2
    tol = V**T * torch.finfo(torch.float64).eps
    masses, values = exact.chain_tables(task.rewards, pol.conditionals(theta), kind == "markov")
    ref_masses, ref_values = exact.prefix_tables(task.rewards, pol.seq_logprobs(theta), T)
    assert len(masses) == len(values) == T + 1
    for k in range(T + 1):
        assert masses[k].shape == values[k].shape == (3, V**k)
        torch.testing.assert_close(masses[k], ref_masses[k], rtol=0, atol=tol)
        torch.testing.assert_close(values[k], ref_values[k], rtol=0, atol=tol)
    marg = exact.chain_marginals(pol.conditionals(theta), kind == "markov")
    for t in range(1, T):  # the context of position t is y_{t-1}: its marginal from the enumeration's prefix masses
        if kind == "markov":
            torch.testing.assert_close(marg[:, t], ref_masses[t].view(3, -1, V).sum(1), rtol=0, atol=tol)
    assert torch.all(marg[:, 0, 0] == 1)


def test_task_families_keep_the_default_task_and_reweight_the_motif():
    from sdpo_sim.world import FAMILIES, family_task

    assert torch.equal(family_task(3, V, T).rewards, Task(3, V, T).rewards)  # the default family is the old task, bit for bit
    motif = family_task(3, V, T, "motif")
    assert FAMILIES["motif"]["w_motif"] > FAMILIES["default"]["w_motif"] and not torch.equal(motif.rewards, Task(3, V, T).rewards)
    assert motif.rewards.min() == 0 and motif.rewards.max() == 1
    with pytest.raises(ValueError, match="family='hard' is not allowed; choose one of 'default', 'motif'"):
        family_task(3, V, T, "hard")
