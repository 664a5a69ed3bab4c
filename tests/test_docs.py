"""Docs stay honest: every CLI command and flag is in docs/cli.md, every hook is in docs/concepts.md."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from prunekit_core import hookspecs
from prunekit_core.cli import build_parser, subcommand_parsers

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _flags(parser) -> list[str]:  # noqa: ANN001 - argparse.ArgumentParser
    return [opt for action in parser._actions for opt in action.option_strings]


@pytest.fixture(scope="module")
def cli_md() -> str:
    return (DOCS / "cli.md").read_text()


@pytest.mark.parametrize("command", sorted(subcommand_parsers()))
def test_every_subcommand_and_flag_is_in_cli_md(cli_md: str, command: str) -> None:
    assert f"## prunekit {command}" in cli_md
    section = cli_md.split(f"## prunekit {command}", 1)[1].split("\n## ", 1)[0]
    missing = [flag for flag in _flags(subcommand_parsers()[command]) if flag not in section]
    assert not missing, f"docs/cli.md lacks {missing} for `prunekit {command}`: run scripts/gen_cli_docs.py"


def test_top_level_flags_are_in_cli_md(cli_md: str) -> None:
    assert all(flag in cli_md for flag in _flags(build_parser()))


def hooks() -> list[str]:
    return [
        name
        for name, obj in vars(hookspecs).items()
        if name.startswith("prunekit_") and inspect.isfunction(obj)
    ]


def test_there_are_hooks() -> None:
    assert len(hooks()) >= 3


@pytest.mark.parametrize("hook", hooks())
def test_every_hook_is_documented_in_concepts(hook: str) -> None:
    assert f"`{hook}" in (DOCS / "concepts.md").read_text()
