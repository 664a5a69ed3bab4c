"""``prunekit score``: importance of every unit (or channel group) for one or more metrics.

The options and the tables only: the checks and the choice of calibration (streaming or in memory, with
images or the text windows alone) are :func:`prunekit_core.study.commands.score_model`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..ir.defaults import DEFAULT_SCORE_METRICS
from .options import (
    MODEL_HELP,
    STREAMING_HELP,
    TEXT_HELP,
    HelpFormatter,
    add_calib_window_args,
    add_load_args,
    epilog,
    positive,
)
from .ui import EXIT_OK, UI, UIReporter


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "score",
        parents=[common],
        formatter_class=HelpFormatter,
        help="score blocks and sublayers with importance metrics",
        description=(
            "Calibrate MODEL on TEXT (one forward pass for all similarity metrics) and print the importance "
            "of every unit (higher = keep) for each metric, in unit order. Default metrics: "
            + ", ".join(DEFAULT_SCORE_METRICS)
            + " (angular over spans of --span blocks, default 1). Trial metrics (nri, sleb) measure the "
            "calibration loss with each unit removed. --json prints {metric: {unit: score}}.\n\n"
            "Channel metrics (magnitude, wanda, taylor, obs) score the groups of every channel-group family "
            "instead (KV groups, FFN channels): the table summarises each family and names its least "
            "important groups; --json prints {metric: {family: [score per group]}}."
        ),
        epilog=epilog(
            "prunekit score smollm2-135m --calib c4",
            "prunekit score smollm2-135m --calib c4 --metric obs --metric wanda",
            "prunekit score smollm2-135m --calib c4 --metric bi --metric angular --span 4 --json",
            "prunekit score ./my-llama --calib notes.txt --seq-len 128 --windows 8 --metric nri",
            "prunekit score ./big-llama --calib c4 --metric bi --metric sublayer_drop --streaming",
        ),
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--calib", required=True, metavar="TEXT", help="calibration text: " + TEXT_HELP)
    p.add_argument(
        "--metric",
        action="append",
        metavar="M",
        help="a metric name (repeat for several; see `prunekit plugins`); default: "
        + " ".join(DEFAULT_SCORE_METRICS),
    )
    add_calib_window_args(p)
    p.add_argument(
        "--span",
        type=positive("--span"),
        default=None,
        metavar="N",
        help="blocks per span for span metrics (default 1)",
    )
    add_load_args(p)
    p.add_argument("--streaming", action="store_true", help=STREAMING_HELP)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace, ui: UI) -> int:
    """Parse nothing more, score with :func:`prunekit_core.study.commands.score_model` (the checks and the
    choice of calibration live there) and print the scores: a table, or with ``--json`` one object."""
    from ..study.commands import score_model

    res = score_model(
        args.model,
        calib=args.calib,
        metrics=args.metric,
        span=args.span,
        seq_len=args.seq_len,
        windows=args.windows,
        streaming=args.streaming,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        reporter=UIReporter(ui),
    )
    if res.groups:
        _print_channels(ui, res.groups, res.windows.num_tokens, args.calib)
    elif ui.json_mode:
        ui.emit_json({name: dict(s.values) for name, s in res.scores.items()})
    else:
        _print_units(ui, res, args.calib)
    if not ui.json_mode:
        for m in res.metrics:
            ui.say(f"{m.name}: {m.description}")
    return EXIT_OK


def _print_units(ui: UI, res: Any, text: str) -> None:
    """One row per unit in the IR's order, one column per metric."""
    from rich.table import Table

    table = Table(title=f"importance scores (higher = keep) on {res.windows.num_tokens} tokens of {text}")
    table.add_column("unit")
    for name, s in res.scores.items():
        table.add_column(f"{name} (span {s.span})" if s.span else name, justify="right")
    order = [u for b in res.ir.blocks() for u in [b.id, *(s.id for s in b.sublayers)]]
    for uid in order:
        cells = []
        for s in res.scores.values():
            v = s.values.get(uid)
            cells.append("" if v is None else f"{v:.4g}")
        if any(cells):
            table.add_row(uid, *cells)
    ui.table(table)


def _print_channels(ui: UI, results: dict[str, Any], tokens: int, text: str) -> None:
    """Per channel metric: each family summarised, with its least important groups."""
    from rich.table import Table

    if ui.json_mode:
        ui.emit_json({n: {f: [float(v) for v in t] for f, t in r.items()} for n, r in results.items()})
        return
    for name, res in results.items():
        table = Table(title=f"{name}: channel-group importance (higher = keep) on {tokens} tokens of {text}")
        for col in ("family", "groups", "min", "median", "max", "least important"):
            table.add_column(col, justify="left" if col in ("family", "least important") else "right")
        for fid, t in res.items():
            low = ", ".join(str(int(i)) for i in t.argsort()[:5])
            table.add_row(fid, str(len(t)), f"{t.min():.4g}", f"{t.median():.4g}", f"{t.max():.4g}", low)
        ui.table(table)
