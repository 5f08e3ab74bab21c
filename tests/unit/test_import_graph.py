"""No import cycle among the service's modules, counting the imports that run when a module is
imported (module level, outside `if TYPE_CHECKING:`). Imports inside functions are deliberate
deferrals (torch only in the worker) and are left out, except in the service layers (api, cli,
common, worker), where not even a deferred import may close a cycle. The worker's Celery app is a
leaf: no task or pipeline module is imported by it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "cli", "common", "core", "worker")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _eager_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.finalbody)

    visit(tree.body)
    return names


def _all_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(packages: tuple[str, ...] = PACKAGES, *, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the service modules it imports (with `deferred`, also those imported inside
    functions and under TYPE_CHECKING)."""
    files = [p for package in packages for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = _all_imports(tree) if deferred else _eager_imports(tree)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_service_modules_import_without_cycles() -> None:
    graph = import_graph()
    assert "worker.tasks" in graph and "core.pipeline" in graph
    assert cycles(graph) == []


def test_service_layers_have_no_cycle_even_through_deferred_imports() -> None:
    graph = import_graph(("api", "cli", "common", "worker"), deferred=True)
    assert "worker.app" in graph["worker.tasks"]
    assert cycles(graph) == []


def test_worker_app_is_a_leaf() -> None:
    graph = import_graph()
    assert graph["worker.app"] <= {"worker.signals", "common.broker", "common.settings"}
    assert "worker.app" in graph["worker.tasks"]
