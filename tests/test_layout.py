"""The layout holds: dependencies run one way, and nothing imports in a circle.

Read from the source with ``ast`` (every ``import`` statement, at module
level or inside functions), so a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each room of calm_rt may import (besides itself and calm_rt.errors).
ALLOWED = {
    "data": set(),
    "wire": set(),
    "extract": {"data"},
    "model": set(),
    "live": {"data", "model"},
    "serve": {"data", "wire", "extract", "model", "live"},
    "offline": {"data", "extract", "model", "live"},
    "cli": {"data", "wire", "extract", "model", "live", "serve", "offline"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_rooms_import_only_downward():
    bad = []
    for path in _sources("calm_rt"):
        parts = path.relative_to(ROOT / "calm_rt").parts
        room = parts[0] if len(parts) > 1 else None
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ("napari", "napari_plugin", "bench", "qtpy", "PyQt6"):
                bad.append(f"{path.relative_to(ROOT)} imports {name} (the runtime knows no screen)")
            if top == "kernels" and room != "model":
                bad.append(
                    f"{path.relative_to(ROOT)} imports {name} (kernels only through model.ops)"
                )
            if not name.startswith("calm_rt.") or room is None:
                continue
            target = name.split(".")[1]
            if target in ("errors", room) or target not in ALLOWED:
                continue
            if target not in ALLOWED[room]:
                bad.append(f"{path.relative_to(ROOT)} ({room}) imports {name}")
    assert not bad, "\n".join(bad)


def test_kernels_import_only_torch_and_triton():
    for path in _sources("kernels"):
        for name in _imports(path):
            assert name.split(".")[0] in ("torch", "triton", "kernels", "__future__", "collections",
                                          "typing", "math", "os", "functools"), (path, name)  # fmt: skip


def test_no_import_cycles_between_modules():
    modules = {
        _module_name(p): p
        for pkg in ("calm_rt", "kernels", "bench", "napari_plugin")
        for p in _sources(pkg)
    }
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps = set()
        for name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # A package's __init__ re-exporting its own modules is not a cycle of ideas.
            if name and name != mod and not mod.startswith(name + "."):
                deps.add(name)
        graph[mod] = deps

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_source_file_is_over_650_lines():
    long = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for pkg in ("calm_rt", "kernels", "bench", "napari_plugin", "scripts")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 650
    ]
    assert not long, long
