"""Test-time self-distillation in the toy world: discovery of a rare high-reward sequence (docs/testtime.md).

The SDPO paper's test-time experiment, made exact where it can be: one hard task instance, a threshold ``τ`` that
the initial policy's one attempt exceeds with a small probability ``p`` (enumerated exactly), and two ways to spend
``K`` attempts:

- **best-of-k** from the fixed initial policy: ``D(k) = 1 − (1 − p)^k`` exactly (:mod:`sdpo_sim.core.discovery`);
- **SDPO** (and GRPO/REINFORCE as references) updating between attempts: each step samples ``num_generations``
  attempts (one group), judges them on the feedback channel and makes one update on them, exactly as
  :func:`sdpo_sim.train.run_group` does (same random streams, same teacher, loss and optimiser; a test checks the
  trajectories agree). A run *discovers* at its first attempt with true reward ``R(y) > τ``; ``D(k)`` is estimated
  over many independent runs (all in one tensor program) with Wilson intervals.

``τ`` is set by a rule stated before any result: the smallest reward value ``r`` of the table with
``P_0(R > r) ≤ tail`` under the initial policy (``tail = 0.002``: about one attempt in 500 succeeds).

Why a loop here and not ``train.run_group``: a run's history keeps the batch-mean reward, not which attempts
exceeded ``τ``, so the discovery times cannot be read from it. The loop below reuses train.py's pieces (its private
``_per_run``, ``_token_logp`` and ``_teacher_network_logits`` among them) for the plain methods without variants.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import rng
from .core import discovery
from .core.config_fields import setting
from .core.losses import policy_gradient_token_loss, sdpo_token_loss
from .core.method import MethodConfig
from .core.validation import check_choice, check_int, check_number, fail, is_int
from .feedback import CHANNELS, Judge
from .policies import POLICIES, TabularPolicy
from .teachers import BayesTeacher, SelfKnowledge
from .train import MAX_ELEMENTS, RunConfig, _per_run, _teacher_network_logits, _token_logp
from .world import FAMILIES, Task, family_task, sequence_index

METHODS = ("sdpo", "grpo", "reinforce")  # the plain methods this loop runs (no variants, no hybrid controller)
_OWNER = "TestTimeConfig"


@dataclass
class TestTimeConfig:
    """One test-time discovery experiment in the toy world (``sdpo-sim testtime``)."""

    __test__ = False  # not a pytest test class despite its name

    methods: list = setting(factory=lambda: ["sdpo", "grpo", "reinforce"], help="methods that update between attempts, each compared with best-of-k from the fixed initial policy (sdpo, grpo, reinforce)")
    attempts: int = setting(256, "K: attempts (sampled completions) per run, ≥ 1; rounded up to whole updates of num_generations")
    num_generations: int = setting(8, "attempts per update (one group; ≥ 2: SDPO's and GRPO's groups need siblings)")
    seeds: int = setting(2000, "independent runs per method (all trained at once), ≥ 1")
    tail: float = setting(0.002, "rule for τ: the smallest reward value r with P_0(R > r) ≤ tail under the initial policy, in (0, 0.5)")
    threshold: Optional[float] = setting(None, "τ given directly instead of by tail, strictly inside the task's reward range [0, 1)")
    feedback: str = setting("continuous", "feedback channel the updating methods see (binary is 1[R+ε > τ])", choices=CHANNELS)
    noise: float = setting(0.0, "σ of the judge's noise on the reward, in [0, 1000]")
    rho: float = setting(0.5, "self-knowledge fidelity ρ of the SDPO teacher, in [0, 1]")
    beta: float = setting(1.0, "teacher sharpness β, in (0, 1000]")
    lr: Optional[float] = setting(None, "learning rate, ≥ 0 (0: no update, best-of-k by construction); null: DEFAULT_LR of each method")
    task_seed: int = setting(0, "seed of the task, ≥ 0")
    family: str = setting("default", "task family", choices=tuple(FAMILIES))
    vocab_size: int = setting(8, "vocabulary size V ≥ 2 (V**seq_len ≤ 2**21)")
    seq_len: int = setting(6, "sequence length T ≥ 2")
    policy: str = setting("markov", "tabular policy", choices=POLICIES)
    seed_start: int = setting(0, "seed of the first run")
    levels: list = setting(factory=lambda: [0.22, 0.5], help="discovery levels at which the attempts ratio is reported, each in (0, 1)")
    n_boot: int = setting(2000, "bootstrap draws over runs for the ratios' CIs, ≥ 100")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TestTimeConfig":
        if not isinstance(self.methods, list) or not self.methods:
            fail(_OWNER, "methods", self.methods, f"must be a non-empty list of {', '.join(METHODS)}")
        for m in self.methods:
            check_choice(_OWNER, "methods", m, METHODS)
        if len(set(self.methods)) != len(self.methods):
            fail(_OWNER, "methods", self.methods, "names a method twice")
        check_int(_OWNER, "attempts", self.attempts, 1, why="k counts attempts from 1")
        check_int(_OWNER, "num_generations", self.num_generations, 2, why="a group needs siblings")
        check_int(_OWNER, "seeds", self.seeds, 1)
        check_int(_OWNER, "n_boot", self.n_boot, 100)
        check_number(_OWNER, "tail", self.tail, 0, 0.5, lo_open=True, why="the initial probability of one successful attempt")
        if self.tail >= 0.5:
            fail(_OWNER, "tail", self.tail, "must be < 0.5 (a rare success)")
        if self.threshold is not None:
            check_number(_OWNER, "threshold", self.threshold, 0, 1, why="rewards lie in [0, 1]")
            if self.threshold >= 1:
                fail(_OWNER, "threshold", self.threshold, "must be < 1, the task's largest reward: no sequence lies above it")
        if self.lr is not None:
            check_number(_OWNER, "lr", self.lr, 0, 1000)
        if not isinstance(self.levels, list) or not self.levels:
            fail(_OWNER, "levels", self.levels, "must be a non-empty list of numbers in (0, 1)")
        for lv in self.levels:
            check_number(_OWNER, "levels", lv, 0, 1, lo_open=True)
            if lv >= 1:
                fail(_OWNER, "levels", lv, "must be < 1 (no finite budget is sure to discover)")
        self.run_config(self.methods[0])  # RunConfig's checks of the world, the noise, ρ, β and the memory bound
        return self

    @property
    def steps(self) -> int:
        """Updates per run: ``ceil(attempts / num_generations)``."""
        return math.ceil(self.attempts / self.num_generations)

    def chunks(self) -> list[tuple[int, int]]:
        """``(seed_start, seeds)`` of the tensor programs the runs are split into: RunConfig bounds ``seeds·V**T`` by
        2**27 elements (its exact tables; this loop builds none, but each chunk is a valid RunConfig)."""
        size = max(1, MAX_ELEMENTS // self.vocab_size**self.seq_len)
        return [(self.seed_start + i, min(size, self.seeds - i)) for i in range(0, self.seeds, size)]

    def run_config(self, method: str, threshold: Optional[float] = None, chunk: Optional[tuple[int, int]] = None) -> RunConfig:
        """The :class:`RunConfig` of one method's runs, its judge's τ ``threshold`` (binary feedback's; default this
        config's) and its lr DEFAULT_LR when ``lr`` is null or 0 (0 is passed to :func:`attempt_hits` on its own)."""
        lr = self.lr if self.lr else None
        threshold = self.threshold if threshold is None else threshold
        seed_start, seeds = self.chunks()[0] if chunk is None else chunk
        return RunConfig(method=MethodConfig(name=method, num_generations=self.num_generations), feedback=self.feedback,
                         noise=float(self.noise), rho=float(self.rho), beta=float(self.beta), lr=lr, steps=self.steps,
                         seeds=seeds, seed_start=seed_start, task_seed=self.task_seed, vocab_size=self.vocab_size,
                         seq_len=self.seq_len, policy=self.policy, batch_size=self.num_generations, family=self.family,
                         threshold=threshold)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TestTimeConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TestTimeConfig field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}")
        values = dict(data)
        for name in ("tail", "threshold", "noise", "rho", "beta", "lr"):
            if is_int(values.get(name)):
                values[name] = float(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCALES = {  # the canonical scale (docs/testtime.md, ≤ 5 min on 2 cores) and a small one for tests
    "canonical": {},
    "small": {"attempts": 32, "seeds": 64, "n_boot": 200},
}


def success_threshold(task: Task, policy: TabularPolicy, tail: float) -> tuple[float, float]:
    """``(τ, p)``: the smallest reward value ``r`` of the table with ``p = P_0(R > r) ≤ tail`` under the initial policy
    ``θ = 0``, and that exact ``p`` (enumerated: ``Σ_y π_0(y)·1[R(y) > τ]``)."""
    probs = policy.seq_logprobs(policy.init_params(1, torch.float64))[0].exp()
    values, inverse = torch.unique(task.rewards, sorted=True, return_inverse=True)
    mass = torch.zeros_like(values).index_add_(0, inverse, probs)  # P_0(R = r) for each distinct r (ascending)
    above = mass.flip(0).cumsum(0).flip(0) - mass  # P_0(R > r)
    ok = torch.nonzero(above <= tail)[0, 0]
    tau = float(values[ok])
    return tau, success_probability(task, policy, tau)


def success_probability(task: Task, policy: TabularPolicy, threshold: float) -> float:
    """Exact ``p = P_0(R > τ)`` of one attempt of the initial policy."""
    probs = policy.seq_logprobs(policy.init_params(1, torch.float64))[0].exp()
    return float((probs * (task.rewards > threshold)).sum())


@dataclass
class Attempts:
    """What :func:`attempt_hits` returns: ``hits [seeds, steps·batch_size]`` bool (attempts in the order sampled) and
    the runs' parameters after their updates, ``theta [seeds, T, C, V]``."""

    hits: torch.Tensor
    theta: torch.Tensor


def attempt_hits(cfg: RunConfig, threshold: float, *, lr: Optional[float] = None, progress: bool = False) -> Attempts:
    """Which attempts exceed ``τ`` (:class:`Attempts`), run by run.

    The loop of :func:`sdpo_sim.train.run_group` for one configuration of a plain method (sdpo, grpo, reinforce; no
    variant, no reference term; teacher bayes), steps ``0..steps−1``: sample a group, judge it, then one update

    - sdpo: ``ℓ_T = ℓ_teacher-net + β·Â`` (:class:`BayesTeacher`), loss ``aggregate(D_α(π_θ ‖ stopgrad π_T))``;
    - grpo/reinforce: loss ``aggregate(−A_i·log π_θ(y_t))`` with ``A`` the method's advantages;

    then Adam (or SGD) with ``lr`` (default ``cfg.lr``; 0 leaves the policy at its initial value) and the EMA teacher
    update ``θ_T ← θ_T + rate·(θ − θ_T)``. A run discovers at its first attempt with ``R(y) > threshold``.
    """
    m = cfg.method
    if m.name not in METHODS or m.variants_in_use() or m.uses_reference or cfg.updates_per_batch != 1:
        raise ValueError(f"attempt_hits runs only the plain methods {', '.join(METHODS)} with one update per batch and no "
                         f"variant or reference term, got {m.name} {', '.join(m.variants_in_use())}")
    if cfg.teacher != "bayes":
        raise ValueError(f"attempt_hits runs only teacher='bayes', got {cfg.teacher!r}")
    R, B, T, V = cfg.seeds, cfg.batch_size, cfg.seq_len, cfg.vocab_size
    seeds = torch.arange(cfg.seed_start, cfg.seed_start + R)
    full = lambda x: torch.full((R,), float(x), dtype=torch.float64)  # noqa: E731 — per-run settings, as run_group makes them

    task = family_task(cfg.task_seed, V, T, cfg.family)
    policy = TabularPolicy(cfg.policy, V, T, m.temperature)
    theta = policy.init_params(R).requires_grad_(True)
    theta_init, teacher_theta = theta.detach().clone(), theta.detach().clone()
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)([{"params": [theta], "lr": cfg.lr if lr is None else lr}])
    judge = Judge(task, cfg.threshold if cfg.threshold is not None else threshold)
    noise, hint_noise = full(cfg.noise), full(cfg.hint_noise)
    knowledge = SelfKnowledge(judge, full(cfg.rho), seed=cfg.task_seed)
    teacher = BayesTeacher(full(cfg.beta))
    hits = []
    for step in tqdm(range(cfg.steps), disable=not progress, desc=f"testtime {m.name}", unit="update"):
        seqs = policy.sample(theta, rng.uniform(seeds, rng.SAMPLE, step, (B, T)))  # [R, B, T]
        hits.append(task.rewards[sequence_index(seqs, V)] > threshold)
        logits = policy.logits(theta, seqs)  # [R, B, T, V]
        fb = judge(seqs, cfg.feedback, group_size=m.num_generations, noise=noise, hint_noise=hint_noise, seeds=seeds, step=step)
        if m.distills:
            out = teacher(_teacher_network_logits(m, policy, logits, teacher_theta, theta_init, seqs), seqs, fb, knowledge)
            sd_tok = sdpo_token_loss(logits, out.logits, alpha=m.alpha, support=m.support, topk=m.topk, add_tail=m.add_tail,
                                     tokens=seqs, objective=m.distill_loss)
            loss = _per_run(sd_tok, out.mask.unsqueeze(-1).expand(-1, -1, T), m.loss_type)
        else:
            loss = _per_run(policy_gradient_token_loss(_token_logp(logits, seqs), m.advantages(fb.score), None, epsilon=m.epsilon),
                            None, m.loss_type)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            teacher_theta.add_(m.teacher_rate * (theta - teacher_theta))
    return Attempts(torch.cat(hits, dim=1), theta.detach())


def run_testtime(cfg: TestTimeConfig, *, progress: bool = False) -> dict[str, Any]:
    """The experiment: ``{"table", "ratios", "threshold", "p", "config"}``. ``table``: the tidy rows of
    :data:`sdpo_sim.core.discovery.COLUMNS` (best-of-k exact, each method over ``seeds`` runs with Wilson 95% bands);
    ``ratios``: per method, :func:`sdpo_sim.core.discovery.bootstrap_ratios` (the attempts ratios with bootstrap CIs)."""
    task = family_task(cfg.task_seed, cfg.vocab_size, cfg.seq_len, cfg.family)
    policy = TabularPolicy(cfg.policy, cfg.vocab_size, cfg.seq_len)
    if cfg.threshold is None:
        tau, p = success_threshold(task, policy, cfg.tail)
    else:
        tau, p = cfg.threshold, success_probability(task, policy, cfg.threshold)
    lo, hi = float(task.rewards.min()), float(task.rewards.max())
    if not lo <= tau < hi or not 0 < p < 1:
        raise ValueError(f"TestTimeConfig.threshold={tau!r} must lie in the task's reward range [{lo:.4f}, {hi:.4f}) with "
                         f"0 < P_0(R > τ) < 1 (got {p:.3g})")
    K = cfg.attempts
    tables = [discovery.best_of_k_table(p, K)]
    ratios = {}
    for method in cfg.methods:
        parts = [attempt_hits(cfg.run_config(method, tau, chunk), tau, lr=cfg.lr, progress=progress).hits for chunk in cfg.chunks()]
        hits = torch.cat(parts)[:, :K].numpy()
        run_cfg = cfg.run_config(method, tau)
        first = discovery.first_hits(hits)
        tables.append(discovery.curve_table(method, first, K))
        ratios[method] = discovery.bootstrap_ratios(first, K, p, cfg.levels, n_boot=cfg.n_boot, seed=0)
        ratios[method]["lr"] = run_cfg.lr if cfg.lr is None else cfg.lr
    return {"table": pd.concat(tables, ignore_index=True), "ratios": ratios, "threshold": tau, "p": p,
            "config": cfg.to_dict(), "reward_range": [lo, hi]}
