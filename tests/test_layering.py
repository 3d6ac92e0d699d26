"""The package's layers import downwards only (docs/design.md, "Layers"), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_fast"

# Top to bottom. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("cli", ("resnet_fast.cli",)),
    ("commands", ("resnet_fast.bench", "resnet_fast.train", "resnet_fast.info")),
    ("package facade", ("resnet_fast",)),  # resnet_fast/__init__.py: what users import
    ("models", ("resnet_fast.models",)),
    ("nn", ("resnet_fast.nn",)),
    ("ops", ("resnet_fast.ops", "resnet_fast.backends")),
    ("extension", ("resnet_fast._extension", "resnet_fast._op_schemas", "resnet_fast._C")),
    ("leaves", ("resnet_fast.settings", "resnet_fast.errors", "resnet_fast.numerics", "resnet_fast._version")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix (``resnet_fast.ops.triton.conv`` -> ops)."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every resnet_fast import in ``source`` (a module of ``package``), at module
    level or inside functions; ``from pkg import name`` counts as ``pkg.name`` where that is a module."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("resnet_fast")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if not base.startswith("resnet_fast"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py").exists()
                found.append((node.lineno, candidate if is_module else base))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_imports_point_down(path: Path):
    importer = module_name(path)
    own = layer_of(importer)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    upward = [f"line {line}: {name} ({LAYERS[layer_of(name)][0]})"
              for line, name in imported_modules(path.read_text(), package) if layer_of(name) < own]
    assert not upward, f"{importer} ({LAYERS[own][0]}) imports from a layer above it: " + "; ".join(upward)


def test_the_layer_test_sees_an_upward_import():
    """A function-level import of a higher layer (the kind that hid import cycles) must be caught."""
    source = "import torch\n\ndef _late():\n    from resnet_fast.train import distributed\n" \
             "    from . import reference\n"
    names = [name for _, name in imported_modules(source, "resnet_fast.ops")]
    assert names == ["resnet_fast.train.distributed", "resnet_fast.ops.reference"], names
    assert layer_of(names[0]) < layer_of("resnet_fast.ops.reference") == layer_of(names[1])
