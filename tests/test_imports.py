"""The package's import graph: no cycles, and no function re-importing what its module has.

Every ``import`` statement counts, at module level or inside a function: an import moved into a
function to dodge a cycle is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import loravariants

PACKAGE = Path(loravariants.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known=()) -> list[str]:
    """The modules one import statement reads: ``from a import b`` reads ``a.b`` when that is
    a module (``from . import measure``), else ``a`` (a name defined in ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, (file, is_package) in modules.items():
        for node in ast.walk(ast.parse(file.read_text())):
            for target in _imported(node, name, is_package, modules):
                if target in modules and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_walker_sees_a_cycle_when_there_is_one():
    graph = import_graph()
    assert graph.has_edge("loravariants.compare.run", "loravariants.train")
    assert graph.has_edge("loravariants.compare.run", "loravariants.compare.measure")
    graph.add_edge("loravariants.train", "loravariants.compare.run")
    assert list(nx.simple_cycles(graph))


def test_no_import_cycles():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph()))
    assert cycles == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_function_reimports_a_module_level_import(module):
    file, is_package = _modules()[module]
    tree = ast.parse(file.read_text())
    top = {t for node in tree.body for t in _imported(node, module, is_package)}
    top |= {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    again = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, ast.Import) and any(a.name in top for a in node.names)
    ]
    assert again == []


def test_moved_names_still_import_from_their_old_paths():
    import loravariants.analysis
    import loravariants.base_model
    import loravariants.cli
    import loravariants.compare
    import loravariants.compare.plots
    import loravariants.io.mixlora
    import loravariants.io_mixlora
    import loravariants.plots_report

    assert loravariants.analysis.analyze_main is loravariants.cli.analyze_main
    assert loravariants.base_model.pretrain_base_main is loravariants.cli.pretrain_base_main
    assert loravariants.io_mixlora.save_mixlora is loravariants.io.mixlora.save_mixlora
    assert (
        loravariants.plots_report.make_report_plots is loravariants.compare.plots.make_report_plots
    )
    for name in loravariants.compare.__all__:
        assert hasattr(loravariants.compare, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        loravariants.analysis.nothing  # noqa: B018


def test_every_subpackage_is_shipped_by_pyproject():
    """`pip install .` (not editable) ships only the packages pyproject lists: a new
    subpackage missing there imports fine in a checkout and fails in an installed copy."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "loravariants").rglob("__init__.py")
    }
    assert found - listed == set()
