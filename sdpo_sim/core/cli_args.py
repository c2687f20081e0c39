"""The command lines' bad-input rule, once for both (``sdpo-sim`` and ``sdpo-llm``): one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import re

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130  # 130 = 128 + SIGINT, what shells report for Ctrl-C


def one_line(text: object) -> str:
    """``text`` with its line breaks folded into spaces (a YAML error, say, spans several lines)."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


class OneLineParser(argparse.ArgumentParser):
    """argparse under the bad-input rule: a usage error is one line on stderr pointing at ``--help`` (no usage
    block), exit 2. Subcommand parsers are of the same class (``add_subparsers`` uses the parent's)."""

    def error(self, message: str) -> None:  # argparse's hook
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
