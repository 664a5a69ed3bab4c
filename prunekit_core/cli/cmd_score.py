"""``prunekit score``: importance of every unit (or channel group) for one or more metrics."""

from __future__ import annotations

import argparse
from typing import Any

from ..ir.errors import PlanError
from .inputs import check_model, check_text, load_model, multimodal, text_windows
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
from .steps import open_streaming, stream_calibrate
from .ui import EXIT_OK, UI

DEFAULT_SCORE_METRICS = ("bi", "sublayer_drop", "angular")


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
    from rich.table import Table

    from ..registry.plugins import get_metric
    from ..scoring.api import calibrate, inspect, score
    from ..scoring.metrics import ChannelMetric

    names = list(dict.fromkeys(args.metric or DEFAULT_SCORE_METRICS))
    metrics = [get_metric(n) for n in names]
    channel = [m for m in metrics if isinstance(m, ChannelMetric)]
    if channel and len(channel) != len(metrics):
        raise PlanError(
            f"{channel[0].name} scores channel groups, {next(m for m in metrics if m not in channel).name} "
            "scores blocks or sublayers: score them in separate runs"
        )
    span = args.span if args.span is not None else 1
    if args.streaming:
        from ..scoring.streaming import check_streaming_metric

        for m in metrics:
            check_streaming_metric(m)
    check_text(args.calib)
    check_model(args.model)
    if args.streaming:
        sm, tok = open_streaming(ui, args.model)
        model, ir = sm.model, sm.ir
    else:
        model, tok, _src = load_model(ui, args.model, args)
        ir = inspect(model)
    windows = text_windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
    ui.info(f"calibration: {windows.num_windows} windows x {windows.seq_len} tokens of {args.calib}")
    if channel:
        return _score_channels(ui, sm if args.streaming else model, windows, channel, args.calib)
    if args.streaming:
        cal = stream_calibrate(ui, sm, windows.ids, metrics)
    else:
        with ui.step("calibrate"):
            ids, extra = multimodal(model, windows.ids)
            cal = calibrate(model, ids, inputs=extra)
    results: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for m in metrics:
        with ui.step(f"score {m.name}"):
            if args.streaming:
                from ..scoring.streaming import stream_score

                s = stream_score(sm, cal, m.name, span=span if m.unit == "span" else None)
            else:
                s = score(model, cal, m.name, span=span if m.unit == "span" else None)
            if s.block_forwards is not None:
                ui.info(f"{m.name}: {s.block_forwards} block forwards (cached removal trials)")
        results[m.name] = s
        labels[m.name] = f"{m.name} (span {s.span})" if s.span else m.name
    if ui.json_mode:
        ui.emit_json({name: dict(s.values) for name, s in results.items()})
        return EXIT_OK
    table = Table(title=f"importance scores (higher = keep) on {windows.num_tokens} tokens of {args.calib}")
    table.add_column("unit")
    for name in results:
        table.add_column(labels[name], justify="right")
    order = [u for b in ir.blocks() for u in [b.id, *(s.id for s in b.sublayers)]]
    for uid in order:
        cells = []
        for s in results.values():
            v = s.values.get(uid)
            cells.append("" if v is None else f"{v:.4g}")
        if any(cells):
            table.add_row(uid, *cells)
    ui.table(table)
    for m in metrics:
        ui.say(f"{m.name}: {m.description}")
    return EXIT_OK


def _score_channels(ui: UI, model: Any, windows: Any, metrics: list[Any], text: str) -> int:
    """``model``: a loaded model, or a :class:`~prunekit_core.scoring.streaming.StreamingModel` (block by block)."""
    from rich.table import Table

    from ..scoring.api import score_groups
    from ..scoring.calibration import Calibration
    from ..scoring.streaming import StreamingModel, stream_score_groups

    if isinstance(model, StreamingModel):
        cal = stream_calibrate(ui, model, windows.ids, metrics, images=False)  # as score_groups below
        results = {m.name: stream_score_groups(cal, m.name) for m in metrics}
    else:
        cal = Calibration(windows=windows.ids)
        with ui.step(f"score {', '.join(m.name for m in metrics)}"):  # one context: shared statistics
            results = score_groups(model, cal, [m.name for m in metrics])
    if ui.json_mode:
        ui.emit_json({n: {f: [float(v) for v in t] for f, t in r.items()} for n, r in results.items()})
        return EXIT_OK
    for name, res in results.items():
        table = Table(
            title=f"{name}: channel-group importance (higher = keep) on {windows.num_tokens} tokens of {text}"
        )
        for col in ("family", "groups", "min", "median", "max", "least important"):
            table.add_column(col, justify="left" if col in ("family", "least important") else "right")
        for fid, t in res.items():
            low = ", ".join(str(int(i)) for i in t.argsort()[:5])
            table.add_row(fid, str(len(t)), f"{t.min():.4g}", f"{t.median():.4g}", f"{t.max():.4g}", low)
        ui.table(table)
    for m in metrics:
        ui.say(f"{m.name}: {m.description}")
    return EXIT_OK
