"""The package's import graph, read from the source with `ast`, has no cycle anywhere in `sana/`.

Every import counts: module level, inside functions (lazy imports) and under `if TYPE_CHECKING:`. A lazy import
hides a cycle from Python but not from a reader, who still has to hold both modules in mind at once. So does a
registry that names modules as strings (imported on demand with importlib): a string literal that is the name of
a package module, held in a dict, list, tuple or set (a registry), counts as an import of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sana"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from a.b import c` counts as a.b.c when that is a module)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    held = {  # string literals inside container displays: registry entries
        id(e)
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict | ast.List | ast.Tuple | ast.Set)
        for e in (node.values if isinstance(node, ast.Dict) else node.elts)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Constant) and id(node) in held and node.value in modules:
            targets = [node.value]  # a registry entry such as "sana.training.dit_task"
        else:
            continue
        for target in targets:
            # the longest prefix that is a module of the package
            parts = target.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in modules:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Importing a submodule does not import its package's
    __init__ for this purpose, except where the package is named itself."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    graph = import_graph()
    assert "sana.pretrained" in graph["sana.pipeline"]  # a module-level import
    assert "sana.models.dit" in graph["sana.training.dit_task"]
    assert "sana.training.dit_task" in graph["sana.training.tasks"]  # named in the registry


if __name__ == "__main__":
    graph = import_graph()
    while cycle := find_cycle(graph):
        print(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])  # drop one edge and look for more
