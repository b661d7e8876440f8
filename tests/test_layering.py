"""design.md's import contract: imports point downward only, no import cycle anywhere in spotd/, the daemon
never imports torch or a framework, and spotd.client stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SPOTD = Path(__file__).resolve().parents[1] / "spotd"

# Lower layers first; a unit (a top-level module or a subpackage) may import only from its own layer or a
# lower one. Inside a subpackage any module may import its siblings, as long as no cycle forms.
LAYERS: list[set[str]] = [
    {"errors", "events", "protocol"},
    {"config", "logs", "metrics"},
    {"store", "aws", "client"},
    {"daemon", "integrations", "torch", "lightning", "transformers", "accelerate"},
    {"tools"},
    {"cli", "__main__"},
]
#: Training-side units: may import torch and frameworks; nothing on the daemon side imports them.
TRAINING_SIDE = {"integrations", "torch", "lightning", "transformers", "accelerate"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SPOTD.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``spotd.store.s3`` → ``store``; ``spotd.cli`` → ``cli``; ``spotd`` → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"spotd.{unit} is in no layer of tests/test_layering.py; add it")


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(SPOTD.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The spotd module an imported dotted name lands in (``spotd.store.Manifest`` → ``spotd.store``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def spotd_imports(module: str) -> set[str]:
    """Every spotd module ``module`` imports, at module level or inside functions alike."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the submodule pkg.mod (pkg's __init__ only runs first, as for
            # any pkg.mod); `from pkg import Name` resolves to pkg itself below.
            targets = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t == "spotd" or t.startswith("spotd."):
                hit = resolve(t)
                if hit is not None and hit != module and hit != "spotd":
                    found.add(hit)
    return found


GRAPH: dict[str, set[str]] = {m: spotd_imports(m) for m in MODULES}


def test_imports_point_downward_only():
    """Every spotd unit imports only units of its own layer or below, and the daemon side never imports the training side."""
    problems = []
    for module, deps in GRAPH.items():
        unit = unit_of(module)
        if unit == "":
            continue
        for dep in deps:
            dep_unit = unit_of(dep)
            if dep_unit in TRAINING_SIDE and unit not in TRAINING_SIDE:
                problems.append(f"{module} imports the training-side module {dep}")
            elif layer_of(dep_unit) > layer_of(unit):
                problems.append(
                    f"{module} (layer {layer_of(unit)}) imports {dep} (layer {layer_of(dep_unit)})"
                )
    assert problems == []


def test_no_import_cycles():
    """No chain of imports in spotd/ (function-level imports included) leads back to where it started."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_daemon_never_imports_torch():
    """Loading the CLI, the daemon, both stores and every tool leaves torch and the frameworks unimported."""
    code = (
        "import sys, spotd.cli, spotd.daemon.app, spotd.daemon.coordinator, spotd.store, spotd.store.file,"
        " spotd.store.s3, spotd.tools.demo, spotd.tools.simulator, spotd.tools.install;"
        "spotd.cli.build_parser();"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_client_imports_only_the_standard_library_and_leaves():
    """spotd.client's modules import nothing from spotd but each other, protocol and errors, so a training script pays nothing for it."""
    problems = {
        m: sorted(d for d in deps if unit_of(d) != "client" and d not in {"spotd.protocol", "spotd.errors"})
        for m, deps in GRAPH.items()
        if unit_of(m) == "client"
    }
    assert {m: d for m, d in problems.items() if d} == {}
    assert "spotd.client.guard" in problems, "the client package moved; update this test"


def test_importing_the_client_loads_no_daemon_dependency():
    """`import spotd.client` loads none of aiohttp, boto3, structlog, prometheus_client."""
    code = (
        "import sys, spotd.client;"
        "print(sorted(m for m in ('aiohttp', 'boto3', 'botocore', 'structlog', 'prometheus_client')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
