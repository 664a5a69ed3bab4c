"""``prunekit recover``: heal a pruned model with LoRA, or redo its plan with the least-squares repair.

The options only: the checks, the policy and every step are :func:`prunekit_core.recover`'s
(:mod:`prunekit_core.study.pipeline`), which reports through the command's :class:`~.ui.UIReporter`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..ir.defaults import DEFAULT_HEAL_TEXTS
from .options import (
    MODEL_HELP,
    TEXT_HELP,
    HelpFormatter,
    add_calib_window_args,
    add_eval_args,
    add_force_arg,
    add_load_args,
    add_lora_args,
    epilog,
    lora_kwargs,
)
from .ui import EXIT_OK, UI, UIReporter


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "recover",
        parents=[common],
        formatter_class=HelpFormatter,
        help="heal a pruned model: LoRA fine-tuning merged into the weights, or the least-squares repair",
        description=(
            "Recover quality after pruning. --method lora fine-tunes LoRA adapters (peft) on every linear layer "
            "inside MODEL's blocks on --lora-text (never the --eval text) and merges them into the weights: the "
            "result is a plain transformers model, and its plan.json records the healing. --method repair "
            "re-applies MODEL's plan to the unpruned --base model with the least-squares repair fitted on "
            "--calib (it must come before any LoRA healing).\n\n"
            "Inputs are checked before anything is loaded; nothing is written when a command fails."
        ),
        epilog=epilog(
            "prunekit recover out/smollm2-20 --out out/smollm2-20-healed --calib c4 --eval wiki",
            "prunekit recover out/smollm2-20 --method repair --base smollm2-135m --calib c4 --out out/rep20",
        ),
    )
    p.add_argument(
        "model", metavar="MODEL", help="the pruned model: a prunekit output folder (or " + MODEL_HELP + ")"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the recovered model")
    p.add_argument(
        "--method", choices=("lora", "repair"), default="lora", help="recovery method (default lora)"
    )
    p.add_argument("--base", metavar="MODEL", help="repair: the unpruned model the plan was made for")
    p.add_argument(
        "--calib",
        metavar="TEXT",
        help="the calibration text: repair fits on it; lora skips its calibration windows (--windows x --seq-len "
        "tokens) when it is also a healing text",
    )
    add_calib_window_args(p)
    add_lora_args(p, DEFAULT_HEAL_TEXTS)
    add_eval_args(p, "report perplexity after recovery on this text: " + TEXT_HELP)
    add_force_arg(p)
    add_load_args(p)
    p.set_defaults(func=cmd_recover)


def cmd_recover(args: argparse.Namespace, ui: UI) -> int:
    """Parse nothing more, recover with :func:`prunekit_core.study.commands.recover` (the checks and the
    policy live there), print as it goes, and with ``--json`` print its report."""
    from ..study.commands import recover

    res = recover(
        args.model,
        method=args.method,
        base=args.base,
        calib=args.calib,
        seq_len=args.seq_len,
        windows=args.windows,
        eval=args.eval,
        eval_seq_len=args.eval_seq_len,
        eval_tokens=args.eval_tokens,
        **lora_kwargs(args),
        seed=args.seed,
        out=args.out,
        overwrite=args.force,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        reporter=UIReporter(ui),
    )
    if ui.json_mode:
        ui.emit_json(res.report)
    return EXIT_OK
