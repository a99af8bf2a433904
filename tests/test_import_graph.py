"""vqt_jax's modules import one another bottom-up: no import cycle, imports inside functions
included (a cycle hidden in a function body is still a cycle of the design), neither between
files nor between the sub-packages (`training/`, `data/`, ...) taken as whole layers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqt_jax"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of `from ... import` in `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its source.

    `from a import b` counts as importing `a.b` where that is a module of the package, else
    `a`. A package's `__init__` counts as a module of its own.
    """
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
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
    graph = import_graph()
    assert "vqt_jax.training.train" in graph and graph["vqt_jax.training.train"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_cycle_inside_a_function_is_found(tmp_path):
    package = tmp_path / "vqt_jax"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from vqt_jax.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("import os\n\ndef g():\n    from vqt_jax import a\n")
    graph = import_graph(package)
    assert graph["vqt_jax.a"] == {"vqt_jax.sub.b"}
    assert graph["vqt_jax.sub.b"] == {"vqt_jax.c"}
    assert find_cycle(graph) == ["vqt_jax.a", "vqt_jax.sub.b", "vqt_jax.c", "vqt_jax.a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`graph` with each sub-package (`vqt_jax.training`, `vqt_jax.data`, ...) as one node."""
    def node(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(node(module), set()).update(node(t) for t in targets)
    return {n: targets - {n} for n, targets in out.items()}


def test_the_sub_packages_are_layers_too():
    # A module below training/ that imported one of training/'s files would make training/
    # and that module's layer lean on each other, even with no cycle between files.
    graph = package_graph(import_graph())
    assert "vqt_jax.training" in graph["vqt_jax.sweep"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
