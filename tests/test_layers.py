"""The layers point one way: plain code never imports Prefect, and no module imports itself through others."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("flows", "tasks", "models", "data")
PLAIN = ("models", "data")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _project_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_plain_code_never_imports_prefect():
    offenders = {
        _module_name(path): sorted(m for m in _imports(path) if m.split(".")[0] in {"prefect", "prefect_dask"})
        for package in PLAIN
        for path in (REPO_ROOT / package).rglob("*.py")
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_module_imports_itself_through_others():
    graph = _project_graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target) :] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


# Lower layers never import higher ones: data knows nothing of models, the network and bundle at the
# top of models/ know none of its subpackages, monitoring and evaluation serve training and scoring,
# and training and scoring never import each other.
LAYER_RANKS = {
    "data": 0,
    "models": 1,
    "models.monitoring": 2,
    "models.evaluation": 3,
    "models.training": 4,
    "models.scoring": 4,
    "tasks": 5,
    "flows": 6,
}


def _layer(module: str) -> str:
    return max((layer for layer in LAYER_RANKS if module == layer or module.startswith(layer + ".")), key=len)


def test_imports_point_down_the_layers():
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in _project_graph().items()
        for target in targets
        if _layer(target) != _layer(name) and LAYER_RANKS[_layer(target)] >= LAYER_RANKS[_layer(name)]
    )
    assert upward == []
