"""``prunekit report``: a Markdown report and a Pareto plot from a sweep's results store."""

from __future__ import annotations

import argparse
from typing import Any

from .options import HelpFormatter, epilog
from .ui import EXIT_OK, UI


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report",
        parents=[common],
        formatter_class=HelpFormatter,
        help="write a Markdown report and a PNG plot (bits per parameter vs perplexity) from a sweep",
        description=(
            "Read a results store written by `prunekit sweep` and write OUT/report.md (every cell, the Pareto "
            "front of bits per parameter against perplexity) and OUT/pareto.png (one marker per format, one "
            "color per pruning method and ratio)."
        ),
        epilog=epilog("prunekit report out/sweep.sqlite --out out/report"),
    )
    p.add_argument("results", metavar="RESULTS", help="SQLite results store")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and pareto.png")
    p.add_argument("--title", default="", help="report and plot title")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, ui: UI) -> int:
    from ..study.report import write_report

    paths = write_report(args.results, args.out, title=args.title)
    if ui.json_mode:
        ui.emit_json({k: str(v) for k, v in paths.items()})
    else:
        ui.say(f"report: {paths['report']}\nplot: {paths['plot']}")
    return EXIT_OK
