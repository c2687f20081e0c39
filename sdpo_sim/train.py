"""One vectorised training loop for every method of the toy world (docs/design.md §3).

Read :func:`run` to see a method work: sample a group → judge → feedback → teacher logits → the
shared loss from :mod:`sdpo_sim.core.losses` → Adam update, for ``cfg.seeds`` independent runs at once
(tensors ``[runs, B, T, V]``), with exact metrics at evaluation steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import exact, metrics, rng
from .core.config_fields import setting
from .core.losses import (
    advantage_blend_token_loss,
    aggregate,
    hybrid_loss,
    policy_gradient_token_loss,
    reference_anchor,
    reference_kl,
    routed_token_loss,
    sdpo_token_loss,
    token_entropy,
    truncated_importance_weight,
)
from .core.method import MethodConfig
from .core.statistics import token_statistics
from .core.validation import check_choice, check_int, check_number, fail, is_int
from .feedback import CHANNELS, Judge
from .per_run import RunTasks
from .policies import POLICIES, TabularPolicy
from .teachers import (
    TEACHERS,
    BayesTeacher,
    DemoTeacher,
    OracleTeacher,
    SeedPaperTeacher,
    SelfKnowledge,
)
from .world import FAMILIES, Task, check_size, family_task

OPTIMIZERS = ("adam", "sgd")
# Adam learning rates used when ``lr`` is not given. Chosen on tuning seeds 1000–1007 of task seed 0
# (disjoint from evaluation seeds 0..), continuous feedback, noise 0, by the largest area under the
# exact-reward curve over 300 steps among {0.01, 0.03, 0.1, 0.3} (benchmarks/pilot_default_lr.py).
# blend and srpo were not in that pilot: they take 0.3, the rate of grpo and sdpo whose terms they combine.
DEFAULT_LR = {"reinforce": 0.1, "grpo": 0.3, "sdpo": 0.3, "hybrid": 0.3, "blend": 0.3, "srpo": 0.3}
HISTORY_COLUMNS = (
    "seed", "step", "reward", "entropy", "seq_entropy", "kl_init", "divergence", "alpha_mix",
    "credit_pearson", "credit_spearman", "credit_pearson_within", "feedback_credit_pearson", "grad_cos", "batch_reward",
)


# Magnitude bounds of RunConfig (see sdpo_sim/config.py for the float32 facts: exp overflows past 88.7 nats, a softmax is
# one-hot once two logits differ by ln(2**24) = 16.6 nats).
# noise, hint_noise: rewards and token contributions lie in [0, 1]; sigma = 1e3 is a signal-to-noise ratio of 1e-3 per
# reading (nothing is learnable in any budget). The arithmetic limit is var_e = sigma**2 in float64 (teachers.py), past 1.3e154.
MAX_NOISE = 1_000  # an int, so messages read [0, 1000]
# beta: teacher logits l + beta·A are float32 with A ~ 1 (units of s): beta = 1e3 moves a logit 60x past the 16.6 nats
# where the teacher's softmax is already one-hot; beyond that only float32 overflow (3.4e38) changes anything.
MAX_BETA = 1_000  # an int, so messages read [0, 1000]
# lr: Adam's first update moves every parameter by ~lr (SGD's gradients are at most ~1/temperature per parameter). The
# packaged tuning grids reach lr = 10; lr = 1e3 moves a logit 60x past 16.6 nats in one step, and larger values only
# differ by float32 overflow of theta (3.4e38 after lr·steps).
MAX_LR = 1_000  # an int, so messages read [0, 1000]
# task_seed: Task seeds torch's generator with 10_007·task_seed + 1, which must fit in an unsigned 64-bit integer.
MAX_TASK_SEED = (2**64 - 2) // 10_007
# seed_start + seeds: the run seeds are torch.arange(seed_start, seed_start + seeds), int64.
MAX_SEED_END = 2**63 - 1
# memory: one [runs, B, T, V] float32 tensor (several live per step) and the exact [runs, V**T] float64 tables must
# each stay within 2**27 elements (512 MiB / 1 GiB); larger runs are not toy-world runs.
MAX_ELEMENTS = 2**27


_OWNER = "RunConfig"  # how messages name a field: RunConfig.noise=-1.0 ...


@dataclass
class RunConfig:
    """Everything a toy-world run needs; :meth:`from_dict` takes a flat mapping (RunConfig and
    MethodConfig fields side by side)."""

    method: MethodConfig = setting(help="the method and its settings (a MethodConfig; in the flat form its fields sit beside these, its name as method)", factory=MethodConfig)
    feedback: str = setting("continuous", "feedback channel, noise added to the reward before quantisation: binary 1[R+ε > threshold], ordinal 1–5 stars, continuous R+ε, critique R+ε and per-token hints, demo R+ε and the best other sibling", choices=CHANNELS)
    teacher: str = setting("bayes", "retrospection model (what the self-teacher may see): bayes (posterior from feedback and self-knowledge), demo (needs feedback=demo), oracle (the exact A*, an upper bound), null (another rollout's feedback, a control; needs rho=0) or seed-paper (the quality table, flawed on purpose)", choices=TEACHERS)
    noise: float = setting(0.0, "σ of the Gaussian noise on the reward before quantisation, in [0, 1000] (rewards lie in [0, 1])")
    hint_noise: float = setting(0.0, "σ_h of the noise on critique's per-token hints, in [0, 1000]")
    rho: float = setting(0.5, "self-knowledge fidelity ρ in [0, 1]: the correlation of the teacher's introspective reading with the true token contributions (0: none, the teacher knows only what the feedback says)")
    beta: float = setting(1.0, "teacher sharpness β in (0, 1000]: teacher logits are ℓ + β·Â, Â in units of the credit scale s (β = 1 moves a logit by one nat for a typical credit)")
    lr: Optional[float] = setting(None, "learning rate in (0, 1000]; null: DEFAULT_LR of the method (reinforce 0.1, grpo/sdpo/hybrid 0.3, tuned for Adam; blend/srpo 0.3, not tuned)")
    optimizer: str = setting("adam", "optimizer of the tabular logits", choices=OPTIMIZERS)
    steps: int = setting(300, "training steps (rollout batches), ≥ 1; each makes updates_per_batch updates")
    updates_per_batch: int = setting(1, "optimiser updates on each sampled batch, ≥ 1 (the LLM path's training.updates_per_batch): above 1 the later updates are off-policy, so the PPO clip (epsilon) and the importance-weight cap (is_clip) act, with the sampling policy's log-probabilities as the old ones")
    seeds: int = setting(8, "independent training runs, trained at once as one batch of tensors, ≥ 1")
    seed_start: int = setting(0, "seed of the first run; the runs use seeds seed_start … seed_start + seeds − 1")
    task_seed: int = setting(0, "seed of the task (its reward table), ≥ 0; every run trains on the same task")
    vocab_size: int = setting(8, "vocabulary size V ≥ 2; all V**seq_len sequences are enumerated, at most 2**21")
    seq_len: int = setting(6, "sequence length T ≥ 2 (V**T ≤ 2**21)")
    policy: str = setting("markov", "tabular policy: markov (logits θ[t, previous token, v], can express coherence) or factored (θ[t, v], one table per position)", choices=POLICIES)
    batch_size: int = setting(32, "completions sampled per step and run, a multiple of num_generations (batch_size / num_generations groups)")
    eval_every: int = setting(10, "steps between exact evaluations (history rows); the first and last steps are always evaluated")
    threshold: Optional[float] = setting(None, "τ of binary feedback, in [0, 1]; null: the median reward under the initial policy")
    family: str = setting("default", "task family (the reward's weights, sdpo_sim.world.FAMILIES): default, or motif (weak additive and bigram terms, a dominant non-additive motif: harder credit assignment)", choices=tuple(FAMILIES))

    def __post_init__(self) -> None:
        if isinstance(self.method, Mapping):
            self.method = MethodConfig.from_dict(self.method)
        if not isinstance(self.method, MethodConfig):
            fail(_OWNER, "method", self.method, "must be a MethodConfig")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method.name]
        self.validate()

    def validate(self) -> "RunConfig":
        for name, allowed in (("feedback", CHANNELS), ("teacher", TEACHERS), ("optimizer", OPTIMIZERS), ("policy", POLICIES), ("family", tuple(FAMILIES))):
            check_choice(_OWNER, name, getattr(self, name), allowed)
        for name in ("noise", "hint_noise"):
            check_number(_OWNER, name, getattr(self, name), 0, MAX_NOISE, why="rewards lie in [0, 1]")
        check_number(_OWNER, "rho", self.rho, 0, 1)
        check_number(_OWNER, "beta", self.beta, 0, MAX_BETA, lo_open=True)
        check_number(_OWNER, "lr", self.lr, 0, MAX_LR, lo_open=True, why="one Adam step moves a logit by ~lr nats")
        for name, lo in (("steps", 1), ("updates_per_batch", 1), ("seeds", 1), ("seed_start", 0), ("task_seed", 0), ("batch_size", 1), ("eval_every", 1)):
            check_int(_OWNER, name, getattr(self, name), lo, why="a run trains for at least one step" if name == "steps" else "")
        if self.task_seed > MAX_TASK_SEED:
            fail(_OWNER, "task_seed", self.task_seed, f"must be ≤ {MAX_TASK_SEED} (10007·task_seed + 1 seeds a 64-bit generator)")
        if self.seed_start + self.seeds - 1 > MAX_SEED_END:
            fail(_OWNER, "seed_start", self.seed_start, f"+ seeds - 1 must be ≤ 2**63 - 1 = {MAX_SEED_END} (run seeds are int64)")
        check_size(self.vocab_size, self.seq_len)
        if self.batch_size % self.method.num_generations:
            fail(_OWNER, "batch_size", self.batch_size, f"must be a multiple of num_generations={self.method.num_generations}")
        for what, size in (("seeds × batch_size × seq_len × vocab_size", self.seeds * self.batch_size * self.seq_len * self.vocab_size),
                           ("seeds × vocab_size**seq_len", self.seeds * self.vocab_size**self.seq_len)):
            if size > MAX_ELEMENTS:
                fail(_OWNER, "seeds", self.seeds, f"is too large: {what} = {size:,} exceeds 2**27 = {MAX_ELEMENTS:,} elements per tensor; "
                                                  "use fewer seeds, a smaller batch or a smaller world")
        if self.threshold is not None:
            check_number(_OWNER, "threshold", self.threshold, 0, 1, why="rewards lie in [0, 1]; null: the initial median reward")
        if self.method.entropy_target is not None and self.method.entropy_target > math.log(self.vocab_size):
            fail(_OWNER, "entropy_target", self.method.entropy_target,
                 f"must be ≤ ln(vocab_size) = {math.log(self.vocab_size):.3f} nats (the largest per-token entropy)")
        if self.teacher == "null" and self.rho != 0:  # the control must know nothing of its own attempt
            fail(_OWNER, "rho", self.rho, "must be 0 with teacher='null': its feedback comes from another rollout, but a self-reading "
                 "(rho > 0) would still see its own attempt's token contributions, so it would not be a control")
        if self.teacher == "demo" and self.feedback != "demo":
            fail(_OWNER, "teacher", self.teacher, f"needs feedback='demo' (a sibling demonstration), got feedback={self.feedback!r}")
        if self.method.distills and self.method.num_generations < 2:
            fail(_OWNER, "teacher", self.teacher, "needs num_generations ≥ 2: its expected score comes from the siblings")
        if self.method.support == "topk" and self.method.topk > self.vocab_size:
            fail(_OWNER, "method.topk", self.method.topk, f"must be ≤ vocab_size={self.vocab_size}")
        return self

    @classmethod
    def run_field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "method")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Flat mapping (``{"method": "sdpo", "alpha": 0.5, "noise": 0.1}``) or nested ``method: {...}``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a run config must be a mapping, got {type(data).__name__}")
        run_keys = set(cls.run_field_names())
        method_keys = (set(MethodConfig.field_names()) - {"name"}) | {"method"}  # flat: `method` is MethodConfig.name
        unknown = sorted(set(data) - run_keys - method_keys)
        if unknown:
            raise ValueError(
                f"unknown RunConfig field(s) {', '.join(map(repr, unknown))}; known fields: "
                f"{', '.join(cls.run_field_names())}, method and MethodConfig's {', '.join(MethodConfig.field_names()[1:])}"
            )
        method = {k: v for k, v in data.items() if k in method_keys and k != "method"}
        if isinstance(data.get("method"), Mapping):
            method = {**dict(data["method"]), **method}
        elif "method" in data:  # the flat key `method` is MethodConfig.name
            method["name"] = data["method"]
        values = {k: v for k, v in data.items() if k in run_keys}
        for name in ("noise", "hint_noise", "rho", "beta", "lr", "threshold"):
            if is_int(values.get(name)):
                values[name] = float(values[name])
        return cls(method=MethodConfig.from_dict(method), **values)

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-able; round-trips through :meth:`from_dict`."""
        method = {("method" if k == "name" else k): v for k, v in self.method.to_dict().items()}
        return {**method, **{k: getattr(self, k) for k in self.run_field_names()}}

    def replace(self, **changes: Any) -> "RunConfig":
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclass
class RunResult:
    config: RunConfig
    history: pd.DataFrame  # one row per (seed, evaluation step), columns HISTORY_COLUMNS

    def summary(self) -> dict[str, Any]:
        """The object ``sdpo-sim run --json`` prints (NaN becomes None)."""
        h = self.history
        last = h[h.step == h.step.max()].sort_values("seed")
        per_seed = [
            {"seed": int(seed), "final_reward": _num(row.reward), "credit_corr": _num(h[h.seed == seed].credit_pearson.mean()),
             "entropy": _num(row.entropy)}
            for seed, row in zip(last.seed, last.itertuples())
        ]
        return {
            "final_reward": _num(last.reward.mean()),
            "final_reward_ci95": _num(ci95(last.reward.to_numpy())),
            "credit_corr": _num(h.credit_pearson.mean()),  # pandas' mean skips NaN
            "entropy": _num(last.entropy.mean()),
            "per_seed": per_seed,
            "config": self.config.to_dict(),
        }


def _num(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def ci95(values) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean (NaN for one value)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def initial_median_reward(task: Task, policy: TabularPolicy, theta: torch.Tensor) -> float:
    """Median of R(y) under the initial policy (the default binary threshold τ)."""
    p = policy.seq_logprobs(theta[:1].double())[0].exp()
    order = task.rewards.argsort()
    cdf = p[order].cumsum(0)
    return float(task.rewards[order][torch.searchsorted(cdf, torch.tensor(0.5, dtype=cdf.dtype))])


def _per_run(token_loss: torch.Tensor, mask: Optional[torch.Tensor], loss_type: str) -> torch.Tensor:
    """``aggregate`` applied to each run separately: ``[runs, B, T]`` → ``[runs]``."""
    if mask is None:
        mask = torch.ones_like(token_loss)
    return torch.func.vmap(lambda loss, m: aggregate(loss, m, loss_type))(token_loss, mask.to(token_loss.dtype))


def _token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[y_t]``: ``[..., T, V]``, ``[..., T]`` → ``[..., T]``."""
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _teacher_network_logits(m: MethodConfig, policy: TabularPolicy, logits: torch.Tensor, teacher_theta: torch.Tensor,
                            theta_init: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Logits ``[runs, B, T, V]`` of the network the teacher re-reads with: the live student, its EMA,
    the frozen initial policy, or the trust-region mix ``(1 − rate)·ℓ_init + rate·ℓ_student``."""
    if m.teacher_kind == "live":
        return logits.detach()
    if m.teacher_kind == "ema":
        return policy.logits(teacher_theta, seqs)
    if m.teacher_kind == "frozen":
        return policy.logits(theta_init, seqs)
    return (1 - m.teacher_rate) * policy.logits(theta_init, seqs) + m.teacher_rate * logits.detach()


def _masked_mean(tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tok [runs, B, T]`` over each run's masked tokens → ``[runs]``."""
    return (tok * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)


def _teacher_stats(logits: torch.Tensor, teacher_logits: torch.Tensor, seqs: torch.Tensor, mask: torch.Tensor, alpha: float):
    """Batch-mean divergence ``[runs]`` over masked tokens and SDPO's per-token distillation signal
    ``log p_T(y_t) − log p_θ(y_t)`` ``[runs, B, T]`` (0 where there is no distillation loss)."""
    _, div, signal = token_statistics(logits, teacher_logits, seqs, alpha, with_entropy=False)
    return _masked_mean(div, mask), signal * mask


# Fields that may differ between the configurations of one tensor program (run_group): each run carries its own.
PER_RUN_FIELDS = ("lr", "beta", "rho", "noise", "hint_noise", "threshold", "task_seed", "seeds", "seed_start")


def group_key(cfg: RunConfig) -> str:
    """What configurations must share to train together in :func:`run_group`: every field but :data:`PER_RUN_FIELDS`."""
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in PER_RUN_FIELDS}, sort_keys=True)


def run(cfg: RunConfig, *, progress: bool = False) -> RunResult:
    """Train ``cfg.seeds`` independent runs at once and return their exact learning curves."""
    return run_group([cfg], progress=progress)[0]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parameters of all runs ``[runs, T, C, V]`` from each configuration's leaf tensor (the leaf itself if one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def run_group(cfgs: Sequence[RunConfig], *, progress: bool = False) -> list[RunResult]:
    """Train several configurations as one tensor program and return one :class:`RunResult` per configuration.

    The configurations may differ only in :data:`PER_RUN_FIELDS` (``group_key`` equal); their runs are stacked
    along the runs axis (``[Σ seeds, B, T, V]``), each run with its own learning rate (one optimiser parameter
    group per configuration), β, ρ, noise, τ and task (:class:`~sdpo_sim.per_run.RunTasks`). Runs never interact,
    so a run's numbers are bit for bit those it gets alone (tested).
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("run_group needs at least one configuration")
    cfg = cfgs[0]
    mismatched = [i for i, c in enumerate(cfgs) if group_key(c) != group_key(cfg)]
    if mismatched:
        raise ValueError(f"run_group: configuration(s) {mismatched} differ from the first in a field other than {', '.join(PER_RUN_FIELDS)}")
    m = cfg.method
    R, B, T, V = sum(c.seeds for c in cfgs), cfg.batch_size, cfg.seq_len, cfg.vocab_size
    seeds = torch.cat([torch.arange(c.seed_start, c.seed_start + c.seeds) for c in cfgs])

    def setting(name: str) -> torch.Tensor:  # [R]: each run's value of a per-run field
        return torch.cat([torch.full((c.seeds,), float(getattr(c, name)), dtype=torch.float64) for c in cfgs])

    task_of = {c.task_seed: family_task(c.task_seed, V, T, cfg.family) for c in cfgs}  # each distinct task once
    tasks = RunTasks([task_of[c.task_seed] for c in cfgs for _ in range(c.seeds)])
    policy = TabularPolicy(cfg.policy, V, T, m.temperature)
    parts = [policy.init_params(c.seeds).requires_grad_(True) for c in cfgs]  # one leaf per configuration
    theta = _joined(parts)
    theta_init = theta.detach().clone()
    teacher_theta = theta.detach().clone()  # ema / frozen / trust-region reference
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)([{"params": [p], "lr": c.lr} for p, c in zip(parts, cfgs)])

    median = {seed: initial_median_reward(t, policy, theta_init) for seed, t in task_of.items() if any(
        c.threshold is None and c.task_seed == seed for c in cfgs)}  # the default τ of each task that needs one
    threshold = torch.cat([torch.full((c.seeds,), c.threshold if c.threshold is not None else median[c.task_seed], dtype=torch.float64)
                           for c in cfgs])  # [R]
    judge = Judge(tasks, threshold)
    noise, hint_noise, beta = setting("noise"), setting("hint_noise"), setting("beta")
    knowledge = SelfKnowledge(judge, setting("rho"), seed=tasks.seeds)  # each run's misbelief from its task seed
    teacher = {"bayes": BayesTeacher, "null": BayesTeacher, "demo": DemoTeacher, "oracle": OracleTeacher}.get(cfg.teacher)
    teacher = teacher(beta) if teacher else SeedPaperTeacher(tasks.q, beta)
    controller = m.make_controller()

    def update_loss(theta: torch.Tensor, logits: torch.Tensor, logp: Optional[torch.Tensor], seqs: torch.Tensor, fb, step: int,
                    success: Optional[torch.Tensor], old_logp: Optional[torch.Tensor], evaluate: bool) -> dict:
        """Steps 3-5 for one update on this step's batch: the method's loss ``[]`` (summed over runs, which never
        interact), and for evaluation steps the credit, divergence and feedback credit. ``old_logp`` (rollout reuse):
        the sampling policy's log-probabilities, so the PPO ratio and the importance-weight cap act."""
        out_ = {"div": None, "feedback_credit": None, "alpha_mix": torch.full((R,), float("nan"))}
        # 3. policy-gradient term: REINFORCE (batch-mean baseline) or GRPO (group-normalised; blend, srpo too)
        if m.uses_policy_gradient:
            adv = m.advantages(fb.score)
            credit = adv.unsqueeze(-1).expand(-1, -1, T)
            if m.name in ("reinforce", "grpo", "hybrid"):
                pg_loss = _per_run(policy_gradient_token_loss(logp, adv, old_logp, epsilon=m.epsilon), None, m.loss_type)
        # 4. self-teacher logits and the distillation term
        if m.distills:
            base = _teacher_network_logits(m, policy, logits, teacher_theta, theta_init, seqs)
            if cfg.teacher == "oracle":  # the only teacher given A*
                tables = exact.chain_tables(tasks.rewards(0, R), policy.conditionals(theta.detach().double()), policy.kind == "markov")[1]
                a_star = exact.action_values_from_tables(tables, seqs)
                out = teacher(base, seqs, fb, knowledge, true_advantages=a_star)
            elif cfg.teacher == "null":  # control: the feedback of a different, random rollout of the batch
                shift = 1 + (rng.uniform(seeds, rng.NULL_PICK, step, (B,)) * (B - 1)).long()
                out = teacher(base, seqs, fb.take((torch.arange(B) + shift) % B), knowledge)
            else:
                out = teacher(base, seqs, fb, knowledge)
            mask = out.mask.unsqueeze(-1).expand(-1, -1, T)
            sd_tok = sdpo_token_loss(logits, out.logits, alpha=m.alpha, support=m.support, topk=m.topk, add_tail=m.add_tail,
                                     tokens=seqs, objective=m.distill_loss)
            # the full-vocabulary divergence per token is this loss itself (same formula, same inputs, same bits)
            divergence_tok = sd_tok.detach() if m.support == "full" and m.distill_loss == "alpha" else None
            carried = mask & ~success.unsqueeze(-1) if m.name == "srpo" else mask  # tokens that carry the distillation term
            weights = m.distill_weights(
                scores=fb.score, mask=carried, success=success, step=step, total_steps=cfg.steps, dtype=sd_tok.dtype,
                teacher_entropy=token_entropy(out.logits) if m.distill_token_weight == "teacher_confidence" else None)
            blend_signal = m.name == "blend" and m.support == "sampled"  # the paper's advantage form: the PPO ratio acts
            if old_logp is not None and not blend_signal:
                sd_tok = sd_tok * truncated_importance_weight(logp, old_logp, m.is_clip)
            if weights is not None:
                sd_tok = sd_tok * weights
            if m.name in ("sdpo", "hybrid"):
                sd_loss = _per_run(sd_tok, mask, m.loss_type)
            sd_credit = None
            if evaluate or (m.name == "hybrid" and divergence_tok is None):  # the divergence feeds the hybrid controller
                out_["div"], sd_credit = _teacher_stats(logits, out.logits, seqs, mask, m.alpha)
            elif m.name == "hybrid":  # between evaluations the controller needs only the batch-mean divergence
                out_["div"] = _masked_mean(divergence_tok, mask)
            if evaluate:  # feedback credit: the teacher with feedback vs the same network without it (no teacher lag)
                out_["feedback_credit"] = (_token_logp(out.logits, seqs) - _token_logp(base, seqs)) * mask
        # 5. combine: pure terms, the hybrid mixture with its alpha controller, the blend or the routing
        if m.name == "hybrid":
            with torch.no_grad():
                entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean((1, 2))
            alpha_mix = out_["alpha_mix"] = controller.update(divergence=out_["div"], entropy=entropy)
            loss = hybrid_loss(sd_loss, pg_loss, alpha_mix)
            if evaluate:  # credit is a metric
                credit = alpha_mix.view(-1, 1, 1) * sd_credit + (1 - alpha_mix.view(-1, 1, 1)) * credit
        elif m.name == "blend":
            if blend_signal:
                signal = (_token_logp(out.logits, seqs) - logp).detach()
                tok = advantage_blend_token_loss(logp, adv, m.blend_lambda, distill_mask=mask, old_logp=old_logp, epsilon=m.epsilon,
                                                 signal=signal if weights is None else signal * weights)
            else:
                tok = advantage_blend_token_loss(logp, adv, m.blend_lambda, distill_mask=mask, old_logp=old_logp, epsilon=m.epsilon,
                                                 distill_tok=sd_tok)
            loss = _per_run(tok, None, m.loss_type)
            if evaluate:
                credit = m.blend_lambda * credit + (1 - m.blend_lambda) * sd_credit
        elif m.name == "srpo":
            pg_tok = policy_gradient_token_loss(logp, adv, old_logp, epsilon=m.epsilon)
            tok, routed = routed_token_loss(pg_tok, sd_tok, success, mask)
            loss = _per_run(tok, routed, m.loss_type)
            if evaluate:
                s = success.unsqueeze(-1).to(credit.dtype)
                credit = s * credit + (1 - s) * sd_credit
        elif m.distills:
            loss, credit = sd_loss, sd_credit
        else:
            loss = pg_loss
        # the reference policy (the initial one), for any method
        if m.uses_reference:
            ref_logp = _token_logp(policy.logits(theta_init, seqs), seqs)
            if m.ref_beta > 0:
                kl = reference_kl(logp, ref_logp, old_logp, bias_correction=m.use_bias_correction_kl)
                loss = loss + m.ref_beta * _per_run(kl, None, m.loss_type)
            if m.ref_anchor > 0:
                loss = loss + m.ref_anchor * _per_run(reference_anchor(logp, ref_logp), None, m.loss_type)
        out_["loss"], out_["credit"] = loss.sum(), credit
        return out_

    def optimiser_step() -> None:
        opt.step()
        with torch.no_grad():
            teacher_theta.add_(m.teacher_rate * (_joined(parts) - teacher_theta))  # EMA teacher: θ_T ← θ_T + rate·(θ − θ_T)

    reuse = cfg.updates_per_batch > 1
    # log π_θ(y_t) of the sampled tokens, where a term reads it (pure distillation on fresh rollouts does not)
    needs_logp = m.uses_policy_gradient or m.uses_reference or reuse
    rows = []
    for step in tqdm(range(cfg.steps + 1), disable=not progress, desc=f"{m.name}/{cfg.teacher}", unit="step"):
        evaluate = step % cfg.eval_every == 0 or step == cfg.steps
        theta = _joined(parts)
        # 1. sample a group of completions per run
        seqs = policy.sample(theta, rng.uniform(seeds, rng.SAMPLE, step, (B, T)))  # [R, B, T]
        logits = policy.logits(theta, seqs)  # [R, B, T, V]
        logp = _token_logp(logits, seqs) if needs_logp else None  # [R, B, T]
        # 2. the judge's feedback about each completion
        fb = judge(seqs, cfg.feedback, group_size=m.num_generations, noise=noise, hint_noise=hint_noise, seeds=seeds, step=step)
        success = fb.success(judge.threshold) if m.needs_success else None  # [R, B]: the interval of R + ε lies above τ
        exact_now = metrics.exact_state(tasks, policy, theta, theta_init, seqs) if evaluate else None
        old_logp = logp.detach() if reuse else None  # behaviour policy = the policy that sampled
        res = update_loss(theta, logits, logp, seqs, fb, step, success, old_logp, evaluate)
        # 6. update (runs are independent: each run's parameters only see its own loss)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        if evaluate:
            a_star, credit, nan = exact_now["advantages"], res["credit"], torch.full((R,), float("nan"))
            rows.append({
                "seed": seeds, "step": torch.full((R,), step), "reward": exact_now["reward"], "entropy": exact_now["entropy"],
                "seq_entropy": exact_now["seq_entropy"], "kl_init": exact_now["kl_init"],
                "divergence": res["div"] if m.distills else nan, "alpha_mix": res["alpha_mix"],
                "credit_pearson": metrics.pearson(credit, a_star), "credit_spearman": metrics.spearman(credit, a_star),
                "credit_pearson_within": metrics.pearson_within(credit, a_star),
                "feedback_credit_pearson": metrics.pearson(res["feedback_credit"], a_star) if m.distills else nan,
                "grad_cos": metrics.cosine(-_joined([p.grad for p in parts]), exact_now["grad_J"]), "batch_reward": tasks.reward(seqs).mean(1),
            })
        if step < cfg.steps:
            optimiser_step()
            for _ in range(1, cfg.updates_per_batch):  # rollout reuse: the same batch, the current policy and teacher
                theta = _joined(parts)
                logits = policy.logits(theta, seqs)
                res = update_loss(theta, logits, _token_logp(logits, seqs), seqs, fb, step, success, old_logp, False)
                opt.zero_grad(set_to_none=True)
                res["loss"].backward()
                optimiser_step()
    history = pd.DataFrame({k: torch.cat([r[k].detach().double() if k not in ("seed", "step") else r[k] for r in rows]).numpy()
                            for k in HISTORY_COLUMNS})
    owner = torch.repeat_interleave(torch.arange(len(cfgs)), torch.tensor([c.seeds for c in cfgs])).repeat(len(rows)).numpy()
    return [RunResult(c, history[owner == i].sort_values(["seed", "step"], kind="stable").reset_index(drop=True)) for i, c in enumerate(cfgs)]
