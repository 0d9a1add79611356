"""The layout is the architecture: imports only point down core -> results -> edge -> pipeline -> cli, the core
never touches Ray, results import Ray only inside functions, and there is no import circle (imports inside
functions included, since they are cycles all the same)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raycpt"
LAYERS = {"core": 0, "results": 1, "edge": 2, "pipeline": 3, "cli": 4}


def _modules() -> dict[str, Path]:
    return {".".join(("raycpt", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in nested, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in nested, node.lineno))
            found += [(f"{node.module}.{alias.name}", id(node) in nested, node.lineno) for alias in node.names]
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "raycpt" else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _, _ in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _upward_imports(floor) -> list[str]:
    """Every import from a module to one on a higher floor (`floor(module)`: a number, or None when it has none)."""
    wrong = []
    for name, path in _modules().items():
        mine = floor(name)
        for target, _, line in _imports(path):
            theirs = floor(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} {name} imports {target}")
    return wrong


def test_imports_point_down_the_layers_only():
    wrong = _upward_imports(_layer)
    assert not wrong, "\n".join(wrong)


CORE_FLOORS = {"model": 1, "data": 2, "eval": 3, "prepare": 4, "augment": 4, "train": 5, "forecast": 6, "extend": 7}
"""The core's rooms from the ground up; a core module not named here (config, metrics, errors, files, schedule,
resources, packaged) is on the ground floor (0). Data does not import training or evaluation, evaluation does not
import training, the loop does not import the forecasts."""


def _core_floor(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 3 or parts[:2] != ["raycpt", "core"]:
        return None
    return CORE_FLOORS.get(parts[2], 0)


def test_core_rooms_import_down_only():
    wrong = _upward_imports(_core_floor)
    assert not wrong, "\n".join(wrong)


def test_core_never_imports_ray_and_results_only_inside_functions():
    wrong = []
    for name, path in _modules().items():
        layer = _layer(name)
        for target, in_function, line in _imports(path):
            uses_ray = target == "ray" or target.startswith("ray.")
            if uses_ray and (layer == LAYERS["core"] or (layer == LAYERS["results"] and not in_function)):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_package_imports_inside_functions_say_why():
    """Own imports belong at the top of a file; one deferred on purpose carries a comment saying why."""
    silent = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for target, in_function, line in _imports(path):
            if in_function and target.startswith("raycpt") and "#" not in lines[line - 1]:
                silent.append(f"{path.relative_to(PACKAGE)}:{line} {target}")
    assert not silent, "\n".join(silent)


def test_the_checker_sees_a_circle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The checks above can fail: a core module importing the edge inside a function is caught by both."""
    fake = tmp_path / "raycpt"
    for sub in ("core", "edge"):
        (fake / sub).mkdir(parents=True)
    (fake / "core" / "a.py").write_text("def f():\n    from raycpt.edge.b import g\n")
    (fake / "core" / "data").mkdir()
    (fake / "core" / "data" / "c.py").write_text("from raycpt.core.train.loop import train\n")
    (fake / "edge" / "b.py").write_text("from raycpt.core.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["raycpt.core.a"] == {"raycpt.edge.b"} and graph["raycpt.edge.b"] == {"raycpt.core.a"}
    for check, expected in ((test_imports_point_down_the_layers_only, "raycpt.core.a imports raycpt.edge.b"),
                            (test_no_import_circles, "raycpt.core.a -> raycpt.edge.b -> raycpt.core.a"),
                            (test_package_imports_inside_functions_say_why, "core/a.py:2 raycpt.edge.b"),
                            (test_core_rooms_import_down_only, "raycpt.core.data.c imports raycpt.core.train.loop")):
        try:
            check()
        except AssertionError as err:
            assert expected in str(err), str(err)
        else:
            raise AssertionError(f"{check.__name__} missed it")
