"""Write the "bring your own data" example dataset: train and eval JSONL files of open-ended prompts.

    python examples/byod/make_dataset.py                      # examples/byod/data/{train,eval}.jsonl
    python examples/byod/make_dataset.py --out my-data --chat # prompts as conversations

Every row is one JSON object::

    {"prompt": "Write a 4-letter word with 'a', without 'b', ending in 't'.\\n",
     "length": 4, "required": "a", "forbidden": "b", "ending": "t",
     "privileged_context": "hint: end with 't'"}          # on every --hint-every-th row, else null

``prompt`` is what the model reads (``--chat``: ``[{"role": "user", "content": ...}]``, a conversation). The other
columns are what your reward functions receive as keyword arguments (``examples/byod/rewards.py``): the constraints
are read from the columns, never parsed back out of the prompt. ``privileged_context`` is seen by the teacher only
(added to the feedback of every completion of that prompt), never by the student or the reward functions.

The prompts use the wording of the built-in ``word-constraints`` task (``llm/tasks.py``) because that is what
``sdpo-llm make-tiny`` pretrains the tiny character-level model on: a real dataset of yours would come from
anywhere. Each role draws its letter from its own set, as the built-in task does. There are 4 × 5 × 5 × 5 = 500
distinct constraint sets; the train and eval rows are drawn from them without replacement (seeded), so the eval
prompts are held out. The same arguments always write the same files (existing ones are replaced).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

PROMPT = "Write a {length}-letter word with '{required}', without '{forbidden}', ending in '{ending}'.\n"
LENGTHS = (3, 4, 5, 6)
REQUIRED, FORBIDDEN, ENDINGS = "aeiou", "bcdfg", "lnrst"  # the built-in task's letter sets (llm/tasks.py)
SPECS = [dict(zip(("length", "required", "forbidden", "ending"), s))
         for s in itertools.product(LENGTHS, REQUIRED, FORBIDDEN, ENDINGS)]  # 500 constraint sets
EXIT_BAD_INPUT = 2


def make_row(spec: dict, *, hint: bool, chat: bool) -> dict:
    """One dataset row of constraint set ``spec`` (keys length, required, forbidden, ending): the prompt (text, or a
    one-message conversation with ``chat``), the four constraint columns and ``privileged_context`` (a hint naming
    the ending with ``hint``, else None)."""
    text = PROMPT.format(**spec)
    return {"prompt": [{"role": "user", "content": text}] if chat else text, **spec,
            "privileged_context": f"hint: end with '{spec['ending']}'" if hint else None}


def make_rows(train_rows: int = 200, eval_rows: int = 32, *, seed: int = 0, chat: bool = False,
              hint_every: int = 3) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` rows: ``train_rows + eval_rows`` distinct constraint sets in the order
    ``random.Random(seed).shuffle`` gives, the first ``train_rows`` for training. Row ``i`` of each split has a
    ``privileged_context`` hint when ``hint_every > 0`` and ``i % hint_every == 0``. ValueError on bad counts."""
    for name, value, least in (("train_rows", train_rows, 1), ("eval_rows", eval_rows, 1), ("hint_every", hint_every, 0),
                               ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    if train_rows + eval_rows > len(SPECS):
        raise ValueError(f"train_rows + eval_rows = {train_rows + eval_rows} exceeds the {len(SPECS)} distinct constraint "
                         f"sets (the eval prompts are held out); ask for fewer rows")
    specs = list(SPECS)
    random.Random(seed).shuffle(specs)

    def rows(part: list[dict]) -> list[dict]:
        return [make_row(s, hint=hint_every > 0 and i % hint_every == 0, chat=chat) for i, s in enumerate(part)]

    return rows(specs[:train_rows]), rows(specs[train_rows:train_rows + eval_rows])


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """``rows`` as JSON lines at ``path``, written to a temporary file beside it and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def check_out_dir(out: Path) -> None:
    """Refuse (ValueError, one line) an ``--out`` that is a file or cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; give a directory (new or existing)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be created: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r} is not writable ({str(probe)!r} does not allow writing)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see the module docstring); returns the exit status (0, or 2 for bad input)."""
    parser = _OneLineParser(prog="make_dataset.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/byod/data", help="directory for train.jsonl and eval.jsonl "
                        "(default: examples/byod/data, relative to where you run it)")
    parser.add_argument("--train-rows", type=int, default=200, help="training prompts (default 200)")
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out prompts (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="which constraint sets, in which order (default 0)")
    parser.add_argument("--hint-every", type=int, default=3,
                        help="every N-th row gets a privileged_context hint (default 3; 0: none)")
    parser.add_argument("--chat", action="store_true", help="write prompts as conversations [{role: user, content}]")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        train, held_out = make_rows(args.train_rows, args.eval_rows, seed=args.seed, chat=args.chat,
                                    hint_every=args.hint_every)
        check_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    hints = sum(r["privileged_context"] is not None for r in train)
    print(f"wrote {out / 'train.jsonl'} ({len(train)} rows, {hints} with privileged_context) and "
          f"{out / 'eval.jsonl'} ({len(held_out)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
