"""Dependencies point one way: base <- runtime <- method <- data <- workflows <- report <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("base", "runtime", "method", "data", "workflows", "report", "cli")
# Beside the stack: the demo and the export stage use the library; the library never uses them.
SIDE = ("demo", "export")
FOLDERS = {"cli": ROOT / "cli", "export": ROOT / "export"}


def _layer_of(module: str) -> str | None:
    """The layer of a pbv_onnx module name (None for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pbv_onnx" else None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for layer in LAYERS + SIDE:
        folder = FOLDERS.get(layer, ROOT / "pbv_onnx" / layer)
        out += [(layer, path) for path in sorted(folder.rglob("*.py"))]
    return out


def _imports(path: Path, layer: str) -> set[str]:
    """Absolute pbv_onnx module names a file imports (relative imports resolved within its layer)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add(f"pbv_onnx.{layer}")
            elif node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("pbv_onnx.") and _layer_of(n) in LAYERS + SIDE}


@pytest.mark.parametrize("layer,path", _modules(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_a_module_imports_only_its_own_layer_and_those_below(layer, path):
    for name in _imports(path, layer):
        other = _layer_of(name)
        if layer in SIDE:
            assert other != "cli" and (other == layer or other not in SIDE), f"{path}: {name}"
        elif layer != "cli":  # the CLI, at the top, drives the demo and the export stage too
            assert other not in SIDE, f"{path} imports {name}: the library never uses the demo or export"
            assert LAYERS.index(other) <= LAYERS.index(layer), f"{path} imports {name}, a layer above {layer}"


def test_every_module_belongs_to_a_layer():
    """Only the public namespace sits at the top; every other module is in a layer's folder."""
    top = {p.name for p in (ROOT / "pbv_onnx").glob("*.py")}
    assert top <= {"__init__.py", "api.py"}, sorted(top)
    subpackages = {p.parent.name for p in (ROOT / "pbv_onnx").glob("*/__init__.py")}
    assert subpackages <= set(LAYERS + SIDE), subpackages
