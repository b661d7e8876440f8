"""design.md's import contract: imports point downward only, the daemon never imports torch, and
spotd.client stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SPOTD = Path(__file__).resolve().parents[1] / "spotd"

# Lower layers first; a module may import only from its own layer or a lower one.
LAYERS: list[set[str]] = [
    {"errors", "events", "protocol"},
    {"config", "logs", "metrics", "progress"},
    {"imds", "ipc", "store", "store_file", "store_s3", "systemd", "watch", "client"},
    {"monitors", "coordinator", "simulator"},
    {"app", "install", "demo"},
    {"cli", "__main__"},
]
#: Training-side modules: never imported by the daemon's layers.
TRAINING_SIDE = {"torch"}


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"spotd/{name}.py is in no layer of tests/test_layering.py; add it")


def spotd_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "spotd":
                found |= {a.name for a in node.names}
            elif node.module.startswith("spotd."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("spotd.")}
    return found


def test_imports_point_downward_only():
    """Every spotd module imports only modules of its own layer or below (design.md's layout)."""
    problems = []
    for path in sorted(SPOTD.glob("*.py")):
        name = path.stem
        if name in TRAINING_SIDE or name == "__init__":
            continue
        for dep in spotd_imports(path) - {"__version__"}:
            if dep in TRAINING_SIDE:
                problems.append(f"{name} imports the training-side module spotd.{dep}")
            elif layer_of(dep) > layer_of(name):
                problems.append(f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})")
    assert problems == []


def test_the_daemon_never_imports_torch():
    """Loading the CLI, the daemon and every adapter leaves torch unimported."""
    code = (
        "import sys, spotd.cli, spotd.app, spotd.coordinator, spotd.store, spotd.demo;"
        "spotd.cli.build_parser();"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_client_imports_only_the_standard_library_and_leaves():
    """spotd.client imports nothing from spotd but protocol and errors, so a training script pays nothing for it."""
    assert spotd_imports(SPOTD / "client.py") <= {"protocol", "errors"}
