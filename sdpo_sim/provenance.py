"""Where a result comes from: the git commit of the tree and a hash of the code that computes results.

:func:`code_hash` is what makes a committed report *fresh by construction*: the claims report records
it, and a test fails when the committed ``CLAIMS.json`` was made by other code than the current
``sdpo_sim``. It hashes what changes numbers — the syntax tree without docstrings (so comments,
docstrings and formatting do not count) of every module the claims job imports, directly or through
others (:data:`ROOTS`, followed through ``import`` statements within the package), and the packaged
sweep specs byte for byte. The command-line front end (``commands/``, ``cli.py``, ``__main__.py``) only
parses arguments and prints, and a module the job never imports (``promote.py``) cannot change its numbers.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FRONT_END = ("commands", "cli.py", "__main__.py")  # relative to the package: never changes a number
ROOTS = ("__init__.py", "claims/__init__.py", "claims/job.py")  # the claims job; every result module is imported from here


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


def _imported(module: Path, package: Path) -> set[Path]:
    """The package's modules (and sub-packages' ``__init__``) that ``module`` imports, anywhere in its body."""
    here = module.relative_to(package).parent
    found = set()
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package / here
            for _ in range(node.level - 1):
                base = base.parent
            targets = [base / (node.module or "").replace(".", "/")] if node.module else []
            targets += [t / a.name for t in (targets or [base]) for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            targets = [package.parent / n.replace(".", "/") for n in names if n.split(".")[0] == package.name]
        else:
            continue
        for t in targets:
            for parent in [t, *t.relative_to(package.parent).parents]:  # a.b.c imports a/__init__ and a/b/__init__ too
                p = package.parent / parent
                for f in (p.with_suffix(".py"), p / "__init__.py"):
                    if f.is_file() and package in f.parents:
                        found.add(f)
    return found


def result_files(package: Path = PACKAGE) -> list[Path]:
    """The files whose content decides results: the modules reachable from :data:`ROOTS` (never the front end), and
    the packaged specs."""
    todo, seen = [package / r for r in ROOTS], set()
    while todo:
        f = todo.pop()
        if f in seen or not f.is_file() or f.relative_to(package).parts[0] in FRONT_END:
            continue
        seen.add(f)
        todo += _imported(f, package)
    return sorted(seen) + sorted((package / "specs").glob("*.yaml"))


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
