"""The import graph keeps its layers: entry points -> runner -> registry -> areas -> core, no cycles.

Read with `ast` from the source files, so nothing is imported to check it; in-function imports
count like module-level ones (and only third-party ones may sit inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"

# Layer of each top-level module or area package of tokenline, higher numbers on top. Areas are
# ranked among themselves too: eval uses generators, generators use tokenizers, and so on down.
LAYERS = {
    "cli": 9, "__main__": 9,
    "runner": 8, "dvc_yaml": 8, "dvc_lock": 8, "dagster_events": 8,
    "pipeline": 7,
    "export": 6, "distill": 5, "eval": 4, "generator": 3, "tokenizer": 2, "data": 1, "text": 1,
    "stage": 0, "layout": 0, "config": 0, "params_loading": 0, "artifacts": 0, "training": 0, "training_loop": 0, "train_config": 0, "tracking": 0,
    "locks": 0, "threads": 0, "prompts": 0, "precision": 0, "model_checkpoint": 0, "contact_sheet": 0, "": 0,
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "tokenline").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported tokenline module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] != "tokenline":
                continue
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            found.append((name, node.lineno, id(node) in inside))
    return found


def test_every_module_has_a_layer():
    assert {_layer_key(name) for name in _modules()} <= set(LAYERS)


def test_no_module_imports_a_higher_layer_or_a_tokenline_module_inside_a_function():
    modules = _modules()
    upward, in_functions = [], []
    for name, path in modules.items():
        for imported, line, in_function in _imports(path, modules):
            if imported == name:
                continue
            if LAYERS[_layer_key(imported)] > LAYERS[_layer_key(name)]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
            if in_function:
                in_functions.append(f"{path.relative_to(REPO)}:{line} imports {imported} inside a function")
    assert upward == []
    assert in_functions == []


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: {imported for imported, _, _ in _imports(path, modules) if imported != name}
             for name, path in modules.items()}
    # A package's __init__ is imported with each of its modules; it only re-exports, so leave it out.
    graph = {name: {t for t in targets if modules[t].name != "__init__.py"} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
