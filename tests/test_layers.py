"""The package's layers import one way down: the model layer needs neither Axolotl nor the weights, inference or
integration code, and no module imports one that (directly or through others) imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "axolotl_minicpmv"
# what each layer may import from the package (besides itself); cli.py and __init__.py sit on top
ALLOWED = {
    "model": set(),
    "testing": {"model"},
    "weights": {"model"},
    "inference": {"model", "weights"},
    "integration": {"model", "weights", "inference"},  # prediction and eval-time generation answer through inference
    "serving": {"model", "weights", "inference"},
}


def _module_of(parts: list[str], leaf: str | None = None) -> str:
    """`a.b` or `a.b.leaf` when that is itself a module of the package."""
    if leaf and (PACKAGE.joinpath(*parts, leaf + ".py")).exists():
        return ".".join(parts + [leaf])
    return ".".join(parts)


def _package_imports() -> dict[str, set[str]]:
    """module -> package modules it imports (at module level or inside functions: a lazy import is an import)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts)
        package = parts[:-1]
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                imports |= {_module_of(base, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("axolotl_minicpmv."):
                base = node.module.split(".")[1:]
                imports |= {_module_of(base, alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                imports |= {a.name.removeprefix("axolotl_minicpmv.") for a in node.names if a.name.startswith("axolotl_minicpmv.")}
        graph[name] = {i for i in imports if i and i != name}
    return graph


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imports in _package_imports().items():
        layer = module.split(".")[0]
        if layer not in ALLOWED:
            continue  # the top: __init__, __main__, cli, minicpmv_chat
        for target in imports:
            target_layer = target.split(".")[0]
            if target_layer != layer and target_layer not in ALLOWED[layer] and target_layer != "__init__":
                wrong.append(f"{module} imports {target}")
    # the model's `chat` method hands over to the inference layer, the one sanctioned exception (lazy, one way)
    assert sorted(wrong) == ["model.modeling_minicpmv imports inference.chat"], wrong


def test_no_import_cycle_among_the_package_modules():
    graph = _package_imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt == "__init__" or nxt.endswith(".__init__"):
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else path + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_importing_the_model_layer_does_not_import_axolotl():
    code = (
        "import sys; import axolotl_minicpmv; from axolotl_minicpmv import MiniCPMV, MiniCPMVProcessor, load_model; "
        "bad = sorted(m for m in sys.modules if m == 'axolotl' or m.startswith('axolotl.')); print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import axolotl_minicpmv"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr
