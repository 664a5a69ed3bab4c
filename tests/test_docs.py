"""Docs stay honest: every CLI command and flag is in docs/cli.md, every hook in docs/concepts.md and the
hook reference docs/plugins/hooks.md, every conformance check in docs/plugins/testing-plugins.md."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from prunekit_core.cli import build_parser, subcommand_parsers
from prunekit_core.registry import hookspecs

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


# --- docs/plugins -------------------------------------------------------------------------------------

PLUGINS = DOCS / "plugins"


@pytest.mark.parametrize("hook", hooks())
def test_every_hook_is_in_the_hook_reference(hook: str) -> None:
    text = (PLUGINS / "hooks.md").read_text()
    assert f"## `{hook}`" in text, f"docs/plugins/hooks.md has no section for {hook}"
    section = text.split(f"## `{hook}`", 1)[1].split("\n## ", 1)[0]
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"`{hook}({params})`" in section, f"hooks.md shows another signature for {hook}"
    summary = inspect.getdoc(getattr(hookspecs, hook)).splitlines()[0]
    assert summary in section, f"hooks.md lacks the docstring summary of {hook}: {summary!r}"


def test_hook_reference_names_no_stale_hook() -> None:
    import re

    documented = re.findall(r"^## `(prunekit_\w+)`", (PLUGINS / "hooks.md").read_text(), flags=re.M)
    assert sorted(documented) == sorted(hooks())


def test_every_conformance_check_is_in_testing_plugins() -> None:
    from prunekit_core.testing import AdapterConformance

    text = (PLUGINS / "testing-plugins.md").read_text()
    checks = sorted(n for n in dir(AdapterConformance) if n.startswith("test_"))
    missing = [c for c in checks if f"| `{c}` |" not in text]
    assert not missing, f"docs/plugins/testing-plugins.md does not describe {missing}"


def test_every_capability_is_in_testing_plugins() -> None:
    from prunekit_core.testing import CAPABILITIES

    text = (PLUGINS / "testing-plugins.md").read_text()
    missing = [c for c in CAPABILITIES if f"| `{c}` |" not in text]
    assert not missing, f"docs/plugins/testing-plugins.md does not describe capabilities {missing}"


def test_tutorial_counts_the_example_checks() -> None:
    """The tutorial's "all N checks" is what the example's declared capabilities collect."""
    import re

    from prunekit_core.testing import AdapterConformance, check_needs

    example = DOCS.parent / "examples" / "prunekit-gptj" / "tests" / "test_gptj_conformance.py"
    declared = set(
        re.findall(r'"(\w+)"', re.search(r"capabilities = \{(.*)\}", example.read_text()).group(1))
    )
    runs = [n for n in vars(AdapterConformance) if n.startswith("test_") and check_needs(n) <= declared]
    counted = re.findall(r"passes all (\d+) checks", (PLUGINS / "writing-a-plugin.md").read_text())
    assert counted == [str(len(runs))], f"the tutorial says {counted} checks; the example runs {len(runs)}"


@pytest.mark.parametrize("page", ["installing.md", "writing-a-plugin.md", "hooks.md", "testing-plugins.md"])
def test_plugin_docs_are_linked_from_the_index(page: str) -> None:
    assert f"]({page})" in (PLUGINS / "README.md").read_text()


def test_tutorial_shows_the_llama_plugin_as_it_is() -> None:
    """writing-a-plugin.md's "The same path: the Llama plugin" listing is the plugin's own declaration."""
    import re

    text = (PLUGINS / "writing-a-plugin.md").read_text()
    section = text[text.index("### The same path: the Llama plugin") :]
    listing = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = (DOCS.parent / "plugins" / "llama" / "prunekit_llama" / "adapter.py").read_text()
    assert listing.strip() in source, "the tutorial's Llama listing differs from prunekit_llama/adapter.py"
