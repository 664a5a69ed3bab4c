"""The type check stays meaningful: every type-ignore comment names its error code and says why, and mypy
checks prunekit_core and every plugin package (scripts/test.sh runs it; the config is pyproject.toml's
``[tool.mypy]``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

_IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<rest>.*)$")
# an error code, then a comment with words in it: "# type: ignore[attr-defined]  # why it is right"
_GOOD = re.compile(r"^\[[a-z0-9-]+(?:,\s*[a-z0-9-]+)*\]\s+#\s*\S.*\w")


def ignore_problems(text: str) -> list[tuple[int, str]]:
    """(line number, the line) of every type-ignore comment without an error code or without a reason."""
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        m = _IGNORE.search(line)
        if m and not _GOOD.match(m.group("rest")):
            out.append((no, line.strip()))
    return out


def python_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if not any(
            part in SKIP_DIRS or part.startswith(".venv") or part.endswith(".egg-info") for part in rel.parts
        ):
            files.append(path)
    return sorted(files)


def test_the_checker_flags_bare_and_unexplained_ignores() -> None:
    ign = "type: " + "ignore"  # split, so that this file's own lines are no such comments
    lines = [
        f"x = f()  # {ign}",
        f"x = f()  # {ign}[arg-type]",
        f"x = f()  # {ign}[arg-type]  #",
        f"x = f()  # {ign}  # no code",
        f"x = f()  # {ign}[arg-type]  # a plain int (torch types it Tensor | Module)",
        f"x = f()  # {ign}[misc, arg-type]  # see the line above",
        "x = f()  # no ignore here",
    ]
    assert [no for no, _ in ignore_problems("\n".join(lines))] == [1, 2, 3, 4]


def test_every_type_ignore_gives_its_code_and_reason() -> None:
    files = python_files()
    assert any(p.parent.name == "prunekit_core" for p in files)  # the walk found the sources
    bad = [
        f"{path.relative_to(ROOT)}:{no}: {line}"
        for path in files
        for no, line in ignore_problems(path.read_text(encoding="utf-8"))
    ]
    assert not bad, "write `# type: ignore[code]  # reason` (or fix the type) at:\n" + "\n".join(bad)


def _mypy_files() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.mypy]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^strict = true$", section, re.M), "[tool.mypy] must keep strict = true"
    listed = re.search(r"^files = \[(.*?)\]", section, re.M | re.S)
    assert listed, "[tool.mypy] has no files list"
    return re.findall(r'"([^"]+)"', listed.group(1))


def test_mypy_checks_the_core_and_every_plugin_package() -> None:
    files = set(_mypy_files())
    packages = {"prunekit_core"}
    for project in [*ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("examples/*/pyproject.toml")]:
        for init in project.parent.rglob("__init__.py"):
            pkg = init.parent
            if pkg.name != "tests" and not (pkg.parent / "__init__.py").exists():  # a top-level package
                packages.add(str(pkg.relative_to(ROOT)))
    assert len(packages) >= 5, packages  # the core and the four plugins this repository ships
    missing = sorted(packages - files)
    assert not missing, f"add {missing} to files = [...] under [tool.mypy] in pyproject.toml"
