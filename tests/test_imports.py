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


def _with_parents(target: str) -> list[str]:
    """``a.b.c`` and the packages Python imports first to reach it: ``a``, ``a.b``."""
    parts = target.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    """The absolute name of ``name`` imported ``level`` dots up from ``module``."""
    if not level:
        return name
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - level + 1]
    return ".".join(base + ([name] if name else []))


def _import_module_string(node: ast.AST) -> tuple[str, int] | None:
    """``(name, dots)`` of ``importlib.import_module("<literal>")`` (or ``import_module``,
    ``__import__``), else None."""
    if not (isinstance(node, ast.Call) and node.args):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = node.args[0]
    if called not in ("import_module", "__import__") or not isinstance(first, ast.Constant):
        return None
    if not isinstance(first.value, str):
        return None
    dots = len(first.value) - len(first.value.lstrip("."))
    return first.value[dots:], dots


def _module_string(node: ast.AST, known) -> str | None:
    """A string literal that is exactly a module of the package, or ``module:attribute``
    (an entry-point-style reference that importlib resolves later): a hidden import too."""
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return None
    name = node.value.split(":")[0]
    return name if name in known and name.startswith(PACKAGE.name + ".") else None


def _imported(node: ast.AST, module: str, is_package: bool, known=()) -> list[str]:
    """The modules one node makes Python import, parents included (importing ``a.b.c`` runs
    ``a/__init__`` and ``a/b/__init__`` first):

    - ``import a.b.c`` -> ``a``, ``a.b``, ``a.b.c``;
    - ``from a.b import c`` -> ``a``, ``a.b``, and ``a.b.c`` when that is a module (relative
      imports resolved first: ``from .measure import x`` inside ``compare/run``);
    - ``importlib.import_module("a.b")`` with a literal, and a literal ``"a.b"`` or
      ``"a.b:f"`` naming a module of the package (a table importlib reads later).
    """
    if isinstance(node, ast.Import):
        return [m for alias in node.names for m in _with_parents(alias.name)]
    if isinstance(node, ast.ImportFrom):
        target = _resolve(node.module or "", node.level, module, is_package)
        found = _with_parents(target)
        return found + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    literal = _import_module_string(node)
    if literal is not None:
        return _with_parents(_resolve(literal[0], literal[1], module, is_package))
    string = _module_string(node, known)
    return _with_parents(string) if string else []


def _ancestors(module: str) -> set[str]:
    """The packages above ``module``: Python runs their ``__init__`` before ``module``'s own
    code, so an edge back to one of them (``from .base import x`` inside ``adapters/cola``
    reaching ``adapters``) re-enters nothing."""
    return set(_with_parents(module)[:-1])


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, (file, is_package) in modules.items():
        skip = _ancestors(name) | {name}
        for node in ast.walk(ast.parse(file.read_text())):
            for target in _imported(node, name, is_package, modules):
                if target in modules and target not in skip:
                    graph.add_edge(name, target)
    return graph


def _edges(source: str, module: str = "loravariants.pkg.mod", is_package: bool = False):
    known = {"loravariants.pkg", "loravariants.pkg.mod", "loravariants.pkg.sub", "loravariants.x"}
    tree = ast.parse(source)
    return {t for node in ast.walk(tree) for t in _imported(node, module, is_package, known)}


def test_the_walker_sees_every_kind_of_edge():
    # parent packages: importing a.b.c runs a and a.b first
    assert {"loravariants", "loravariants.pkg"} <= _edges("import loravariants.pkg.sub")
    # `from x import y`, y a submodule or a name; relative imports resolved
    assert "loravariants.pkg.sub" in _edges("from loravariants.pkg import sub")
    assert "loravariants.pkg.sub" in _edges("from . import sub")
    assert "loravariants.pkg" in _edges("from . import name_only")
    assert "loravariants.x" in _edges("from ..x import f")
    # a late (function-level) import
    assert "loravariants.x" in _edges("def f():\n    from loravariants.x import g\n")
    # importlib strings: a literal to import_module, and a literal naming a module (a table)
    assert "loravariants.x" in _edges("import importlib\nimportlib.import_module('loravariants.x')")
    assert "loravariants.x" in _edges("import_module('..x', __package__)")
    assert "loravariants.x" in _edges("TABLE = {'cmd': ('loravariants.x', 'main')}")
    assert "loravariants.x" in _edges("ENTRY = 'loravariants.x:main'")
    assert _edges('"""A docstring naming loravariants.x in a sentence."""') == set()


def test_the_walker_sees_a_cycle_when_there_is_one():
    graph = import_graph()
    assert graph.has_edge("loravariants.compare.run", "loravariants.train")
    assert graph.has_edge("loravariants.compare.run", "loravariants.compare.measure")
    # a module importing its own package re-enters nothing; a module outside it does
    assert not graph.has_edge("loravariants.adapters.cola", "loravariants.adapters")
    assert graph.has_edge("loravariants.inject", "loravariants.adapters")
    graph.add_edge("loravariants.train", "loravariants.compare.run")
    assert list(nx.simple_cycles(graph))


def test_no_import_cycles():
    graph = import_graph()
    tangled = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert tangled == []


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


def test_compare_exports_every_listed_name():
    import loravariants.compare

    for name in loravariants.compare.__all__:
        assert hasattr(loravariants.compare, name), name


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


@pytest.mark.parametrize("module", [m for m in sorted(_modules()) if ".base_model" in m])
def test_base_model_imports_at_module_level_only(module):
    """base_model/ has no cycle to dodge: every import is at the top of its file."""
    file, _ = _modules()[module]
    late = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for fn in ast.walk(ast.parse(file.read_text()))
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert late == []
