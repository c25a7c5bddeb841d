"""No import cycles inside llmshim, not even through imports inside functions.

The graph is read from the source (``ast``): every ``import`` and ``from ... import`` at module level
and inside functions, except those under ``if TYPE_CHECKING:`` (never run). An edge goes to the
module named (``from . import redact`` -> ``llmshim.redact``; ``from .. import __version__`` ->
``llmshim``); the package ``__init__`` that Python runs on the way to a submodule is not an edge,
or every module would be in a cycle with the root. A cycle through function-level imports works
today only because of the order modules happen to be loaded in, and it is a tangle either way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmshim"


def module_name(path: Path) -> str:
    parts = ["llmshim", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def shortest_cycle(graph: dict[str, set[str]], start: str) -> tuple[str, ...] | None:
    """The shortest way from ``start`` back to itself, as (start, ..., start), or None."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return (start, *reversed(path[:-1]), start)
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    return None


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Every distinct shortest cycle through a module that is on one, rotated to start at its least name."""
    found = set()
    for start in graph:
        ring = shortest_cycle(graph, start)
        if ring is not None:
            body = ring[:-1]
            i = body.index(min(body))
            found.add((*body[i:], *body[:i], min(body)))
    return sorted(found)


def show(cycle: tuple[str, ...]) -> str:
    return " -> ".join(cycle)


def test_no_module_is_on_an_import_cycle() -> None:
    graph = import_graph()
    assert [show(c) for c in cycles(graph)] == []


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    """The reader itself: edges that exist only inside functions, or go up a package, are found."""
    graph = import_graph()
    assert "llmshim.demo" in graph["llmshim.cli"]  # `from .demo import run` inside main()
    assert "llmshim.redact" in graph["llmshim.config"]  # `from . import redact`: the submodule
    assert "llmshim.values" in graph["llmshim.settings"]
    assert "llmshim" in graph["llmshim.demo"]  # `from . import install`: the package root
    assert "llmshim.store.redis_url" in graph["llmshim.values"]  # inside redis_url()


def test_cycles_are_found_and_reported_shortest_first() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"d2"}, "d2": set()}
    assert cycles(graph) == [("a", "b", "a"), ("a", "b", "c", "a")]
    assert cycles({"x": {"y"}, "y": set()}) == []


if __name__ == "__main__":
    for c in cycles(import_graph()):
        print(show(c))
