"""``prunekit study errors``: per-layer SQNR of quantization, unstructured pruning and whole-layer removal.

The options and the tables only: the measurements are :func:`prunekit_core.study.errors.study_errors`'s.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .options import (
    MODEL_HELP,
    TEXT_HELP,
    HelpFormatter,
    add_calib_window_args,
    add_load_args,
    epilog,
    positive,
)
from .ui import EXIT_OK, UI, UIReporter


def _sparsity(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sparsity wants a number between 0 and 1, got {value!r}"
        ) from None
    if not 0.0 < s < 1.0:
        raise argparse.ArgumentTypeError(
            f"--sparsity wants a number between 0 and 1 (exclusive), got {value}"
        )
    return s


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "study",
        parents=[common],
        formatter_class=HelpFormatter,
        help="studies of a model's compression errors (errors: pruning vs quantization vs removal)",
        description="Studies that measure a model rather than change it. One so far: errors.",
        epilog=epilog("prunekit study errors smollm2-135m --calib c4", "prunekit study errors --help"),
    )
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    e = studies.add_parser(
        "errors",
        parents=[common],
        formatter_class=HelpFormatter,
        help="per-layer SQNR of quantization, magnitude/OBS pruning and whole-layer removal",
        description=(
            "For every decoder block of MODEL, on calibration windows of TEXT: the SQNR (dB) of the block's "
            "output when its linear weights are quantized (--format), pruned unstructured by magnitude or by "
            "OBS (SparseGPT) at the sparsity of equal compression (1 - bits/16, Kuzmin et al. 2023), and when "
            "the block is removed whole (its contribution to the residual stream, relative to the stream). "
            "Then ShortGPT's removal of the 1..--max-removed lowest Block-Influence blocks against pruning "
            "every block at the same share of the body's parameters, at the end of the stack, with the "
            "paper's analytical weight-space bounds. docs/results/pruning_vs_quantization_bounds.md reads "
            "the result for SmolLM2-135M."
        ),
        epilog=epilog(
            "prunekit study errors smollm2-135m --calib c4",
            "prunekit study errors smollm2-135m --calib c4 --format int8 --format int4_g32 --markdown errors.md",
            "prunekit study errors ./my-llama --calib notes.txt --windows 8 --json",
        ),
    )
    e.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("--calib", required=True, metavar="TEXT", help="calibration text: " + TEXT_HELP)
    add_calib_window_args(e)
    e.add_argument(
        "--format",
        action="append",
        metavar="F",
        help="a quantization format (repeat for several; see `prunekit plugins`); default int8 and int4_g128",
    )
    e.add_argument(
        "--sparsity",
        action="append",
        type=_sparsity,
        metavar="S",
        help="a further pruning sparsity to measure per block (repeat for several)",
    )
    e.add_argument(
        "--max-removed",
        type=positive("--max-removed"),
        default=6,
        metavar="K",
        help="ShortGPT removals of 1..K blocks to compare at the end of the stack (default 6)",
    )
    e.add_argument("--markdown", default=None, metavar="FILE", help="write the tables as Markdown to FILE")
    add_load_args(e)
    e.set_defaults(func=cmd_study_errors)


def _f(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else str(x)


def cmd_study_errors(args: argparse.Namespace, ui: UI) -> int:
    """Measure with :func:`prunekit_core.study.errors.study_errors` and print its tables (or, with
    ``--json``, one object)."""
    from ..study.errors import spread_sqnr, study_errors

    res = study_errors(
        args.model,
        calib=args.calib,
        seq_len=args.seq_len,
        windows=args.windows,
        formats=args.format or ("int8", "int4_g128"),
        sparsities=args.sparsity or (),
        max_removed=args.max_removed,
        markdown=args.markdown,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        reporter=(rep := UIReporter(ui)),
    )
    if ui.json_mode:
        ui.emit_json(res.to_dict())
        return EXIT_OK
    fmts = list(res.formats)
    cols = ["block", "BI", "removal"]
    for f in fmts:
        s = res.formats[f][1]
        cols += [f, f"mag {s:.0%}", f"OBS {s:.0%}"]
    rows = []
    for b in res.blocks:
        row = [b.block, f"{b.block_influence:.3f}", _f(b.removal)]
        for f in fmts:
            s = round(res.formats[f][1], 4)
            row += [_f(b.quant[f]), _f(b.magnitude[s]), _f(b.obs[s])]
        rows.append(row)
    rep.table("block output SQNR (dB)", cols, rows)
    one = res.block_share
    ui.say(
        f"pruning every block at one block's share ({one:.1%}) of the body, errors added: "
        f"OBS {_f(spread_sqnr(res.blocks, one, 'obs'))} dB, magnitude "
        f"{_f(spread_sqnr(res.blocks, one, 'magnitude'))} dB"
    )
    rep.table(
        "ShortGPT removal vs pruning at the same share, end of the stack (dB)",
        ["k", "removed", "share", "removal", "magnitude", "OBS", "Gaussian bound"],
        [
            [
                str(k),
                ",".join(r.blocks),
                f"{r.ratio:.1%}",
                _f(r.removal),
                _f(r.magnitude),
                _f(r.obs),
                _f(r.gaussian),
            ]
            for k, r in enumerate(res.removals, 1)
        ],
    )
    if args.markdown:
        ui.say(f"saved: {args.markdown}")
    return EXIT_OK
