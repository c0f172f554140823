"""The package's architecture, checked: subpackages depend only downwards, and no import cycles.

The order (a package may import only from packages of lower rank, and from itself):

    errors  <  models, threshold  <  checkpoints, testing  <  data, decoding
            <  evaluation  <  training  <  cli  <  free_jax (the public facade)

Every import counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import free_jax

ROOT = Path(free_jax.__file__).parent
RANK = {
    "errors": 0,
    "models": 1,
    "threshold": 1,
    "checkpoints": 2,
    "testing": 2,
    "data": 3,
    "decoding": 3,
    "evaluation": 4,
    "training": 5,
    "cli": 6,
    "": 7,  # free_jax/__init__.py, the public API
}
# The compatibility aliases for old module paths: they point at every package by design.
EXEMPT = {"free_jax._moved"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The free_jax modules `path` imports (a `from pkg import name` of a submodule counts as
    that submodule, of anything else as the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("free_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("free_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} - EXEMPT for m, p in modules.items() if m not in EXEMPT}


def test_every_package_has_a_rank():
    packages = {_package(m) for m in _modules() if m not in EXEMPT}
    assert packages <= set(RANK), f"packages without a rank: {sorted(packages - set(RANK))}"


def test_no_upward_or_sideways_imports():
    bad = []
    for module, targets in _graph().items():
        mine = _package(module)
        for target in targets:
            theirs = _package(target)
            if theirs != mine and RANK[theirs] >= RANK[mine]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the dependency order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components; any component of two or more is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    "old, new",
    [
        ("free_jax.modeling", "free_jax.models.t5"),
        ("free_jax.checkpoint", "free_jax.checkpoints"),
        ("free_jax.spd", "free_jax.decoding.spd"),
        ("free_jax.evaluate", "free_jax.evaluation"),
        ("free_jax.demo_data", "free_jax.data.demo"),
    ],
)
def test_old_module_paths_still_import_and_name_the_new_one(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        moved = importlib.import_module(old)
    assert moved is importlib.import_module(new)
    assert moved.__spec__.name == new  # the module still knows its own name
    short = old.split(".")[1]
    vars(free_jax).pop(short, None)  # the import above set it; `from free_jax import x` form:
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(free_jax, short) is moved
