"""The package's layout holds: imports run one way between floors, no import circle, small modules.

Floors, lowest first: helpers (errors, io, validation, progress, checkpoint, version) ← core (the
method and its host tables) ← diffusion (loading, specs, methods), peft (atoms as a PEFT method) ←
workflows ← testbed / evaluation / experiments / speed ← cli. A module may import its own floor or a lower one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "atomtune"
FLOORS = {  # the first matching prefix names a module's floor
    "atomtune.cli": 5,
    "atomtune.testbed": 4,
    "atomtune.evaluation": 4,
    "atomtune.experiments": 4,
    "atomtune.speed": 4,
    "atomtune.workflows": 3,
    "atomtune.diffusion": 2,
    "atomtune.peft": 2,
    "atomtune.tiny": 2,
    "atomtune.core": 1,
    "atomtune": 0,
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    for prefix, level in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is on no floor")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """Every atomtune module ``path`` imports, at the top or inside a function (``from a import b``
    counts ``a.b`` when that is a module), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("atomtune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atomtune"):
            assert node.level == 0, f"{path}: relative import"
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs or {node.module}
    return {m for m in found if m in MODULES}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def test_imports_never_reach_up_a_floor():
    upward = [
        f"{name} (floor {floor(name)}) imports {dep} (floor {floor(dep)})"
        for name, deps in GRAPH.items()
        if name != "atomtune"  # the public API re-exports the core's classes
        for dep in sorted(deps)
        if floor(dep) > floor(name) and dep != "atomtune"
    ]
    assert not upward, "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_strongly_connected_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = {name: deps - {"atomtune"} for name, deps in GRAPH.items()}  # the API re-exports only
    assert strongly_connected(graph) == []


def test_no_import_circle_by_the_shared_tool():
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "import_circles.py"
    if not tool.is_file():
        pytest.skip("the shared import-circle tool is not beside this checkout")
    run = subprocess.run([sys.executable, str(tool), str(SRC)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_modules_stay_small():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
