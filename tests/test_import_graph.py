"""The package's import graph has no cycles.

Every import counts, those deferred into a function body too: a deferred import that closes a cycle
only hides it until the function runs. Importing ``a.b.c`` also imports the packages ``a`` and
``a.b``, so those are edges too, except for the packages enclosing the importer, which are already
being imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import treeq

ROOT = Path(treeq.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _absolute(importer: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imports_of(name: str) -> set[str]:
    """Modules whose import runs because ``name`` is imported. A package enclosing ``name`` is
    already being imported, so reaching it as a parent is no edge; taking a name out of it
    (``from . import __version__``) is, since that name may only exist once its ``__init__`` ran."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    enclosing = _with_parents(name)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            modules, names_from = [a.name for a in node.names], []
        else:
            base = _absolute(name, is_package, node.level, node.module)
            modules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            names_from = [base] if len(modules) < len(node.names) else []
            modules = modules or [base]
        for m in modules:
            found |= {p for p in _with_parents(m) if p in MODULES and p not in enclosing}
        found |= {b for b in names_from if b in MODULES and b != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_detector_finds_a_cycle_and_a_package_parent_edge():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "treeq" in _with_parents("treeq.kernels.base")


def test_treeq_has_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
