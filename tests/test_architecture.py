"""The house rules, checked on the source: dependencies flow one way and no import circle exists, not even one
hidden inside a function (every ``import`` statement counts, wherever it stands)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sdpo_sim", "llm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return {m for m in found if m.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_core_imports_neither_world(graph):
    bad = {m: sorted(d for d in deps if not d.startswith("sdpo_sim.core") and d != "sdpo_sim")
           for m, deps in graph.items() if m.startswith("sdpo_sim.core")}
    assert not {m: d for m, d in bad.items() if d}


def test_the_toy_world_never_imports_llm(graph):
    assert not {m: sorted(d for d in deps if d.startswith("llm")) for m, deps in graph.items()
                if m.startswith("sdpo_sim") and any(d.startswith("llm") for d in deps)}


def test_llm_imports_only_the_core_of_sdpo_sim(graph):
    bad = {m: sorted(d for d in deps if d.startswith("sdpo_sim") and not d.startswith("sdpo_sim.core") and d != "sdpo_sim")
           for m, deps in graph.items() if m.startswith("llm")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_circle(graph):
    """Depth-first search for a back edge; reports one circle as ``a -> b -> ... -> a``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (circle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(circle))
