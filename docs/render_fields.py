"""Write the docs' settings tables from the dataclasses' field metadata (the help the command lines show).

Each block ``<!-- fields:NAME -->`` … ``<!-- /fields -->`` in ``docs/toy_world.md`` and ``docs/llm.md`` holds the
table ``sdpo_sim.core.config_fields.field_table(NAME)`` (field | type | default | help).

    python docs/render_fields.py          # rewrite the blocks
    python docs/render_fields.py --check  # rewrite nothing; exit 1 if a block is stale (tests/test_cli_help.py checks it)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from llm.recipe import (
    ContextConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    TaskConfig,
    TrainingConfig,
)
from sdpo_sim.core.config_fields import field_table
from sdpo_sim.core.io import atomic_write_text
from sdpo_sim.core.method import MethodConfig
from sdpo_sim.train import RunConfig

DOCS = Path(__file__).resolve().parent
FILES = (DOCS / "toy_world.md", DOCS / "llm.md")
CLASSES = {cls.__name__: cls for cls in (RunConfig, MethodConfig, ModelConfig, LoraConfig, TaskConfig, ContextConfig,
                                         TrainingConfig, GenerationConfig)}
BLOCK = re.compile(r"(<!-- fields:(\w+) -->\n)(.*?)(<!-- /fields -->)", re.S)


def render(text: str, source: str = "text") -> str:
    """``text`` with every fields block replaced by its class's current table."""
    def table(match: re.Match) -> str:
        name = match.group(2)
        if name not in CLASSES:
            raise ValueError(f"{source}: <!-- fields:{name} --> names no settings class; known: {', '.join(CLASSES)}")
        return match.group(1) + field_table(CLASSES[name]) + match.group(4)

    return BLOCK.sub(table, text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the settings tables of the docs from the field metadata.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text()
        new = render(text, str(path))
        if new != text:
            stale.append(path)
            if not args.check:
                atomic_write_text(path, new)
    verb = "stale" if args.check else "rewritten"
    for path in stale:
        print(f"{verb}: {path.relative_to(DOCS.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
