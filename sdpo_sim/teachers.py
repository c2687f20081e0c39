"""Self-teachers of the toy world: models of a network re-reading its attempt with feedback (docs/design.md §3).

Every teacher is called as ``teacher(logits, attempt, feedback, knowledge)`` and sees exactly that:
the student's (or the EMA/frozen teacher network's) logits ``[runs, B, T, V]``, the attempt
``[runs, B, T]``, the judge's :class:`~sdpo_sim.feedback.Feedback` about it (the group's feedback
included, as a sibling would be in context), and a :class:`SelfKnowledge`. It returns teacher logits
``ℓ_T = ℓ + β·Â`` where ``Â_t(v)`` is its credit estimate in units of ``s``, the typical size of a
token's contribution (so ``β = 1`` moves a logit by one nat for a typical credit). Only ``oracle``
receives the exact advantage ``A*``; only ``seed-paper`` receives a reward table (that is its flaw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from .exact import credit_scale
from .feedback import STARS, Feedback, Judge
from .per_run import RunTasks, Setting, per_run

TEACHERS = ("bayes", "demo", "oracle", "null", "seed-paper")
LINK_SD = 0.5  # the teacher's allowance (in units of s) for what an additive credit model cannot explain
HINT_FLOOR = 1e-3  # minimal hint noise (units of s) so noiseless hints stay a proper Gaussian observation


@dataclass
class TeacherOutput:
    logits: torch.Tensor  # [runs, B, T, V] teacher logits ℓ + β·Â
    credit: torch.Tensor  # [runs, B, T, V] Â in units of s
    mask: torch.Tensor  # [runs, B] bool: completions that get a distillation loss


class SelfKnowledge:
    """An introspective reading ``m = c + η`` of the counterfactual contributions of an attempt.

    ``c = judge.contributions(y)``; the misbelief ``η`` is a fixed, seeded function of
    ``(y with y_t := v, t)`` scaled so that ``corr(m, c) = ρ``. The Bayesian prior given ``m`` is
    ``N(ρ²·m, (1 − ρ²)·s²)``, written as ``ρ·(ρ·c + √(1−ρ²)·s·z)`` so ``ρ = 0`` is finite.
    The misbelief belongs to the (shared) initial model, so all training seeds share it; ``seed`` seeds it
    (one int, or ``[runs]``: each run's own, as its task seed when the runs' tasks differ). ``s`` is the task's
    credit scale, a float (one task) or ``[runs]`` (each run's task, :class:`~sdpo_sim.per_run.RunTasks`).
    """

    def __init__(self, judge: Judge, rho: Setting, seed: Union[int, torch.Tensor] = 0) -> None:
        values = rho.tolist() if isinstance(rho, torch.Tensor) else [rho]
        if not all(isinstance(r, (int, float)) and 0.0 <= r <= 1.0 for r in values):
            raise ValueError(f"rho={rho!r} (self-knowledge fidelity) must be a number in [0, 1] (or a [runs] tensor of them)")
        task = judge.task
        self.judge, self.rho = judge, rho.double() if isinstance(rho, torch.Tensor) else float(rho)
        self.scale: Setting = task.scale if isinstance(task, RunTasks) else credit_scale(task.rewards, task.seq_len)  # s
        seeds = seed.tolist() if isinstance(seed, torch.Tensor) else [seed]
        distinct = sorted(set(seeds))
        self._z = torch.stack([  # [seeds, V**T, T]: one misbelief table per distinct seed
            torch.randn(task.num_sequences, task.seq_len, generator=torch.Generator().manual_seed(7919 * s + 17), dtype=torch.float64)
            for s in distinct])
        owner = torch.tensor([distinct.index(s) for s in seeds])
        self._offset = (owner * task.num_sequences * task.seq_len).view(-1, 1, 1, 1) if isinstance(seed, torch.Tensor) else 0

    def prior(self, attempt: torch.Tensor) -> tuple[torch.Tensor, Setting]:
        """Prior mean ``[runs, B, T, V]`` and variance (a float, or ``[runs, 1, 1]`` for per-run ρ) of the credits
        ``c_t(v; y)`` of ``attempt [runs, B, T]``."""
        V, T = self.judge.task.vocab_size, self.judge.task.seq_len
        swapped = self.judge.swapped_index(attempt)  # [runs, B, T, V]
        c = self.judge.contributions(attempt, swapped)
        z = self._z.view(-1).take(swapped * T + torch.arange(T).unsqueeze(-1) + self._offset)  # _z[run's seed, swapped, t]
        z = (z - z.mean(-1, keepdim=True)) * math.sqrt(V / (V - 1))  # centred over v like c, unit variance
        d = c.dim() - 1
        rho = per_run(self.rho, dims=d)
        spread = per_run((self.rho, self.scale), lambda r, s: math.sqrt(1.0 - r**2) * s, dims=d)
        return rho * (rho * c + spread * z), per_run((self.rho, self.scale), lambda r, s: (1.0 - r**2) * s**2, dims=d - 1)


def _leave_one_out(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of the other members of each group, ``[runs, B]``."""
    g = x.view(*x.shape[:-1], -1, group_size)
    return ((g.sum(-1, keepdim=True) - g) / (group_size - 1)).view(x.shape)


def expected_score(feedback: Feedback, spread: Setting) -> torch.Tensor:
    """The teacher's expectation of its latent score ``R+ε`` from its siblings' feedback, ``[runs, B]``.

    continuous/critique/demo: leave-one-out mean score; ordinal: mean of the siblings' bin midpoints;
    binary: ``τ + spread·Φ⁻¹(p̂)`` with ``p̂`` the siblings' pass rate (kept inside (0, 1)).
    Never the exact ``J``.
    """
    g = feedback.group_size
    if feedback.kind == "ordinal":
        return _leave_one_out((feedback.score - 0.5) / STARS, g)
    if feedback.kind == "binary":
        p = _leave_one_out(feedback.score, g).clamp(0.5 / (g - 1), 1 - 0.5 / (g - 1))
        return feedback.threshold + spread * math.sqrt(2.0) * torch.special.erfinv(2 * p - 1)
    return _leave_one_out(feedback.score, g)


def truncated_normal_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``E[w | a < w < b]`` for ``w ~ N(0, 1)`` = ``(φ(a) − φ(b)) / (Φ(b) − Φ(a))``, stable in both tails."""
    flip = a > 0  # use the symmetric left-tail form where the interval lies to the right
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_phi = lambda x: -0.5 * x**2 - 0.5 * math.log(2 * math.pi)  # noqa: E731
    log_cdf_b, log_cdf_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    log_z = log_cdf_b + torch.log1p(-torch.exp(log_cdf_a - log_cdf_b).clamp(max=1 - 1e-16))
    mean = torch.exp(log_phi(a) - log_z) - torch.exp(log_phi(b) - log_z)
    return torch.where(flip, -mean, mean)


class BayesTeacher:
    """Posterior-mean credit of a Gaussian model of the attempt's token credits (docs/design.md §3 ``bayes``).

    Prior per taken token ``x_t ~ N(μ_t, σ0²)`` from :class:`SelfKnowledge`. Observations:
    the score as a noisy sum ``w = Σ_t x_t + e``, ``e ~ N(0, σ² + (LINK_SD·s)²)``, with ``w`` the
    score minus the teacher's expected score (exact for continuous scores, an interval for ordinal
    and binary: a censored Gaussian); critique hints ``h_t = x_t + ε_t``. ``Â`` is the posterior mean
    on taken tokens and the prior mean elsewhere (a shift shared by all v is invisible to softmax).
    """

    def __init__(self, beta: Setting = 1.0) -> None:
        self.beta = beta

    def __call__(self, logits: torch.Tensor, attempt: torch.Tensor, feedback: Feedback, knowledge: SelfKnowledge) -> TeacherOutput:
        s, T = knowledge.scale, attempt.shape[-1]  # s: a float or [runs]
        mu, var0 = knowledge.prior(attempt)  # [runs, B, T, V], σ0²
        m = mu.gather(-1, attempt.unsqueeze(-1)).squeeze(-1)  # [runs, B, T]
        v = var0 + torch.zeros_like(m)
        if feedback.hints is not None:  # per-token Gaussian update: m ← m + σ0²/(σ0²+σh²)·(h − m)
            var_h = per_run((feedback.hint_noise, s), lambda h, s: h**2 + (HINT_FLOOR * s) ** 2, dims=2)
            m = m + var0 / (var0 + var_h) * (feedback.hints - m)
            v = v * var_h / (var0 + var_h)
        var_e = per_run((feedback.noise, s), lambda n, s: n**2 + (LINK_SD * s) ** 2, dims=1)  # σ² + (LINK_SD·s)²
        spread = per_run((feedback.noise, s), lambda n, s: math.sqrt(T * s**2 + (n**2 + (LINK_SD * s) ** 2)), dims=1)
        total_var = v.sum(-1) + var_e  # Var(w) = Σ_t v_t + σ_e²
        offset = expected_score(feedback, spread=spread) + m.sum(-1)  # E[score] under the prior
        if feedback.kind in ("binary", "ordinal"):  # censored: E[w | lower < w < upper]
            sd = total_var.sqrt()
            innovation = sd * truncated_normal_mean((feedback.lower - offset) / sd, (feedback.upper - offset) / sd)
        else:
            innovation = feedback.score - offset
        posterior = m + v / total_var.unsqueeze(-1) * innovation.unsqueeze(-1)  # E[x_t | obs]
        credit = mu.scatter(-1, attempt.unsqueeze(-1), posterior.unsqueeze(-1)) / per_run(s, dims=3)
        mask = torch.ones(attempt.shape[:-1], dtype=torch.bool)
        return TeacherOutput(logits + per_run(self.beta, dims=3, dtype=logits.dtype) * credit.to(logits.dtype), credit, mask)


class DemoTeacher:
    """Re-reading with a better sibling in context: ``ℓ_T = ℓ + β·onehot(demo_t)``; only completions
    whose demonstration scored higher get a loss (a completion is never its own demonstration)."""

    def __init__(self, beta: Setting = 1.0) -> None:
        self.beta = beta

    def __call__(self, logits: torch.Tensor, attempt: torch.Tensor, feedback: Feedback, knowledge: SelfKnowledge) -> TeacherOutput:
        if feedback.demo is None:
            raise ValueError("teacher='demo' needs feedback='demo' (a sibling demonstration)")
        credit = F.one_hot(feedback.demo, logits.shape[-1]).double()
        return TeacherOutput(logits + per_run(self.beta, dims=3, dtype=logits.dtype) * credit.to(logits.dtype), credit, feedback.demo_mask)


class OracleTeacher:
    """Upper bound: ``Â = A*/s``, the exact advantage of every alternative (the only teacher given A*)."""

    def __init__(self, beta: Setting = 1.0) -> None:
        self.beta = beta

    def __call__(
        self, logits: torch.Tensor, attempt: torch.Tensor, feedback: Feedback, knowledge: SelfKnowledge,
        *, true_advantages: torch.Tensor,
    ) -> TeacherOutput:
        credit = true_advantages / per_run(knowledge.scale, dims=3)
        mask = torch.ones(attempt.shape[:-1], dtype=torch.bool)
        return TeacherOutput(logits + per_run(self.beta, dims=3, dtype=logits.dtype) * credit.to(logits.dtype), credit, mask)


class SeedPaperTeacher:
    """The reference study's stated teacher, kept to show where its numbers come from. FLAWED on purpose:

    ``ℓ_T = ℓ + β·f·q[t, v]`` reads the ground-truth quality table ``q`` (an oracle in disguise), with
    ``f`` the feedback score scaled to [0, 1]; its critique variant subtracts a per-position scalar
    from every logit, which softmax ignores.
    """

    def __init__(self, quality_table: torch.Tensor, beta: Setting = 1.0) -> None:
        self.q, self.beta = quality_table, beta  # [T, V], or [runs, 1, T, V] (each run's task: RunTasks.q)

    def __call__(self, logits: torch.Tensor, attempt: torch.Tensor, feedback: Feedback, knowledge: SelfKnowledge) -> TeacherOutput:
        f = (feedback.score - 1) / (STARS - 1) if feedback.kind == "ordinal" else feedback.score
        credit = f[..., None, None] * self.q  # [runs, B, T, V]
        out = logits + per_run(self.beta, dims=3, dtype=logits.dtype) * credit.to(logits.dtype)
        if feedback.hints is not None:
            out = out - feedback.hints.unsqueeze(-1).to(logits.dtype)  # a per-position shift: no effect after softmax
        return TeacherOutput(out, credit, torch.ones(attempt.shape[:-1], dtype=torch.bool))
