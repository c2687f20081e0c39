"""Write the memory-plan example of ``docs/llm.md`` from the code: the block ``<!-- plan -->`` … ``<!-- /plan -->``
holds what ``sdpo-llm plan`` prints for the command on its first line.

    python docs/render_plan.py          # rewrite the block
    python docs/render_plan.py --check  # rewrite nothing; exit 1 if the block is stale (tests/test_llm_memory.py checks it)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from llm.cli import main as cli_main
from sdpo_sim.core.io import atomic_write_text

DOC = Path(__file__).resolve().parent / "llm.md"
COMMAND = "sdpo-llm plan --recipe qwen3-8b --gpus-per-node 8 --nodes 1 --gpu-memory-gb 80"
BLOCK = re.compile(r"(<!-- plan -->\n)(.*?)(<!-- /plan -->)", re.S)


def plan_output(command: str = COMMAND) -> str:
    """What ``command`` (an ``sdpo-llm plan`` line) prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_main(shlex.split(command)[1:])
    return out.getvalue()


def render(text: str) -> str:
    """``text`` with its plan block replaced by the command and its current output."""
    body = f"```\n$ {COMMAND}\n{plan_output()}```\n"
    return BLOCK.sub(lambda m: m.group(1) + body + m.group(3), text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the block is stale; write nothing")
    args = p.parse_args(argv)
    text = DOC.read_text()
    if not BLOCK.search(text):
        print(f"{DOC}: no <!-- plan --> block", file=sys.stderr)
        return 1
    new = render(text)
    if args.check:
        if new != text:
            print(f"{DOC.name} is stale: run `python docs/render_plan.py`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        atomic_write_text(DOC, new)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
