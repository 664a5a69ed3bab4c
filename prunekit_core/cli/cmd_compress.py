"""``prunekit compress``: block removal and per-layer formats chosen together under one size budget.

The options and the printing only: the search is :func:`prunekit_core.study.compress.compress`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import MODEL_HELP, TEXT_HELP, HelpFormatter, epilog, positive, seq_len
from .ui import EXIT_OK, UI

DEFAULT_FORMATS = "int8,int6_g128,int5_g128,int4_g64,int4_g32,int3_g64,int3_g32,int2a_g32"


def _bits(value: str) -> float:
    try:
        b = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-bits takes a number such as 4.5, not {value!r}") from None
    if not b > 0:
        raise argparse.ArgumentTypeError(f"--target-bits must be positive, not {value}")
    return b


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compress",
        parents=[common],
        formatter_class=HelpFormatter,
        help="choose block removals and a weight format per layer together, under one size budget",
        description=(
            "Fit MODEL into a size budget (--target-size bytes or --target-bits per parameter, every "
            "parameter counted by the exact size accountant: elements, scales, zero points). The search "
            "chooses which decoder blocks to remove and one format from --formats for each remaining tensor "
            "family (each block's attention and MLP, the embeddings, an untied head). Its objective is the "
            "loss on held-out windows of the calibration text (never the evaluation text): per-unit "
            "sensitivities (removal trials, per-family quantization trials), an additive knapsack solution, "
            "then --steps measured search steps that correct for interactions (EvoPress-style). Weights are "
            "fake-quantized (stored dequantized); compress.json in --out records every choice, the budget, "
            "the achieved size and the losses. See docs/compress.md."
        ),
        epilog=epilog(
            "prunekit compress smollm2-135m --target-bits 4.5 --out out/smollm2-4.5b",
            "prunekit compress smollm2-135m --target-size 60MB --formats int8,int4_g32,int3_g64 --out out/60mb",
            "prunekit compress smollm2-135m --target-bits 3.5 --steps 32 --heldout-windows 8 --out out/3.5b",
        ),
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--target-size",
        metavar="SIZE",
        help="budget in bytes: 60MB (10^6), 57MiB (2^20), 800KB, or a plain byte count",
    )
    budget.add_argument(
        "--target-bits",
        type=_bits,
        metavar="B",
        help="budget in bits per parameter of the unpruned model (all parameters counted)",
    )
    p.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        metavar="LIST",
        help=f"comma-separated candidate formats (`prunekit plugins` lists them; 'none' keeps 16 bits) "
        f"(default {DEFAULT_FORMATS})",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (a prunekit checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prunekit output at --out")
    p.add_argument(
        "--calib", default="c4", metavar="TEXT", help="calibration text (default c4): " + TEXT_HELP
    )
    p.add_argument(
        "--calib-windows",
        type=positive("--calib-windows"),
        default=8,
        metavar="N",
        help="calibration windows for the local quantization errors (default 8)",
    )
    p.add_argument(
        "--heldout-windows",
        type=positive("--heldout-windows"),
        default=4,
        metavar="N",
        help="held-out windows of the calibration text, after the calibration ones: the objective (default 4)",
    )
    p.add_argument(
        "--seq-len",
        type=seq_len,
        default=256,
        metavar="N",
        help="tokens per calibration window (default 256)",
    )
    p.add_argument(
        "--eval",
        default="wiki",
        metavar="TEXT",
        help="text to report perplexity on, read after the search (default wiki; 'none' skips it)",
    )
    p.add_argument(
        "--eval-windows",
        type=positive("--eval-windows"),
        default=16,
        metavar="N",
        help="evaluation windows (default 16)",
    )
    p.add_argument(
        "--eval-seq-len",
        type=seq_len,
        default=1024,
        metavar="N",
        help="tokens per evaluation window (default 1024)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=16,
        metavar="N",
        help="measured search steps after the additive solution (default 16; 0: the additive solution)",
    )
    p.add_argument(
        "--max-removed",
        type=int,
        default=None,
        metavar="N",
        help="most blocks the search may remove (default: half the removable blocks; 0: none)",
    )
    p.add_argument(
        "--sensitivity",
        choices=("scaled", "measured"),
        default="scaled",
        help="scaled: measure each family's loss increase at one reference format and scale it to the other "
        "formats by their local output error (default); measured: measure every format (slower)",
    )
    p.add_argument(
        "--reference-format",
        default=None,
        metavar="FMT",
        help="the format measured with --sensitivity scaled (default: the one nearest the budget's bits)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the search's random moves (default 0)")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace, ui: UI) -> int:
    from ..study.compress import compress
    from .inputs import check_model

    check_model(args.model)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    res = compress(
        args.model,
        target_size=args.target_size,
        target_bits=args.target_bits,
        formats=formats,
        calib=args.calib,
        calib_windows=args.calib_windows,
        heldout_windows=args.heldout_windows,
        seq_len=args.seq_len,
        eval=None if args.eval == "none" else args.eval,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        steps=args.steps,
        max_removed=args.max_removed,
        sensitivity=args.sensitivity,
        reference=args.reference_format,
        seed=args.seed,
        out=args.out,
        overwrite=args.overwrite,
        on_step=ui.info,
    )
    rec = res.record
    if ui.json_mode:
        ui.emit_json(rec)
        return EXIT_OK
    b, a = rec["budget"], rec["achieved"]
    ui.say(f"budget: {b['given']} = {b['bits']:,} bits ({b['bits_per_param']:.3f} bits/param)")
    ui.say(f"achieved: {a['bits']:,} bits = {a['bytes']:,} bytes ({a['bits_per_param']:.3f} bits/param)")
    ui.say(f"removed blocks: {', '.join(rec['removed_blocks']) or 'none'}")
    counts: dict[str, int] = {}
    for fam in rec["families"].values():
        counts[fam["format"]] = counts.get(fam["format"], 0) + 1
    ui.say("families: " + ", ".join(f"{n} x {q}" for q, n in sorted(counts.items())))
    emb = rec["families"].get("embeddings", {}).get("format")
    if emb:
        ui.say(f"embeddings: {emb}")
    obj = rec["objective"]
    ui.say(
        f"held-out loss ({obj['text']}, windows {obj['heldout_windows'][0]}-{obj['heldout_windows'][1] - 1}): "
        f"{obj['heldout_loss']:.4f} (unquantized {rec['sensitivities']['base_loss']:.4f})"
    )
    if rec["evaluation"]:
        ev = rec["evaluation"]
        ui.say(f"perplexity on {ev['text']} ({ev['windows']} x {ev['seq_len']}): {ev['perplexity']:.2f}")
    ui.say(f"wrote {res.out} (record of every choice: {res.out}/compress.json)")
    return EXIT_OK
