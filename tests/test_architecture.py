"""The import graph of prunekit_core: no cycle between its modules, and no plugin imported by the core.

The graph is the one import-linter checks the contracts of ``.importlinter`` on (grimp): every import, at
module level or inside a function; imports under ``if TYPE_CHECKING:`` are left out, as ``.importlinter``
leaves them out (they only name types in annotations and never run). The layer contracts themselves are
checked by ``lint-imports`` in scripts/test.sh.
"""

from __future__ import annotations

import grimp
import pytest

CORE = "prunekit_core"
#: the plugins shipped beside the core; any other ``prunekit_*`` package is caught by its prefix as well
PLUGINS = ("prunekit_llama", "prunekit_mixtral", "prunekit_llava", "prunekit_gptj")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(
        CORE, include_external_packages=True, exclude_type_checking_imports=True, cache_dir=None
    )


def _internal_imports(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    core = {m for m in graph.modules if m == CORE or m.startswith(CORE + ".")}
    return {m: graph.find_modules_directly_imported_by(m) & core for m in core}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _path_around(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the first module of ``component``: ``[a, b, ..., a]`` (breadth first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")  # a component always has one


def _describe(graph: grimp.ImportGraph, path: list[str]) -> str:
    steps = [path[0]]
    for importer, imported in zip(path, path[1:], strict=False):
        lines = sorted(
            d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)
        )
        steps.append(f"-> {imported} (line {', '.join(map(str, lines))} of {importer})")
    return " ".join(steps)


def test_the_cycle_finder_names_a_cycle() -> None:
    """The finder itself: a cycle of three, a self-contained chain and an unrelated edge."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _path_around(edges, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_core_modules(graph: grimp.ImportGraph) -> None:
    edges = _internal_imports(graph)
    assert len(edges) > 30, f"the graph of {CORE} has only {len(edges)} modules: was the package found?"
    cycles = [f"{{{', '.join(c)}}}, e.g. {_describe(graph, _path_around(edges, c))}" for c in _cycles(edges)]
    assert not cycles, (
        f"{len(cycles)} import cycle(s) among {CORE} modules (imports inside functions count):\n  "
        + "\n  ".join(cycles)
        + "\nBreak each by moving what both sides need into the lower module, or by passing it in."
    )


def test_the_core_imports_no_plugin(graph: grimp.ImportGraph) -> None:
    offending = []
    for module in sorted(m for m in graph.modules if m == CORE or m.startswith(CORE + ".")):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            top = imported.split(".")[0]
            if top != CORE and (top in PLUGINS or top.startswith("prunekit_")):
                offending.append(f"{module} imports {imported}")
    assert not offending, (
        "the core must not import a plugin (plugins depend on the core, and are found through entry "
        "points): " + "; ".join(offending)
    )
