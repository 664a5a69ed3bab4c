"""The option groups that several commands share, declared once, and the argparse pieces every parser uses.

A command module declares only its own options and calls these for the shared ones (the load policy, the
calibration windows, the evaluation text, LoRA healing, ``--force``); where a command needs another default
or wording (``demo``'s ``--calib-*`` and ``--eval-windows``), it passes it as a parameter.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..ir.defaults import LORA_PRECISIONS, MODEL_ALIASES, TEXT_ALIASES

_TEXT_HELP = "an alias ({aliases}) or a path to a UTF-8 text file"
_MODEL_HELP = (
    "a model alias ({aliases}), a Hugging Face folder (config.json), a .gguf file, a folder written by "
    "`prunekit prune`, or a hub id org/name (needs internet)"
)
#: what a TEXT argument may be (appended to the help of --calib, --eval, --text)
TEXT_HELP = _TEXT_HELP.format(aliases=", ".join(TEXT_ALIASES))
#: what a MODEL argument may be
MODEL_HELP = _MODEL_HELP.format(aliases=", ".join(MODEL_ALIASES))

STREAMING_HELP = (
    "calibrate one block at a time, read from MODEL's safetensors shards: memory stays at one block plus "
    "the calibration activations, so models larger than memory can be scored: every metric that needs no "
    "gradients (bi, angular, sublayer_drop from the stream; nri and sleb by removal trials in passes "
    "over the blocks; magnitude, wanda, obs, bi_lsq and plugin metrics such as the expert metrics from each "
    "block's weights and statistics while it is loaded); not taylor; a vision-language model streams tower by "
    "tower with its calibration images (removal trials score the language model's units)"
)


# --- formatting ------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Wraps description paragraphs (blank-line separated) and keeps the examples epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return text
        return "\n\n".join(
            super(HelpFormatter, self)._fill_text(p, width, indent) for p in text.split("\n\n")
        )


def epilog(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def common_parser() -> argparse.ArgumentParser:
    """The parent of every subcommand's parser: --json and -v."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout and nothing else (progress: stderr)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="same as prunekit -v"
    )
    return common


# --- value types -----------------------------------------------------------------------------------------


def positive(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {value!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {n}")
        return n

    return parse


def seq_len(value: str) -> int:
    n = positive("--seq-len")(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"--seq-len must be at least 2, got {n}")
    return n


# --- shared option groups --------------------------------------------------------------------------------


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The load policy flags: both off by default (safetensors only, no code from the checkpoint)."""
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a folder whose weights are pickled (pytorch_model.bin, *.pt, *.pth), read with "
        "torch.load(weights_only=True); without it only safetensors are loaded",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model or tokenizer code shipped with the checkpoint (config.json auto_map); only for "
        "sources you trust",
    )


def add_calib_window_args(
    p: argparse.ArgumentParser, *, prefix: str = "", windows_help: str = "calibration windows"
) -> None:
    """The calibration windows: --seq-len and --windows (score, prune, recover), or with ``prefix="calib-"``
    --calib-seq-len and --calib-windows (demo, which names its evaluation windows too)."""
    p.add_argument(
        f"--{prefix}seq-len",
        type=seq_len,
        default=256,
        metavar="N",
        help="tokens per calibration window (default 256)",
    )
    p.add_argument(
        f"--{prefix}windows",
        type=positive(f"--{prefix}windows"),
        default=32,
        metavar="N",
        help=f"{windows_help} (default 32)",
    )


def add_eval_args(
    p: argparse.ArgumentParser, eval_help: str | None = None, *, fixed_text: str = "", windows: int = 8
) -> None:
    """The evaluation text and how much of it: --eval, --eval-tokens and --eval-seq-len (prune, recover).

    With ``fixed_text`` the command always evaluates that text (demo: wiki): no --eval, and --eval-windows
    (default ``windows``) instead of --eval-tokens.
    """
    if not fixed_text:
        p.add_argument("--eval", metavar="TEXT", help=eval_help)
        p.add_argument(
            "--eval-tokens",
            type=positive("--eval-tokens"),
            default=8192,
            metavar="N",
            help="tokens of --eval text to evaluate, in whole windows (default 8192)",
        )
    else:
        p.add_argument(
            "--eval-windows",
            type=positive("--eval-windows"),
            default=windows,
            metavar="N",
            help=f"{fixed_text} windows to evaluate (default {windows})",
        )
    p.add_argument(
        "--eval-seq-len",
        type=seq_len,
        default=1024,
        metavar="N",
        help="tokens per evaluation window (default 1024)",
    )


def lora_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`add_lora_args` as the keyword arguments of ``prune``/``recover``."""
    return {
        "lora_texts": args.lora_text.split(","),
        "lora_steps": args.lora_steps,
        "lora_lr": args.lora_lr,
        "lora_rank": args.lora_rank,
        "lora_batch": args.lora_batch,
        "lora_seq_len": args.lora_seq_len,
        "lora_precision": args.lora_precision,
    }


def add_lora_args(p: argparse.ArgumentParser, default_texts: tuple[str, ...]) -> None:
    """LoRA healing: --lora-* and --seed (prune --recover lora, recover --method lora)."""
    p.add_argument(
        "--lora-text",
        default=",".join(default_texts),
        metavar="T1,T2",
        help="healing texts, comma-separated, never the --eval text; the calibration windows are skipped "
        f"(default {','.join(default_texts)})",
    )
    p.add_argument(
        "--lora-steps",
        type=positive("--lora-steps"),
        default=110,
        metavar="N",
        help="LoRA steps (default 110; bench/lora_speed.py times a step on this machine)",
    )
    p.add_argument(
        "--lora-lr", type=float, default=1e-3, metavar="LR", help="LoRA learning rate (default 1e-3)"
    )
    p.add_argument(
        "--lora-rank", type=positive("--lora-rank"), default=8, metavar="R", help="LoRA rank (default 8)"
    )
    p.add_argument(
        "--lora-batch",
        type=positive("--lora-batch"),
        default=4,
        metavar="N",
        help="LoRA windows per step (default 4)",
    )
    p.add_argument(
        "--lora-seq-len", type=seq_len, default=256, metavar="N", help="tokens per LoRA window (default 256)"
    )
    p.add_argument(
        "--lora-precision",
        choices=LORA_PRECISIONS,
        default="auto",
        help="LoRA training precision: auto (default) = bfloat16 autocast on a CPU with native bfloat16 "
        "matmul (avx512_bf16 or AMX; weights, adapters and optimiser stay fp32), fp32 elsewhere; fp32 trains "
        "as a CPU without bfloat16 does. The plan records which ran",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the LoRA initialisation and data order (default 0)"
    )


def add_force_arg(p: argparse.ArgumentParser) -> None:
    """--force for a command that writes a prunekit output folder (prune, recover)."""
    p.add_argument(
        "--force", action="store_true", help="replace --out if it exists (a previous prunekit output)"
    )
