"""The package's shape: dependencies point one way through the layers of the README's
"Architecture" section, there are no import cycles, no module is far past a readable size, and the
torch-only layers never import Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qtrainer"

# Lowest first: a module may import modules of its own layer or below, never above.
LAYERS = [
    ("utilities", ["atomic", "versions", "class_path"]),
    ("quantizers", ["quantizers"]),
    ("nn", ["nn", "nn_attention", "recompute"]),
    ("surgery", ["surgery", "bit_targets", "layer_trace", "forward", "checkpoint_files", "resources", "bn", "schedules",
                 "oscillation", "export"]),
    ("recipes", ["recipes", "quantized"]),
    ("callback", ["callback"]),
    ("trainer", ["trainer", "lit_module", "checkpoint_io", "loaders", "lightning_setup", "models",
                 "transformer_models",
                 "data"]),
    ("run", ["run", "report", "runfiles"]),
    ("cli", ["cli", "cli_errors", "cli_checkpoints", "__main__"]),
]
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The qtrainer modules ``name`` imports anywhere in its file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("qtrainer") and t != name:
                out.add(t)
    return out


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the package facade (qtrainer/__init__.py) may import any layer lazily
    for index, (_, tops) in enumerate(LAYERS):
        if parts[1] in tops:
            return index
    raise AssertionError(f"module {name} is in no layer of LAYERS: add it where it belongs")


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports(n, p, known) for n, p in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, targets in g.items():
        own = layer_of(name)
        for t in targets:
            other = layer_of(t)
            if own is not None and other is not None and other > own:
                wrong.append(f"{name} ({LAYERS[own][0]}) imports {t} ({LAYERS[other][0]})")
    return sorted(wrong)


def import_cycles(g: dict[str, set[str]]) -> list[str]:
    # a package's __init__ re-exporting its submodules is not a dependency of theirs
    edges = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in g.items()}
    state: dict[str, int] = {}
    found = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for t in sorted(edges.get(node, ())):
            if state.get(t) == 1:
                found.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[node] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])
    return found


def test_every_import_points_down_the_layers():
    wrong = upward_imports(graph())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    found = import_cycles(graph())
    assert not found, "\n".join(found)


def test_the_checks_find_an_upward_import_and_a_cycle():
    g = {"qtrainer.nn": {"qtrainer.quantizers.lsq"},
         "qtrainer.quantizers.lsq": {"qtrainer.callback.quantization", "qtrainer.quantizers.ops"},
         "qtrainer.quantizers.ops": {"qtrainer.quantizers.lsq"},
         "qtrainer.callback.quantization": set()}
    assert upward_imports(g) == ["qtrainer.quantizers.lsq (quantizers) imports "
                                 "qtrainer.callback.quantization (callback)"]
    assert import_cycles(g) == ["qtrainer.quantizers.lsq -> qtrainer.quantizers.ops -> "
                                "qtrainer.quantizers.lsq"]
    real = graph()
    assert "qtrainer.recipes" in real["qtrainer.callback.quantization"]  # imports are seen


def test_no_module_is_far_past_a_readable_size():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("statement", [
    "import qtrainer, qtrainer.quantizers, qtrainer.nn, qtrainer.surgery, qtrainer.recipes, "
    "qtrainer.export, qtrainer.resources",
    "import qtrainer.cli",
])
def test_torch_only_layers_do_not_import_lightning(statement):
    code = f"{statement}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    assert out == "[]", out
