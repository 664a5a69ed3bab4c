"""``prunekit eval``: perplexity, lm-eval task accuracy, parameter counts and size on disk of a model or
pruned folder.

The options and the printing only: the checks and the measurements are
:func:`prunekit_core.study.commands.evaluate_model`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import MODEL_HELP, TEXT_HELP, HelpFormatter, add_load_args, epilog, positive, seq_len
from .ui import EXIT_OK, UI, UIReporter, fmt_params


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        formatter_class=HelpFormatter,
        help="perplexity, lm-eval task accuracy, parameter counts and size on disk of a model or pruned folder",
        description=(
            "Perplexity of MODEL_OR_DIR on TEXT over non-overlapping windows of --seq-len tokens (each window "
            "is an independent sequence; its first token is context only), plus parameter counts and, for a "
            "folder, its size on disk. By default the whole text is used; cap it with --max-tokens or "
            "--windows.\n\n"
            "--tasks runs lm-evaluation-harness tasks (zero-shot accuracy) on the same model in memory, so "
            "every prunekit output folder works, including those only load_pruned can reload (removed "
            "sublayers, per-layer widths). It needs the optional extra: pip install -e '.[lmeval]'. Standard "
            "tasks (arc_easy, hellaswag, piqa, winogrande, ...) download their data sets from the Hugging Face "
            "hub; offline, only tasks whose YAML reads local files run (--include-path; docs/lm-eval.md). "
            "Give --text, --tasks or both; --save FILE writes the JSON record (perplexity and task results "
            "side by side) atomically."
        ),
        epilog=epilog(
            "prunekit eval smollm2-135m --text wiki --max-tokens 8192",
            "prunekit eval out/smollm2-10 --text wiki --seq-len 1024 --windows 8 --json",
            "prunekit eval out/smollm2-10 --text wiki --windows 8 --tasks arc_easy,piqa --limit 200 "
            "--save out/smollm2-10-eval.json",
            "prunekit eval out/smollm2-10 --tasks my_task --include-path my_tasks/",
        ),
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help=MODEL_HELP)
    p.add_argument(
        "--text", default=None, metavar="TEXT", help="evaluation text for perplexity: " + TEXT_HELP
    )
    p.add_argument(
        "--seq-len", type=seq_len, default=1024, metavar="N", help="tokens per window (default 1024)"
    )
    p.add_argument(
        "--max-tokens",
        type=positive("--max-tokens"),
        default=None,
        metavar="N",
        help="evaluate at most N tokens, in whole windows (default: the whole text)",
    )
    p.add_argument(
        "--windows", type=positive("--windows"), default=None, metavar="N", help="evaluate at most N windows"
    )
    p.add_argument(
        "--batch-size",
        type=positive("--batch-size"),
        default=4,
        metavar="N",
        help="windows per forward pass (default 4; speed only)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="T1,T2",
        help="lm-evaluation-harness tasks to run, comma-separated (needs pip install -e '.[lmeval]')",
    )
    p.add_argument(
        "--limit",
        type=positive("--limit"),
        default=None,
        metavar="N",
        help="at most N documents per task (default: all; accuracies then describe a subset)",
    )
    p.add_argument(
        "--include-path",
        default=None,
        metavar="DIR",
        help="a folder of extra lm-eval task YAMLs (tasks on local data files)",
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="FILE",
        help="write the JSON record (perplexity, task results, parameters) to FILE, atomically",
    )
    add_load_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace, ui: UI) -> int:
    """Parse nothing more, measure with :func:`prunekit_core.study.commands.evaluate_model` and print."""
    from ..study.commands import evaluate_model

    ev = evaluate_model(
        args.model,
        text=args.text,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        windows=args.windows,
        batch_size=args.batch_size,
        tasks=[t for t in (args.tasks or "").split(",") if t.strip()],
        limit=args.limit,
        include_path=args.include_path,
        save=args.save,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        reporter=UIReporter(ui),
    )
    if ui.json_mode:
        ui.emit_json(ev.report)
        return EXIT_OK
    res, counts = ev.perplexity, ev.params
    if res is not None:
        ui.say(f"perplexity: {res.perplexity:.4f} (nll {res.nll:.4f})")
        ui.say(
            f"text: {args.text}; seq_len {res.seq_len}; {res.windows} windows; {res.tokens} predicted tokens "
            "(the first token of each window is context only)"
        )
    for task, metrics in ev.report.get("tasks", {}).get("results", {}).items():
        shown = ", ".join(
            f"{k.split(',')[0]} {v:.4f}"
            for k, v in metrics.items()
            if isinstance(v, float) and "stderr" not in k
        )
        ui.say(f"{task}: {shown}")
    ui.say(
        f"params: total {fmt_params(counts.total)}, embeddings {fmt_params(counts.embeddings)}, "
        f"head {fmt_params(counts.head)}{' (tied)' if counts.tied else ''}, body {fmt_params(counts.body)}"
    )
    if ev.size_on_disk is not None:
        ui.say(f"size on disk: {ev.size_on_disk / 2**20:.1f} MiB")
    if args.save:
        ui.say(f"saved: {args.save}")
    return EXIT_OK
