"""No import cycle anywhere in ``src/oncepay``: arrows point down (STYLE.md, principle 2).

The graph is read with ``ast``, so an import inside a function or under ``TYPE_CHECKING``
counts as much as one at the top: it hides a cycle from the interpreter, not from a reader.
``from package import name`` is an edge to ``package.name`` when that is a module, else to
``package``. The parents a module's import implicitly runs (``oncepay/__init__.py`` for every
``oncepay.*`` import) are not edges: a package's ``__init__`` re-exporting its children is not
a design circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def imported(source: str, importer: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The known modules that ``importer``'s ``source`` imports, anywhere in it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _base(node, importer, is_package)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    yield target
                elif base in known:
                    yield base


def import_graph() -> dict[str, set[str]]:
    paths = sorted((SRC / "oncepay").rglob("*.py"))
    known = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        name, is_package = module_name(path), path.name == "__init__.py"
        graph[name] = set(imported(path.read_text(), name, is_package, known)) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(_cycle_within(graph, set(component)))
    return found


def _cycle_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path that returns to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    raise AssertionError("a strongly connected component always has a cycle")


def test_no_import_cycle_in_oncepay() -> None:
    assert [" -> ".join(cycle) for cycle in cycles(import_graph())] == []


# Shared packages stay below their users: a package -> the packages it must not import.
BELOW = {
    "oncepay.storage": ("oncepay.payments", "oncepay.simulator"),
    "oncepay.simulator": ("oncepay.payments",),
}


def test_the_simulator_and_the_shared_storage_import_nothing_from_above() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for package, above in BELOW.items()
        if module == package or module.startswith(f"{package}.")
        for target in targets
        if target.startswith(above)
    )
    assert upward == []


def test_a_cycle_is_found_and_shown_as_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_imports_in_functions_under_type_checking_and_relative_ones_count() -> None:
    known = {"oncepay.errors", "oncepay.payments", "oncepay.payments.context", "oncepay.x.y"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from oncepay.payments import context\n"
        "def f():\n    import oncepay.errors\n"
        "from ..x import y\n"
        "from oncepay.payments import Services\n"
    )
    found = set(imported(source, "oncepay.payments.api", False, known))
    assert found == {
        "oncepay.payments.context",
        "oncepay.errors",
        "oncepay.x.y",
        "oncepay.payments",
    }
