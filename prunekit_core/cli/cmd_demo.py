"""``prunekit demo``: prune SmolLM2-135M end to end (:func:`prunekit_core.study.demo.run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..ir.defaults import check_ratio
from .options import HelpFormatter, add_calib_window_args, add_eval_args, epilog
from .ui import EXIT_OK, UI


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=HelpFormatter,
        help="prune SmolLM2-135M by 10%% end to end (a few minutes on a laptop CPU)",
        description=(
            "On the real SmolLM2-135M-Instruct (alias smollm2-135m, dequantized from its Q4_1 GGUF): calibrate on c4, measure perplexity on wiki, prune "
            "--ratio of the block parameters with prunekit's best planner, measure again, save to --out, reload "
            "the result (plain transformers for a whole-block plan, prunekit_core.load_pruned otherwise) and "
            "check its logits, and write scores.png (per-block BI and per-sublayer drop scores, removed units "
            "highlighted; the title names the method that chose them). Timings are printed per step. --out is replaced only when it holds a previous "
            "prunekit output."
        ),
        epilog=epilog("prunekit demo", "prunekit demo --out /tmp/demo --ratio 0.2 --eval-windows 4 --json"),
    )
    p.add_argument(
        "--out",
        default="prunekit-demo-out",
        metavar="DIR",
        help="output folder (default ./prunekit-demo-out)",
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=0.1,
        metavar="R",
        help="fraction of block parameters to remove (default 0.1)",
    )
    add_eval_args(p, fixed_text="wiki", windows=8)
    add_calib_window_args(p, prefix="calib-", windows_help="c4 calibration windows")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, ui: UI) -> int:
    from ..study.demo import run_demo

    check_ratio(args.ratio)
    result = run_demo(
        out=Path(args.out),
        ratio=args.ratio,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        calib_windows=args.calib_windows,
        calib_seq_len=args.calib_seq_len,
        log=ui.info,
        say=ui.say,
        status=ui.err.status,
    )
    if ui.json_mode:
        ui.emit_json(result)
    return EXIT_OK
