"""``sdpo-llm make-tiny``: build the tiny CPU model, pretrain it in memory, and write it atomically.

Order: validate every argument and the ``--out`` path (nothing is created for a refused run) → build the
model and tokenizer in memory (:mod:`llm.tiny`) → pretrain in memory (:func:`llm.tiny_pretrain.pretrain`)
→ save into a temporary directory beside ``--out`` with a build record (:data:`llm.tiny.METADATA_FILE`:
sizes, seed, task, recipe, pretraining steps run, package version) → rename it into place. An interrupted
or failed build leaves nothing at ``--out`` and no temporary directory.

``--out`` may be a new path or an empty directory; an existing model directory is replaced only with
``--overwrite`` (and only if it holds a saved model, ``config.json``, so a wrong path cannot wipe other files).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from sdpo_sim.core.io import check_output_dir

from sdpo_sim.core.cli_args import OneLineParser
from .recipe import ContextConfig, load_recipe, resolve_recipe_path
from .tasks import get_task
from .tiny import METADATA_FILE, build_char_tokenizer, build_tiny_model, check_tiny_sizes, save_pretrained_dir
from .tiny_pretrain import DEFAULT_STEPS, PretrainConfig, pretrain

PROG = "sdpo-llm make-tiny"
MAX_SEED = 2**32 - 1  # the range every seeded generator accepts (numpy's is the narrowest)


@dataclass
class TinyBuild:
    """A validated make-tiny request."""

    out: Path
    hidden_size: int
    num_layers: int
    seed: int
    pretrain_steps: int
    task: str
    recipe: Optional[str]
    context: Optional[ContextConfig]
    overwrite: bool


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Build (and briefly pretrain) the tiny CPU model; written atomically.")
    parser.add_argument("--out", default="outputs/tiny-model", help="output directory (new, or empty; see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    parser.add_argument("--hidden-size", type=int, default=64, help="64 is the size the proof verifies (a multiple of 4)")
    parser.add_argument("--num-layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help=f"weights and pretraining data seed, 0..{MAX_SEED}")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="supervised steps teaching the model to use feedback in context "
                             "(default: llm.tiny_pretrain's default; 0 = random weights)")
    parser.add_argument("--task", default=None, help="built-in task the pretraining data comes from "
                        "(default: the recipe's task, else word-constraints)")
    parser.add_argument("--recipe", default=None, help="pretrain on this recipe's task and teacher-context templates "
                        "(a shipped name like tiny-cpu or a YAML path; default: the trainer's default templates)")
    return parser


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, a non-empty directory (without ``--overwrite``, or one holding no
    saved model), or a place that cannot be written."""
    check_output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out={str(out)!r} is a non-empty directory; pass --overwrite to replace the model there, "
                             "or give a new path")
        if not (out / "config.json").is_file():
            raise ValueError(f"--out={str(out)!r} holds files but no saved model (config.json); --overwrite replaces only "
                             "a model directory, so give a new path")


def validate(args) -> TinyBuild:
    """Everything checked before anything is built or written; raises ``ValueError`` naming the bad argument."""
    check_tiny_sizes(hidden_size=args.hidden_size, num_layers=args.num_layers)
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed={args.seed} must be in [0, {MAX_SEED}]")
    steps = DEFAULT_STEPS if args.pretrain_steps is None else args.pretrain_steps
    if steps < 0:
        raise ValueError(f"--pretrain-steps={steps} must be >= 0 (0 = random weights)")
    context, task = None, args.task
    if args.recipe is not None:
        recipe = load_recipe(resolve_recipe_path(args.recipe))
        context, task = recipe.context, task or recipe.task.name
    task = task or "word-constraints"
    if get_task(task).sample_answer is None and steps > 0:
        raise ValueError(f"--task={task!r} cannot make pretraining data (it has no sample_answer); "
                         "choose another task or --pretrain-steps 0")
    out = Path(args.out)
    check_out(out, args.overwrite)
    return TinyBuild(out=out, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed,
                     pretrain_steps=steps, task=task, recipe=args.recipe, context=context, overwrite=args.overwrite)


def package_version() -> str:
    try:
        return importlib.metadata.version("sdpo-lab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_in_memory(req: TinyBuild, *, progress: bool = True):
    """The model and tokenizer, pretrained for ``req.pretrain_steps`` steps; returns ``(model, tokenizer, metadata)``."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=req.hidden_size, num_layers=req.num_layers, seed=req.seed)
    losses: list[float] = []
    if req.pretrain_steps:
        losses = pretrain(model, tokenizer, req.task, PretrainConfig(steps=req.pretrain_steps, seed=req.seed), req.context,
                          progress=progress)
    cfg = model.config
    metadata: dict[str, Any] = {
        "builder": PROG, "version": package_version(),
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads, "seed": req.seed,
        "pretrain_steps": len(losses),  # the steps actually run
        "final_pretrain_loss": losses[-1] if losses else None,
        "task": req.task, "recipe": req.recipe, "context": None if req.context is None else asdict(req.context),
    }
    return model, tokenizer, metadata


def _missing_dirs(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, innermost first."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def save_atomically(model, tokenizer, metadata: dict, out: Path) -> Path:
    """Save into a temporary directory beside ``out``, then rename it into place (replacing what was there).

    On any failure or interrupt the temporary directory, and any parent directory made for it, are removed.
    """
    made = _missing_dirs(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        save_pretrained_dir(model, tokenizer, tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if out.is_dir() and any(out.iterdir()):  # rename cannot replace a non-empty directory: move it aside first
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous model back
        for d in made:  # innermost first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out


def make_tiny(req: TinyBuild, *, progress: bool = True) -> Path:
    """Build, pretrain and save ``req``; nothing exists at ``req.out`` until the whole model is written."""
    print(f"building a tiny model (hidden {req.hidden_size}, {req.num_layers} layers); "
          f"pretraining {req.pretrain_steps} steps on {req.task}", flush=True)
    model, tokenizer, metadata = build_in_memory(req, progress=progress)
    return save_atomically(model, tokenizer, metadata, req.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sdpo-llm make-tiny --out DIR [--pretrain-steps N] [--overwrite]``: exit 0 built, 2 bad input, 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        req = validate(args)
    except ValueError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        out = make_tiny(req)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {req.out}", file=sys.stderr)
        return 130
    print(f"tiny model written to {out} ({req.pretrain_steps} pretraining steps; build record in {out / METADATA_FILE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
