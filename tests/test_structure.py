"""The package's shape: bnas modules import one another without cycles, and the registry is
a leaf that the op families register into.

The import graph is read from the source with ``ast`` (every ``import`` and ``from ... import``
in a module, including lazy ones inside functions, but not those under ``TYPE_CHECKING``),
so a cycle hidden behind a function-level import is caught too. Importing ``bnas.x.y`` runs
``bnas/__init__`` first; that implicit edge is left out, or every module would be in a cycle
through the package that re-exports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bnas"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:  # only the else branch runs
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The bnas module that importing ``name`` runs (its nearest existing ancestor)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # ``from . import ops`` imports the submodule ``ops``; ``from .x import f`` imports x.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                if target.split(".")[0] != "bnas":
                    continue
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    graph.add_edge(name, resolved, line=node.lineno)
    return graph


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    # A few edges known to exist, so an empty graph cannot pass the cycle test.
    assert graph.has_edge("bnas.ops.common", "bnas.binarize")
    assert graph.has_edge("bnas.catalog", "bnas.ops")
    assert graph.has_edge("bnas.builder", "bnas.registry")
    assert graph.has_edge("bnas.ops", "bnas.ops.basic")


def test_the_registry_is_a_leaf() -> None:
    graph = import_graph()
    below = nx.descendants(graph, "bnas.registry")
    assert not {m for m in below if m == "bnas.ops" or m.startswith("bnas.ops.")}, below
    assert not below & {"bnas.builder", "bnas.genotype", "bnas.catalog", "bnas"}, below


def test_a_genotype_is_plain_data() -> None:
    # Parsing a genotype never reaches the op registry (nor the ops, nor torch models).
    below = nx.descendants(import_graph(), "bnas.genotype")
    assert not below & {"bnas.registry", "bnas.builder", "bnas.catalog", "bnas.ops"}, below


def test_registry_ops_genotype_builder_have_no_cycle() -> None:
    graph = import_graph()
    core = {
        n
        for n in graph
        if n.split(".")[1:2]
        in (
            ["registry"],
            ["ops"],
            ["genotype"],
            ["builder"],
            ["binarize"],
            ["catalog"],
            ["errors"],
            ["yaml_io"],
            ["atomic"],
            ["resources"],
        )
    }
    sub = graph.subgraph(core | {d for n in core for d in nx.descendants(graph, n)})
    assert nx.is_directed_acyclic_graph(sub), list(nx.simple_cycles(sub))


def test_no_import_cycle_anywhere_in_bnas() -> None:
    graph = import_graph()
    cycles = sorted(nx.simple_cycles(graph), key=len)
    shown = "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])
    assert not cycles, f"{len(cycles)} import cycle(s), e.g. {shown}"


@pytest.mark.parametrize("module", ["bnas.registry", "bnas.genotype", "bnas.builder", "bnas.search.space", "bnas.ops"])
def test_each_module_imports_on_its_own(module: str) -> None:
    # A fresh interpreter per module: an order-dependent import (a cycle that happens to
    # work from ``import bnas``) fails here.
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_name_is_registered_when_asked() -> None:
    # The catalog loads on the first query, whichever module asks first.
    code = (
        "from bnas.registry import get_spec, list_primitives; "
        "assert get_spec('xnor_resnet_block').family == 'resnet_block'; "
        "assert get_spec('conv_unit').source == 'python'; print(len(list_primitives()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) >= 28
