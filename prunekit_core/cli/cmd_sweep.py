"""``prunekit sweep``: run a grid of methods x ratios x formats into a SQLite store."""

from __future__ import annotations

import argparse
from typing import Any

from ..ir.defaults import EXECUTORS
from .inputs import check_model
from .options import HelpFormatter, epilog, positive
from .ui import EXIT_OK, UI


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sweep",
        parents=[common],
        formatter_class=HelpFormatter,
        help="run a grid of pruning methods x ratios x quantization formats into a SQLite store",
        description=(
            "Run every cell of CONFIG (YAML or JSON: model, calibration, evaluation, methods, ratios, formats, "
            "quantize) not yet in --results. Each finished cell is one row, committed as it finishes: a sweep "
            "killed at any moment resumes, without losing or duplicating a row, when started again. Ratio 0 "
            "runs once (the unpruned model). See docs/sweep.md."
        ),
        epilog=epilog(
            "prunekit sweep sweep.yaml --results out/sweep.sqlite",
            "prunekit sweep sweep.yaml --results out/sweep.sqlite --executor serial",
            "prunekit sweep sweep.yaml --results out/sweep.sqlite --executor ray --ray-address auto",
            "prunekit report out/sweep.sqlite --out out/report",
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="sweep config, .yaml/.yml or .json")
    p.add_argument(
        "--results", required=True, metavar="PATH", help="SQLite results store (created or resumed)"
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: a process pool on this machine (default); serial: this process, one cell after another; "
        "ray: a Ray cluster (pip install 'prunekit-core[ray]')",
    )
    p.add_argument(
        "--workers",
        type=positive("--workers"),
        default=None,
        metavar="N",
        help="local/ray: parallel cells (default: one per CPU core, each single-threaded)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="ray: cluster address (default: start a local Ray)",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace, ui: UI) -> int:
    from ..study.sweep import load_sweep_config, plan_cells, run_sweep

    config = load_sweep_config(args.config)
    check_model(config.model)  # a missing folder fails here, not in every worker
    cells = plan_cells(config)
    ui.info(
        f"sweep: {len(cells)} cells ({len(config.ratios)} ratios, {len(config.methods)} methods, "
        f"{len(config.formats)} formats) on {config.model}; evaluation {config.evaluation.windows} x "
        f"{config.evaluation.seq_len} tokens of {config.evaluation.text}; executor {args.executor}"
    )

    def on_row(row: dict[str, Any], done: int, total: int) -> None:
        ppl = row["perplexity"]
        ppl_s = f"{ppl:.2f}" if ppl is not None else "inf/nan"
        ui.info(
            f"[{done}/{total}] {row['cell']}: perplexity {ppl_s}, {row['bits_per_param']:.3f} bits/param "
            f"({row['seconds']:.1f} s)"
        )

    summary = run_sweep(
        config,
        args.results,
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
        on_row=on_row,
    )
    ui.info(
        f"sweep: {summary['written']} new rows, {summary['skipped']} already in {args.results}; "
        f"{summary['wall_s']:.1f} s"
    )
    if ui.json_mode:
        ui.emit_json(summary)
    else:
        ui.say(
            f"results: {args.results} ({summary['cells']} cells); next: prunekit report {args.results} --out DIR"
        )
    return EXIT_OK
