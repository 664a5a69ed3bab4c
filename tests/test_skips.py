"""The suite skips only for an absent optional asset, and each skip names it.

Every ``pytest.skip``, ``pytest.importorskip`` and ``pytest.mark.skipif`` in the repository's tests gives a
literal reason that says what is absent and how to get it ("... absent: install ..."); a check that cannot
run for any other reason fails instead (the conformance kit's capabilities: ``prunekit_core/testing/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = sorted(
    [
        p
        for folder in ("tests", "plugins", "examples")
        for p in (ROOT / folder).rglob("test_*.py")
        if ".venv" not in p.parts
    ]
    + [
        ROOT / "prunekit_core" / "testing" / "__init__.py"
    ]  # the plugin authors' kit: its checks must fail, not skip
)
SKIPS = ("skip", "skipif", "importorskip")


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "literal"`` assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    out[target.id] = node.value.value
    return out


def _skip_reasons(path: Path) -> list[tuple[int, str | None]]:
    """(line, reason) of every skip call in ``path``; the reason is None when it is not a literal."""
    tree = ast.parse(path.read_text())
    names = _constants(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr not in SKIPS:
            continue
        args = [kw.value for kw in node.keywords if kw.arg in ("reason", "msg")]
        if node.func.attr == "skip" and node.args:
            args.append(node.args[0])
        reason = None
        for arg in args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                reason = arg.value
            elif isinstance(arg, ast.Name) and arg.id in names:
                reason = names[arg.id]
        found.append((node.lineno, reason))
    return found


def test_the_scan_sees_the_suite() -> None:
    assert len(TEST_FILES) > 30
    assert any(_skip_reasons(p) for p in TEST_FILES), "no skip found at all: the scan is broken"


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_skip_names_an_absent_asset(path: Path) -> None:
    bad = [(line, reason) for line, reason in _skip_reasons(path) if not reason or " absent" not in reason]
    assert not bad, (
        f"{path.relative_to(ROOT)}: skips whose reason does not name an absent asset ('<asset> absent: "
        f"install ...'): {bad}. A check that cannot run for another reason must fail instead"
    )
