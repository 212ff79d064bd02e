"""No package module outside a variant's own file names a variant (docs/architecture.md).

An AST scan of every module of the package, ``compare/`` included: the class names each
built-in variant file defines (its config and layer classes) as names, attributes or imports,
and the variants' spec names (``"lora"``, ...) as string constants (docstrings and bare-string
comments aside). What a variant does differently reaches the rest of the package through the
contract (adapters/base.py), never through a test of its class or its name.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import loravariants
from loravariants.adapters import VARIANTS, AdapterConfig, AdapterLayer

PACKAGE = Path(loravariants.__file__).parent

#: modules allowed to name a variant, the words they may use, and why (nothing else may)
ALLOWED: dict[str, tuple[set[str], str]] = {
    "adapters/__init__.py": ({"*"}, "imports every built-in variant: the registration"),
    "adapters/cola.py": (
        {"lora", "LoRAConfig", "init_lora_", "lora_scaling"},
        "COLA is a chain of LoRA links (its config extends LoRA's)",
    ),
    "adapters/mixlora.py": (
        {"lora", "LoRAConfig", "LoRALinear"},
        "MixLoRA's attention projections carry plain LoRA",
    ),
    "adapters/multilora.py": ({"lora"}, 'init: "lora" is an option value (LoRA\'s init)'),
    "io/mixlora.py": (
        {"mixlora"},
        'the format\'s own name ("mixlora": save_adapter(format="mixlora"), and MoE-PEFT\'s '
        "routing_strategy value), which the spec name shares; no class of the variant",
    ),
}


def _builtin_variants() -> dict[str, tuple[str, set[str]]]:
    """spec name -> (its file, relative to the package; the classes that file defines)."""
    out = {}
    for name, cls in VARIANTS.items():
        if not cls.__module__.startswith("loravariants.adapters."):
            continue  # a variant of a test (tests/toy_variant.py), registered meanwhile
        module = inspect.getmodule(cls)
        classes = {
            n
            for n, c in vars(module).items()
            if inspect.isclass(c)
            and c.__module__ == module.__name__
            and issubclass(c, (AdapterConfig, AdapterLayer))
        }
        out[name] = (Path(module.__file__).relative_to(PACKAGE).as_posix(), classes)
    return out


def _bare_strings(tree: ast.AST) -> set[int]:
    """ids of string constants that are whole statements (docstrings, string comments)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def names_in(source: str) -> list[tuple[int, str, bool]]:
    """``(line, word, is_string)`` for every identifier, attribute, imported name and string
    constant of ``source`` (bare strings left out)."""
    tree = ast.parse(source)
    bare = _bare_strings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id, False))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr, False))
        elif isinstance(node, ast.alias):
            out.append((node.lineno, node.name.rsplit(".", 1)[-1], False))
        elif isinstance(node, ast.ClassDef):
            out.append((node.lineno, node.name, False))
        if isinstance(node, ast.ImportFrom) and node.module:  # the module, as a path
            out.append((node.lineno, "." * node.level + node.module, False))
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare
        ):
            out.append((node.lineno, node.value, True))
    return out


def violations(relative: str, source: str) -> list[str]:
    allowed = ALLOWED.get(relative, (set(), ""))[0]
    words = names_in(source)
    found = []
    for spec, (own, classes) in _builtin_variants().items():
        if relative == own or "*" in allowed:
            continue
        stem = Path(own).stem
        modules = {f"adapters.{stem}", f"loravariants.adapters.{stem}"}
        if relative.startswith("adapters/"):
            modules.add(stem)
        for line, word, is_string in words:
            word = word if is_string else word.lstrip(".")
            if word in allowed:
                continue
            # a class by its name or its module; a spec name as a string (a local variable
            # named `lora` is no test of a variant)
            if word == spec if is_string else word in classes or word in modules:
                found.append(f"{relative}:{line}: {word!r} ({spec})")
    return found


def test_the_scan_sees_a_class_and_a_spec_name():
    assert sorted(violations("x.py", "from .adapters.lora import LoRAConfig\n")) == [
        "x.py:1: 'LoRAConfig' (lora)",
        "x.py:1: 'adapters.lora' (lora)",
    ]
    assert violations("x.py", "from .adapters.lora import lora_scaling\n") == [
        "x.py:1: 'adapters.lora' (lora)"
    ]
    hits = violations("x.py", 'if r.adapter == "mixlora":\n    y = m.MixLoRAFFN\n')
    assert hits == ["x.py:1: 'mixlora' (mixlora)", "x.py:2: 'MixLoRAFFN' (mixlora)"]
    # prose is not a name: docstrings, bare strings, words inside longer strings
    assert violations("x.py", '"""LoRAConfig"""\nx = "train LoRA with lora"\n') == []


def test_every_builtin_variant_is_scanned():
    variants = _builtin_variants()
    assert set(variants) >= {"lora", "cola", "multilora", "mixlora"}
    assert {"LoRAConfig", "LoRALinear"} <= variants["lora"][1]
    assert {"MixLoRAConfig", "MixLoRAFFN"} <= variants["mixlora"][1]


@pytest.mark.parametrize(
    "relative", sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
)
def test_no_module_outside_a_variant_file_names_a_variant(relative):
    assert violations(relative, (PACKAGE / relative).read_text()) == []
