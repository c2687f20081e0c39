"""``sdpo-llm credit-truth``: the self-teacher's feedback credit per feedback channel against two ground truths.

For each channel (``binary``, ``ordinal``, ``continuous``, ``critique``: that feedback text alone in the teacher context;
``demonstration``: the best successful sibling alone) a :class:`~llm.trainer.Trainer` of the recipe samples a step's
rollouts (the same completions for every channel: same weights, same seeds), and for every distilled token measures

- the feedback credit ``log p_T(y_t | context) − log p_T(y_t | prompt)`` (:func:`llm.credit.feedback_credit`),
- the judge's counterfactual contribution ``c_t`` and the Monte Carlo advantage ``Â_t`` with its SE
  (:mod:`llm.ground_truth`; computed once per step, shared by the channels while their weights are equal),

then the Pearson correlation of the credit with each over the pooled tokens, with percentile CIs from a bootstrap over
completions; for ``Â_t`` also the disattenuated correlation (the per-token SEs' noise removed, see
:func:`llm.ground_truth.correlation`). ``steps``: measure at these training steps; between them each channel's
trainer trains on its own channel. Writes ``credit_truth.csv`` (one row per channel × step × ground truth × estimator),
``credit_truth.json`` (the same with the settings), ``tokens.csv`` (every measured token) and a heat-map per channel
with the ground-truth rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from sdpo_sim.core.io import atomic_write_text, check_output_dir

from .batch import select_rows
from .credit import feedback_credit
from .ground_truth import Sampling, Scorer, bootstrap_correlation, counterfactual_contributions, mc_advantages
from .heatmap import credit_heatmap_html
from .models import teacher_outputs
from .recipe import Recipe
from .trainer import Trainer

CHANNELS = ("binary", "ordinal", "continuous", "critique", "demonstration")
CSV_FIELDS = ("channel", "step", "ground_truth", "estimator", "r", "ci_lo", "ci_hi", "reliability", "tokens", "completions")


def parse_channels(text: str) -> list[str]:
    """``"binary,critique"`` → the channels, each one of :data:`CHANNELS`, none twice."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CHANNELS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"--channels={text!r} must list distinct channels, comma-separated, from {', '.join(CHANNELS)}")
    return names


def parse_steps(text: str) -> list[int]:
    """``"0,5"`` → increasing training steps ≥ 0."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 0 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"--steps={text!r} must be increasing integers >= 0, comma-separated (e.g. 0 or 0,10)")
    return steps


def channel_recipe(recipe: Recipe, channel: str, out_dir: Path) -> Recipe:
    """``recipe`` with its teacher context reduced to one channel, writing under ``out_dir/channel``."""
    if channel == "demonstration":
        fields = {"task.feedback": "none", "context.use_feedback": False, "context.use_demo": True}
    else:
        fields = {"task.feedback": channel, "context.use_feedback": True, "context.use_demo": False}
    return recipe.with_overrides({**fields, "training.output_dir": str(out_dir / channel), "training.save_every": 0,
                                  "training.heatmap_every": 0})


def check_program_judge(recipe: Recipe) -> None:
    """Ground truth needs a judge that is a program: refuse a reward-model or LLM-judge directory."""
    specs = list(recipe.task.reward_funcs) + ([recipe.task.judge] if recipe.task.judge else [])
    models = [s for s in specs if Path(s).is_dir()]
    if models:
        raise ValueError(f"credit-truth needs a program judge (the task's rule-based judge or module:function reward "
                         f"functions); {models[0]!r} is a model directory, whose counterfactuals cost a model call each")


def _prompt_ids(batch, T: int) -> list[list[int]]:
    """Each row's prompt ids: the student row's left-padded first ``P`` columns, unpadded."""
    P = batch.input_ids.shape[1] - T
    return [ids[:P][m[:P].bool()].tolist() for ids, m in zip(batch.input_ids.cpu(), batch.attention_mask.cpu())]


@torch.no_grad()
def measure_step(trainer: Trainer, step: int, truth_cache: dict, *, n_continuations: int, vocab_sample: Optional[int],
                 seed: int) -> list[dict]:
    """One channel's rollout of ``step``: per distilled completion its tokens, feedback credit, ``c_t``, ``Â_t`` and SE."""
    with trainer.autocast():
        batch, info = trainer.rollout(step)
        T = batch.completion_ids.shape[1]
        rows = batch.distill_mask.nonzero().squeeze(-1)
        credit = torch.zeros(0, T)
        if rows.numel():
            out, _ = teacher_outputs(trainer, *select_rows(batch.teacher_input_ids, batch.teacher_attention_mask, rows), T)
            full = out.new_zeros((batch.completion_ids.shape[0], *out.shape[1:])).index_copy(0, rows, out)  # indexed by rows
            credit = feedback_credit(trainer, batch, rows, full, T).float().cpu()
    t, g = trainer.training, trainer.method.num_generations
    row_of = [r for r in trainer.prompts.rows_for_step(t.seed, step, t.prompts_per_step) for _ in range(g)]
    prompts = info["prompts"]
    score = Scorer(trainer.rewards, prompts, {c: [r.columns.get(c) for r in row_of] for c in trainer.prompts.column_names})
    tok = trainer.tokenizer
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731 — as the rollout decodes
    p_ids, comps = _prompt_ids(batch, T), info["completion_ids"]
    keys = [(step, tuple(p), tuple(c)) for p, c in zip(p_ids, comps)]
    missing = list({keys[i]: i for i in rows.tolist() if keys[i] not in truth_cache}.values())  # one per distinct completion
    if missing:
        sampling = Sampling(temperature=trainer.method.temperature, max_new_tokens=t.max_new_tokens, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id, top_k=trainer.recipe.generation.top_k, top_p=trainer.recipe.generation.top_p)
        group_row = [i - i % g for i in missing]  # a group's rows share prompt and columns: one V̂(prompt) per group
        c_t = counterfactual_contributions([comps[i] for i in missing], group_row, score, decode, len(tok), vocab_sample=vocab_sample,
                                           seed=seed)
        stats: dict = {}
        adv = mc_advantages(trainer.unwrapped, [p_ids[i] for i in missing], [comps[i] for i in missing], group_row, score, decode,
                            sampling, n_continuations=n_continuations, seed=seed, stats=stats)
        for i, c, a in zip(missing, c_t, adv):
            truth_cache[keys[i]] = (c, a)
        truth_cache.setdefault("_stats", []).append(stats)  # read by credit_truth, whichever cache it is
    out = []
    for k, i in enumerate(rows.tolist()):
        c, a = truth_cache[keys[i]]
        n = len(comps[i])
        out.append({"completion": i, "prompt": prompts[i], "text": info["texts"][i], "tokens": [tok.decode([x]) for x in comps[i]],
                    "credit": credit[k, :n].numpy().astype(float), "c_t": c, "A_t": a.advantages, "A_se": a.advantage_se})
    return out


def summarise(channel: str, step: int, measured: list[dict], *, n_boot: int, seed: int) -> list[dict]:
    """Tidy rows: the credit's correlation with ``c_t`` (Pearson) and with ``Â_t`` (Pearson and disattenuated), with CIs."""
    credit = [m["credit"] for m in measured]
    base = {"channel": channel, "step": step, "tokens": int(sum(len(x) for x in credit)), "completions": len(credit)}
    cf = bootstrap_correlation(credit, [m["c_t"] for m in measured], n_boot=n_boot, seed=seed)
    adv = bootstrap_correlation(credit, [m["A_t"] for m in measured], [m["A_se"] for m in measured], n_boot=n_boot, seed=seed)
    return [
        {**base, "ground_truth": "counterfactual", "estimator": "pearson", "r": cf["r"], "ci_lo": cf["r_lo"], "ci_hi": cf["r_hi"],
         "reliability": math.nan},
        {**base, "ground_truth": "advantage_mc", "estimator": "pearson", "r": adv["r"], "ci_lo": adv["r_lo"], "ci_hi": adv["r_hi"],
         "reliability": adv["reliability"]},
        {**base, "ground_truth": "advantage_mc", "estimator": "disattenuated", "r": adv["r_disattenuated"],
         "ci_lo": adv["r_disattenuated_lo"], "ci_hi": adv["r_disattenuated_hi"], "reliability": adv["reliability"]},
    ]


def _csv(rows: Sequence[dict], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})
    return buf.getvalue()


def _finite(x):
    """JSON-safe: NaN → None."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def credit_truth(recipe: Recipe, out_dir: Path, *, channels: Sequence[str] = CHANNELS, steps: Sequence[int] = (0,),
                 n_continuations: int = 16, vocab_sample: Optional[int] = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Measure, write the files under ``out_dir`` and return the JSON payload (see the module docstring)."""
    if isinstance(n_continuations, bool) or not isinstance(n_continuations, int) or n_continuations < 2:
        raise ValueError(f"--n-continuations={n_continuations!r} must be an integer >= 2 (the standard error needs two)")
    if vocab_sample is not None and (isinstance(vocab_sample, bool) or not isinstance(vocab_sample, int) or vocab_sample < 1):
        raise ValueError(f"--vocab-sample={vocab_sample!r} must be an integer >= 1 (omit it for the whole vocabulary)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"--bootstrap={n_boot!r} must be an integer >= 1")
    if not recipe.method.distills:
        raise ValueError(f"method.name={recipe.method.name!r} has no self-teacher, so no feedback credit; use a distilling "
                         "method (sdpo, hybrid, ...)")
    if steps[-1] >= recipe.training.steps:
        raise ValueError(f"--steps {','.join(map(str, steps))}: every step must be < training.steps={recipe.training.steps}")
    check_program_judge(recipe)
    out_dir = check_output_dir(out_dir, "--out")
    recipes = {c: channel_recipe(recipe, c, out_dir) for c in channels}  # all validated before any model loads
    t0 = time.time()
    mc_stats: list[dict] = []  # continuations sampled, over every step and channel
    rows, tokens, truth_cache, heatmaps = [], [], {"_stats": mc_stats}, {}
    for channel in tqdm(channels, desc="credit-truth channels", unit="channel"):
        trainer = Trainer(recipes[channel])
        done = 0
        for step in steps:
            while done < step:  # train on this channel up to the measured step
                trainer.step(done)
                done += 1
            cache = truth_cache if step == 0 else {"_stats": mc_stats}  # equal weights only before training: share the truth then
            measured = measure_step(trainer, step, cache, n_continuations=n_continuations, vocab_sample=vocab_sample, seed=seed)
            rows += summarise(channel, step, measured, n_boot=n_boot, seed=seed)
            for m in measured:
                for t, (tk, cr, c, a, se) in enumerate(zip(m["tokens"], m["credit"], m["c_t"], m["A_t"], m["A_se"])):
                    tokens.append({"channel": channel, "step": step, "completion": m["completion"], "t": t, "token": tk,
                                   "feedback_credit": float(cr), "c_t": float(c), "A_t": float(a), "A_se": float(se)})
            if measured and step == steps[-1]:
                m = measured[0]
                heatmaps[channel] = credit_heatmap_html(
                    m["tokens"], m["credit"], f"{channel} · step {step} · feedback credit (log p_T with context − without) · {m['prompt'].strip()[:60]}",
                    truth={"counterfactual c_t": m["c_t"], "advantage Â_t (MC)": m["A_t"]})
        del trainer
    settings = {"recipe_model": recipe.model.path, "task": recipe.task.name, "channels": list(channels), "steps": list(steps),
                "prompts_per_step": recipe.training.prompts_per_step, "num_generations": recipe.method.num_generations,
                "max_new_tokens": recipe.training.max_new_tokens, "n_continuations": n_continuations,
                "vocab_sample": vocab_sample, "bootstrap": n_boot, "seed": seed,
                "ci": "95% percentile bootstrap over completions",
                "disattenuation": "r / sqrt(reliability), reliability = (var(A_hat) - mean(SE^2)) / var(A_hat) over the pooled tokens"}
    stats = mc_stats
    payload = {"settings": settings, "rows": [{k: _finite(v) for k, v in r.items()} for r in rows],
               "mc": {"continuation_tokens": int(sum(s["continuation_tokens"] for s in stats)),
                      "continuations": int(sum(s["continuations"] for s in stats))},
               "wall_time_s": round(time.time() - t0, 1)}
    atomic_write_text(out_dir / "credit_truth.csv", _csv(rows, CSV_FIELDS))
    atomic_write_text(out_dir / "credit_truth.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out_dir / "tokens.csv", _csv(tokens, ("channel", "step", "completion", "t", "token", "feedback_credit", "c_t", "A_t", "A_se")))
    for channel, page in heatmaps.items():
        atomic_write_text(out_dir / f"heatmap-{channel}.html", page)
    return payload


def format_rows(rows: Sequence[dict]) -> str:
    """The summary table printed by the command."""
    lines = [f"{'channel':<14}{'step':>5}  {'ground truth':<15}{'estimator':<15}{'r':>7}  {'95% CI':<17}{'tokens':>7}"]
    for r in rows:
        fmt = lambda v: "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"  # noqa: E731
        lines.append(f"{r['channel']:<14}{r['step']:>5}  {r['ground_truth']:<15}{r['estimator']:<15}{fmt(r['r']):>7}  "
                     f"[{fmt(r['ci_lo'])}, {fmt(r['ci_hi'])}]  {r['tokens']:>6}")
    return "\n".join(lines)
