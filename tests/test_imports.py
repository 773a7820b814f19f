"""The import graph of the whole project, drawn from the code: no cycle, and the one-way house.

Every `import` and `from ... import` is read with `ast`, those inside functions included (a lazy
import still closes a cycle the first time it runs). The rules, from docs/architecture.md:
  - no import cycle among pairloop/, pairloop_local/, services/, orchestrator/;
  - pairloop/ (the shared contracts) imports none of the others;
  - a service imports neither the orchestrator, nor another service, nor pairloop_local/ (service
    images do not ship it).
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pairloop", "pairloop_local", "services", "orchestrator")


def module_names(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `packages` (a package is its __init__)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    # `from a import b` imports a, and a.b too when b is a module.
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (anywhere in its body)."""
    modules = module_names(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                is_package = path.name == "__init__.py"
                deps.update(d for d in _imported(node, name, is_package) if d in modules)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (first module repeated at the end), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO_ROOT, PACKAGES)


def test_the_graph_sees_the_project(graph: dict[str, set[str]]) -> None:
    # Guards the test itself: a parser that found nothing would pass every rule below.
    assert "orchestrator.stages.pairs" in graph
    assert "orchestrator.pairs" in graph["orchestrator.stages.pairs"]
    assert "pairloop.contracts.ranker" in graph["services.ranker.rankers.base"]
    # A function-level import counts: the CLI imports the loop inside its commands.
    assert "orchestrator.loop" in graph["orchestrator.cli"]


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_shared_package_imports_nothing_else_of_the_project(
    graph: dict[str, set[str]],
) -> None:
    bad = {
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.split(".")[0] == "pairloop"
        for d in deps
        if d.split(".")[0] != "pairloop"
    }
    assert not bad, sorted(bad)


def test_services_import_only_themselves_and_the_shared_package(
    graph: dict[str, set[str]],
) -> None:
    bad = set()
    for module, deps in graph.items():
        parts = module.split(".")
        if parts[0] != "services" or len(parts) < 2:
            continue
        for dep in deps:
            top = dep.split(".")
            allowed = top[0] == "pairloop" or top[:2] == parts[:2]
            if not allowed:
                bad.add(f"{module} -> {dep}")
    assert not bad, sorted(bad)


def test_the_detector_finds_a_cycle_closed_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.b"] == {"pkg", "pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    (pkg / "b.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None
