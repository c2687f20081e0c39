"""The claims report: each claim of the reference simulation study (docs/design.md §2), measured.

One module per job: :mod:`~sdpo_sim.claims.measure` measures the claims and gives their verdicts,
:mod:`~sdpo_sim.claims.report` writes CLAIMS.md and CLAIMS.json, :mod:`~sdpo_sim.claims.job` runs the
whole job (sweep → figures → claims → report), and :mod:`~sdpo_sim.claims.formatting` writes a number for both
measure's notes and the report.
"""

from .job import SCALES, run_claims, spec_path
from .measure import (
    CONDITIONAL,
    FAILS,
    HOLDS,
    MISSING,
    VALUE_FORMATS,
    Claim,
    Condition,
    claim_credit,
    claim_entropy,
    claim_hybrid,
    claim_margin,
    claim_noise,
    claim_richness,
    claim_separation,
    evaluate,
    replica,
)
from .report import render_markdown, write_report

__all__ = ["CONDITIONAL", "FAILS", "HOLDS", "MISSING", "SCALES", "VALUE_FORMATS", "Claim", "Condition", "claim_credit", "claim_entropy",
           "claim_hybrid", "claim_margin", "claim_noise", "claim_richness", "claim_separation", "evaluate", "render_markdown", "replica",
           "run_claims", "spec_path", "write_report"]
