"""``prunekit recover``: heal a pruned model with LoRA, or redo its plan with the least-squares repair."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..ir.defaults import DEFAULT_HEAL_TEXTS
from ..ir.errors import PlanError
from .inputs import check_heal_texts, check_model, check_out, check_text, load_model, text_windows
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
)
from .steps import heal_lora
from .ui import EXIT_OK, UI, bars, ppl_dict


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
    from ..io.checkpoint import PLAN_FILE, RECORD_FILE, load_plan, save_pruned
    from ..study.evaluate import perplexity
    from ..surgery.apply import apply_plan

    # cheap checks first: nothing is loaded or written before all of them pass
    out = Path(args.out).expanduser()
    check_out(out, plan_only=False, force=args.force)
    if args.eval is not None:
        check_text(args.eval)
    if args.calib is not None:
        check_text(args.calib)
    plan = None
    if args.method == "lora":
        if args.base is not None:
            raise PlanError("--base is for --method repair (it re-applies the plan to the unpruned model)")
        heal_texts = check_heal_texts(args)
        check_model(args.model)
    else:
        plan_file = Path(args.model).expanduser() / PLAN_FILE
        if not plan_file.is_file():
            raise PlanError(
                f"--method repair needs a prunekit output folder holding {PLAN_FILE}; {args.model} has none"
            )
        from ..io.checkpoint import verify_checkpoint

        if (plan_file.parent / RECORD_FILE).is_file():
            verify_checkpoint(plan_file.parent)  # the plan must be the one saved with these weights
        plan = load_plan(plan_file)
        if plan.recovery:
            raise PlanError(
                f"{args.model} was already healed ({plan.recovery.get('method')}); the repair comes before "
                "LoRA: run prunekit prune --recover lora on the unpruned model instead"
            )
        if args.base is None or args.calib is None:
            raise PlanError(
                "--method repair refits from the unpruned model: pass --base MODEL (the model the plan was "
                "made for) and --calib TEXT (the calibration text)"
            )
        check_model(args.base)

    result: dict[str, Any] = {"model": args.model, "method": args.method, "out": str(out.absolute())}
    if args.method == "lora":
        model, tok, src = load_model(ui, args.model, args)
        skip = {args.calib: args.windows * args.seq_len} if args.calib is not None else {}
        model, result["recovery"] = heal_lora(args, ui, model, tok, heal_texts, skip)
        from ..io.checkpoint import read_plan

        if src.path is not None and (src.path / RECORD_FILE).is_file():
            plan = read_plan(src.path)  # a prunekit checkpoint: the plan load_pruned verified
        if plan is None:
            ui.say("note: the model has no prunekit plan, so the checkpoint does not record the healing")
        else:
            plan = plan.model_copy(update={"recovery": result["recovery"]})
    else:
        assert plan is not None and args.base is not None
        model, tok, _src = load_model(ui, args.base, args)
        cal = text_windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
        with ui.step("apply plan with the least-squares repair"):
            plan = apply_plan(model, plan.model_copy(update={"repair": "lsq"}), repair_windows=cal.ids).plan
        result["recovery"] = {"method": "repair", "calibration_tokens": cal.num_tokens}
    if args.eval is not None:
        windows = text_windows(
            tok, args.eval, seq_len=args.eval_seq_len, num_windows=None, max_tokens=args.eval_tokens
        )
        with ui.step(f"perplexity on {args.eval}"):
            res = perplexity(model, windows.ids, progress=bars())
        ui.say(f"perplexity after recovery: {res.perplexity:.3f} on {res.tokens} tokens of {args.eval}")
        result["perplexity_after"] = ppl_dict(res)
    with ui.step(f"save {out}"):
        saved = save_pruned(model, out, tokenizer=tok, plan=plan, overwrite=args.force)
    ui.say(f"saved to {saved}")
    result["out"] = str(saved)
    if ui.json_mode:
        ui.emit_json(result)
    return EXIT_OK
