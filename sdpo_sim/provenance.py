"""Where a result comes from: the git commit of the tree and a hash of the code that computes results.

:func:`code_hash` is what makes a committed report *fresh by construction*: the claims report records
it, and a test fails when the committed ``CLAIMS.json`` was made by other code than the current
``sdpo_sim``. It hashes what changes numbers — every module's syntax tree without docstrings (so
comments, docstrings and formatting do not count) and the packaged sweep specs byte for byte — and
leaves out the command-line front end (``commands/``, ``cli.py``, ``__main__.py``), which only
parses arguments and prints.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FRONT_END = ("commands", "cli.py", "__main__.py")  # relative to the package: never changes a number


def git_commit() -> str:
    """The source tree's ``git rev-parse HEAD`` (+ ``-dirty`` if modified), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without docstrings and without the help texts of settings (``setting(default, "help")``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setting":
            node.args = node.args[:1] + [ast.Constant("")] * len(node.args[1:2]) + node.args[2:]
            node.keywords = [k for k in node.keywords if k.arg != "help"]
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def result_files(package: Path = PACKAGE) -> list[Path]:
    """The files whose content decides results: every module but the front end, and the packaged specs."""
    files = sorted(package.rglob("*.py")) + sorted((package / "specs").glob("*.yaml"))
    return [f for f in files if f.relative_to(package).parts[0] not in FRONT_END and "__pycache__" not in f.parts]


def code_hash(package: Path = PACKAGE) -> str:
    """sha256 (first 16 hex digits) over the result files: each one's path, then its syntax tree without
    docstrings (``ast.dump``) for Python or its bytes for a spec."""
    digest = hashlib.sha256()
    for f in result_files(package):
        digest.update(str(f.relative_to(package)).encode() + b"\0")
        if f.suffix == ".py":
            digest.update(ast.dump(_without_docstrings(ast.parse(f.read_text(), str(f)))).encode())
        else:
            digest.update(f.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
