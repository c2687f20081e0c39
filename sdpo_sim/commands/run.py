"""``sdpo-sim run``: train seeds of one toy-world configuration and print a summary (or JSON).

Every RunConfig and MethodConfig field is a flag (``task_seed`` → ``--task-seed``); only the flags
given are passed on, so defaults live in one place (the dataclasses).
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import fields

from ..core.method import MethodConfig
from ..train import RunConfig, run


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(kind):
    """Parser for an Optional[number] field: ``none``/``null`` → None."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_fields(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint)
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = _optional(base) if type(None) in args else base
        parser.add_argument(_flag(f.name), **kw)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="train one toy-world configuration over several seeds",
        description="Train cfg.seeds independent runs at once and report exact reward, entropy and credit correlation.",
    )
    p.add_argument("--method", dest="method", default=argparse.SUPPRESS, help="reinforce | grpo | sdpo | hybrid")
    _add_fields(p, MethodConfig, skip=("name",))
    _add_fields(p, RunConfig, skip=("method",))
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if k not in ("json", "func", "command")}
    cfg = RunConfig.from_dict(values)
    result = run(cfg, progress=not args.json)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(format_table(result))
    return 0


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_table(result) -> str:
    """Mean over seeds at each evaluation step, then the headline numbers."""
    cfg, s = result.config, result.summary()
    cols = ["reward", "entropy", "kl_init", "divergence", "alpha_mix", "credit_pearson", "grad_cos"]
    curve = result.history.groupby("step")[cols].mean()
    lines = [f"{cfg.method.name} | feedback={cfg.feedback} teacher={cfg.teacher} rho={cfg.rho} noise={cfg.noise} "
             f"lr={cfg.lr} seeds={cfg.seeds} task_seed={cfg.task_seed} policy={cfg.policy} V={cfg.vocab_size} T={cfg.seq_len}",
             "step".rjust(6) + "".join(c.rjust(16) for c in cols)]
    for step, row in curve.iterrows():
        lines.append(f"{step:6d}" + "".join(_fmt(row[c]).rjust(16) for c in cols))
    lines.append(f"final reward {_fmt(s['final_reward'])} ± {_fmt(s['final_reward_ci95'])} (95% CI) | "
                 f"credit corr {_fmt(s['credit_corr'])} | final entropy {_fmt(s['entropy'])} nats/token")
    return "\n".join(lines)
