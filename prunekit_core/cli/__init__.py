"""The ``prunekit`` command line: ``plugins``, ``inspect``, ``new-plugin``, ``score``, ``prune``, ``recover``,
``eval``, ``export``, ``demo``, ``sweep``, ``report``, ``compress``, ``study``.

Every command is a thin layer over the Python API (:mod:`prunekit_core`). What callers may rely on:

* ``--json`` prints exactly one JSON object on stdout and nothing else; progress and timings go to stderr.
* Every :class:`~prunekit_core.ir.errors.PrunekitError` is printed as ``error: <message>`` on stderr with exit
  code 2 and no traceback; usage errors exit 2 as well.
* Inputs (ratio, files, text, model, output folder) are validated before any expensive work, and nothing
  is written when a command fails.

Layout: one module per command (``cmd_<name>.py``: its parser, ``add_parser``, next to its ``cmd_<name>``
function), the option groups several commands share in :mod:`.options` (declared once), the checks and
loading of the commands that load a model themselves in :mod:`.inputs`, and the output and logging quiet
in :mod:`.ui`. ``prune``, ``recover``, ``score`` and ``eval`` only parse, call their function of
:mod:`prunekit_core.study.pipeline` (which holds the checks and the policy) and print what it reports. ``cli`` is the top layer: it may import anything of prunekit_core,
and nothing below it imports ``cli``. At module level it imports only argparse, ``defaults`` and ``errors``
(and the registry while a command runs): ``prunekit --help`` and ``prunekit plugins`` import no torch, so
the heavy imports live inside the command functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..ir.errors import PrunekitError
from . import (
    cmd_compress,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_inspect,
    cmd_new_plugin,
    cmd_plugins,
    cmd_prune,
    cmd_recover,
    cmd_report,
    cmd_score,
    cmd_study,
    cmd_sweep,
)
from .options import HelpFormatter, common_parser, epilog
from .ui import EXIT_ERROR, EXIT_INTERRUPTED, UI, quiet_libraries

__all__ = ["build_parser", "cli_markdown", "main", "subcommand_parsers"]

#: the commands, in the order ``prunekit --help`` lists them
COMMANDS = (
    cmd_plugins,
    cmd_inspect,
    cmd_new_plugin,
    cmd_score,
    cmd_prune,
    cmd_recover,
    cmd_eval,
    cmd_export,
    cmd_demo,
    cmd_sweep,
    cmd_report,
    cmd_compress,
    cmd_study,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit",
        description=(
            "Structured pruning of LLMs: inspect a model's pruning IR, score its blocks and sublayers, prune to "
            "a parameter budget, evaluate perplexity, save and reload. Errors exit with code 2."
        ),
        formatter_class=HelpFormatter,
        epilog=epilog(
            "prunekit demo",
            "prunekit plugins",
            "prunekit inspect smollm2-135m",
            "prunekit prune smollm2-135m --ratio 0.1 --calib c4 --eval wiki --out out/smollm2-10",
            "prunekit eval out/smollm2-10 --text wiki --max-tokens 8192 --json",
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show INFO logs and third-party warnings, logs and progress bars (torch, torchao, transformers)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_parser()
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """The parser of every subcommand, by name (docs and tests walk them)."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_markdown() -> str:
    """The generated part of docs/cli.md: ``--help`` of the tool and of every subcommand."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help to $COLUMNS: keep the docs stable
    try:
        parser = build_parser()
        parts = ["## prunekit\n", "```text", parser.format_help().rstrip(), "```\n"]
        for name, sp in subcommand_parsers(parser).items():
            parts += [f"## prunekit {name}\n", "```text", sp.format_help().rstrip(), "```\n"]
            for sub, ssp in subcommand_parsers(sp).items():  # nested commands: `prunekit study errors`
                parts += [f"## prunekit {name} {sub}\n", "```text", ssp.format_help().rstrip(), "```\n"]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 error or usage error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_ERROR
    verbose = bool(getattr(args, "verbose", False))
    ui = UI(json_mode=bool(getattr(args, "json", False)))
    try:
        with quiet_libraries(verbose):
            return int(args.func(args, ui))
    except PrunekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
