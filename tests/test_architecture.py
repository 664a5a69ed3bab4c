"""The import graph of prunekit_core: no cycle between its modules, no plugin imported by the core, and no
module that uses another module's private (``_name``) names.

The graph is the one import-linter checks the contracts of ``.importlinter`` on (grimp): every import, at
module level or inside a function; imports under ``if TYPE_CHECKING:`` are left out, as ``.importlinter``
leaves them out (they only name types in annotations and never run). The layer contracts themselves are
checked by ``lint-imports`` in scripts/test.sh.
"""

from __future__ import annotations

import ast
from pathlib import Path

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


def _private_uses(root: Path) -> list[str]:
    """Every use, in one module of the core, of another core module's ``_private`` name: imported by name
    (``from .scoring import _progress``) or read off an imported module (``loading._convert_gguf``)."""
    files = {p: _module_name(root, p) for p in sorted((root / CORE).rglob("*.py"))}
    modules = set(files.values())
    found = []
    for path, name in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        bound: dict[str, str] = {}  # local name -> core module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(package, node)
                if base is None:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        bound[alias.asname or alias.name] = full
                    elif _private(alias.name) and base != name:
                        found.append(f"{name} imports {base}.{alias.name} (line {node.lineno})")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _private(node.attr)
                and bound[node.value.id] != name
            ):
                found.append(f"{name} reads {bound[node.value.id]}.{node.attr} (line {node.lineno})")
    return found


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(package: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``ImportFrom`` reads from, when it is in the core (else ``None``)."""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        full = f"{base}.{node.module}" if node.module else base
    else:
        full = node.module or ""
    return full if full == CORE or full.startswith(CORE + ".") else None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_private_name_finder_finds_both_forms(tmp_path: Path) -> None:
    pkg = tmp_path / CORE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper(): ...\n_x = 1\n")
    (pkg / "sub" / "b.py").write_text(
        "from ..a import _helper\nfrom .. import a\n\ndef f():\n    return a._x, _helper\n"
    )
    (pkg / "c.py").write_text("from .a import _helper as _h  # noqa\n")
    (pkg / "d.py").write_text("def _own(): ...\n\ndef g():\n    return _own, __name__\n")
    assert _private_uses(tmp_path) == [
        f"{CORE}.c imports {CORE}.a._helper (line 1)",
        f"{CORE}.sub.b imports {CORE}.a._helper (line 1)",
        f"{CORE}.sub.b reads {CORE}.a._x (line 5)",
    ]


def test_no_core_module_uses_another_modules_private_names() -> None:
    """A ``_name`` is private to its module: another module that needs it gets a public name instead."""
    root = Path(__file__).resolve().parents[1]
    uses = _private_uses(root)
    assert not uses, (
        f"{len(uses)} use(s) of another module's private name in {CORE} (make the name public, with a "
        "docstring, or move the code):\n  " + "\n  ".join(uses)
    )
