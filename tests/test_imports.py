"""Imports inside the package flow one way (STYLE.md): no module imports, even lazily inside a
function, a module that imports it back."""

import ast
from pathlib import Path

import critical_tokens

PACKAGE = Path(critical_tokens.__file__).parent


def package_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name inside it: "kl", "report.statistics", and a
    subpackage ("report") for its __init__.py."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            modules[".".join(parts)] = path
    return modules


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (top level or in a function)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module
            if node.level:  # from .x import y, from ..x import y, from . import x
                base = package[:len(package) - (node.level - 1)]
            elif (module or "").startswith("critical_tokens."):
                base, module = [], module.removeprefix("critical_tokens.")
            else:
                continue
            targets = [base + module.split(".")] if module else [base + [alias.name] for alias in node.names]
            for target in targets:  # the module itself, or the package a name comes from
                while target and ".".join(target) not in modules:
                    target = target[:-1]
                if target:
                    edges.add(".".join(target))
        graph[name] = edges - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_subpackages():
    graph = package_imports()
    assert {"runs", "report.statistics"} <= graph["report.pretraining_sections"]  # from ..runs, from .statistics
    assert "report" in graph["cli"]  # from .report import ReportConfig


def test_no_import_cycle_in_the_package():
    found = cycle(package_imports())
    assert found is None, "import cycle: " + " -> ".join(found)
