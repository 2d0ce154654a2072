"""The package's import graph has no cycle, counting every import a module makes (at the top or
inside a function; only ``if TYPE_CHECKING:`` blocks are left out), and each module imports alone
in a fresh interpreter (issue 11: a cycle hidden behind a function-local import is still a cycle:
it decides the order modules must load in and breaks when someone moves the import up)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "executor", "manager", "endpoint", "configs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "dlhub." + ".".join(parts)


MODULES = {
    _module_name(p): p
    for pkg in PACKAGES
    for p in sorted((ROOT / pkg).rglob("*.py"))
    if "tests" not in p.parts
}


class _Imports(ast.NodeVisitor):
    """Every dlhub module a source file imports, wherever the import is (not TYPE_CHECKING)."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package, self.found = module, is_package, set()

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        self._add(name, [a.name for a in node.names])

    def _add(self, name: str, names) -> None:
        if not name.startswith("dlhub"):
            return
        submodules = [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES]
        if submodules:  # `from . import auth`: the submodule, not the package's __init__
            self.found.update(submodules)
        elif name in MODULES:
            self.found.add(name)


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text()))
        graph[module] = visitor.found - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    found = cycles(graph)
    detail = "\n".join(
        f"{' <-> '.join(c)}:\n" + "\n".join(f"    {m} imports {sorted(graph[m] & set(c))}" for m in c)
        for c in found
    )
    assert not found, f"import cycles:\n{detail}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_alone(module):
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
