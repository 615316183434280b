"""The packages' import graph: no module imports (even lazily, inside a function) one that imports it back,
and a stage imports only the stages before it (cache <- train <- analysis <- export)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("mlsae_cache", "mlsae_train", "mlsae_analysis", "mlsae_export")  # in pipeline order


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Every module of the three packages -> the modules of the three packages it imports anywhere in its body."""
    files = {_module_name(path): path for stage in STAGES for path in sorted((ROOT / stage).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                # ``from . import writer`` imports the module writer, not the package's __init__
                targets.update(f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module for alias in node.names)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # module -> "open" while its imports are being walked, then "done"
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := walk(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mlsae_cache.lens_train" in graph["mlsae_cache.lens_cli"]  # imported inside a function, relatively
    assert "mlsae_cache.distributed" in graph["mlsae_train.distributed"]  # absolute


def test_no_module_imports_one_that_imports_it_back():
    assert find_cycle(import_graph()) is None


def test_a_stage_imports_only_the_stages_before_it():
    later_stage_imports = [(module, target) for module, targets in import_graph().items() for target in targets
                           if STAGES.index(target.split(".")[0]) > STAGES.index(module.split(".")[0])]  # fmt: skip
    assert later_stage_imports == []
