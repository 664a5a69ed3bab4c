"""``prunekit export``: write a pruned folder as a GGUF file that llama.cpp runs."""

from __future__ import annotations

import argparse
from typing import Any

from .options import HelpFormatter, epilog
from .ui import EXIT_OK, UI

#: kept here (not imported from io.gguf_export) so that ``prunekit --help`` imports no torch
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        formatter_class=HelpFormatter,
        help="write a pruned folder as a GGUF file for llama.cpp (removed sublayers and per-layer widths too)",
        description=(
            "Read a folder written by `prunekit prune --out` (any plan: it is loaded with load_pruned) and write "
            "one GGUF file with the weights, the tokenizer and the chat template. Plans that keep every layer "
            "alike become llama.cpp's `llama` architecture; per-layer head, KV-head or FFN widths and removed "
            "attention or MLP sublayers become `deci`. Mixtral exports with the same expert count in every "
            "layer. A plan llama.cpp cannot represent is refused with the unit and the reason. --type picks the "
            "weight type: 1-D tensors stay f32, and a matrix whose rows are not a whole number of the type's "
            "32-element blocks is written as f16 (prune with --round-to 32 to avoid it). The file is written "
            "atomically: a failed export leaves nothing at --out."
        ),
        epilog=epilog(
            "prunekit export out/smollm2-10 --format gguf --type q8_0 --out out/smollm2-10.q8_0.gguf",
            "prunekit export out/smollm2-10 --format gguf --type f32 --out out/smollm2-10.f32.gguf --json",
        ),
    )
    p.add_argument(
        "folder", metavar="DIR", help="a folder written by `prunekit prune --out` (or save_pruned)"
    )
    p.add_argument("--format", default="gguf", choices=("gguf",), help="file format (default: gguf)")
    p.add_argument("--type", default="f16", choices=TYPES, help="weight type of the matrices (default: f16)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, ui: UI) -> int:
    from ..io.gguf_export import export_gguf

    result = export_gguf(args.folder, args.out, type=args.type, overwrite=args.force)
    if ui.json_mode:
        ui.emit_json(result.to_dict())
    else:
        mib = sum(result.tensor_bytes.values()) / 2**20
        ui.say(
            f"wrote {result.path} ({result.arch}, {result.layers} layers, {result.type}, {mib:.1f} MiB of "
            "tensors)" + (f"; zero stand-ins: {', '.join(result.standins)}" if result.standins else "")
        )
    return EXIT_OK
