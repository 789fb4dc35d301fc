"""The packages depend one way: zeroforge.launcher -> zeroforge.trainer -> zeroforge.data.

Checked twice: every import statement in the source (those inside functions too), and every
module imported for real in a fresh interpreter where the higher packages cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = ["data", "trainer", "launcher"]  # each may import only those before it


def _imported(path: Path) -> set[str]:
    """Every module an import statement names, relative ones resolved (as zeroforge.<package>...)."""
    package = ["zeroforge", *path.relative_to(REPO).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)]
            names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_higher_layer(layer: str) -> None:
    higher = {f"zeroforge.{name}" for name in LAYERS[LAYERS.index(layer) + 1 :]}
    bare = set(LAYERS)  # the old top-level names, which would collide with a user's modules
    offences = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / layer).rglob("*.py"))
        for name in _imported(path)
        if name.split(".")[0] in bare or ".".join(name.split(".")[:2]) in higher
    ]
    assert not offences


BLOCKED_IMPORT = """
import importlib, pkgutil, sys
layer, blocked = sys.argv[1], sys.argv[2:]

class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"{name} is above zeroforge.{layer}")

sys.meta_path.insert(0, Block())
package = importlib.import_module(f"zeroforge.{layer}")
for module in pkgutil.iter_modules(package.__path__):
    if module.name != "__main__":
        importlib.import_module(f"zeroforge.{layer}.{module.name}")
print("imported", layer)
"""


@pytest.mark.parametrize("layer", ["data", "trainer"])
def test_every_module_imports_without_the_layers_above(layer: str) -> None:
    blocked = [f"zeroforge.{name}" for name in LAYERS[LAYERS.index(layer) + 1 :]]
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, layer, *blocked], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"imported {layer}" in result.stdout, result.stderr[-3000:]
