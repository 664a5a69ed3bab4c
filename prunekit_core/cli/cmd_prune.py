"""``prunekit prune``: plan and apply pruning to a parameter budget, evaluate, save.

The options only: the checks, the policy and every step are :func:`prunekit_core.prune`'s
(:mod:`prunekit_core.study.pipeline`), which reports through the command's :class:`~.ui.UIReporter`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..ir.defaults import (
    BEST_EXPERT,
    BEST_SUBLAYER,
    BEST_WIDTH,
    DEFAULT_CANDIDATES,
    DEFAULT_HEAL_TEXTS,
    DEFAULT_HELDOUT_WINDOWS,
    DEFAULT_ROUND_TO,
    GRANULARITIES,
    REPAIRS,
    Candidate,
)
from .options import (
    MODEL_HELP,
    STREAMING_HELP,
    TEXT_HELP,
    HelpFormatter,
    add_calib_window_args,
    add_eval_args,
    add_force_arg,
    add_load_args,
    add_lora_args,
    epilog,
    lora_kwargs,
    positive,
)
from .ui import EXIT_OK, UI, UIReporter


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prune",
        parents=[common],
        formatter_class=HelpFormatter,
        help="plan and apply pruning to a parameter budget, evaluate, save",
        description=(
            "Remove at least --ratio of the parameters inside MODEL's blocks (embeddings and head excluded), "
            "choosing units with a metric and a planner, and save the pruned model to --out (safetensors, "
            "config, tokenizer, plan.json, prunekit.json). Plans that remove whole blocks only reload with "
            "plain transformers; any plan reloads with prunekit_core.load_pruned.\n\n"
            "Default (no --metric): a self-validating choice. Candidate plans at the budget ("
            + ", ".join(_candidate(c) for c in DEFAULT_CANDIDATES)
            + ") are made from one calibration pass, each applied to a copy with its repair, and the one "
            f"with the lowest language-model loss on {DEFAULT_HELDOUT_WINDOWS} held-out windows of the "
            "calibration text (the ones after the --windows calibration windows; never the evaluation text) is kept. ShortGPT "
            "BI is a candidate, so the default is never worse than BI on that loss. prune prints every "
            "candidate and its loss; plan.json records them (candidates, selection). --repair or "
            "--recover none|repair keeps only the candidates with that repair, --granularity block only "
            "block candidates. With --metric the planner defaults to greedy for trial "
            "metrics (nri, sleb) and rank otherwise, and the granularity to what the metric scores (block for "
            "bi/angular, sublayer for sublayer_drop), with no repair.\n\n"
            "Inputs are checked before anything is loaded; nothing is written when a command fails."
        ),
        epilog=epilog(
            "prunekit prune smollm2-135m --ratio 0.1 --calib c4 --out out/smollm2-10",
            "prunekit prune smollm2-135m --ratio 0.2 --calib c4 --granularity block --metric bi --out out/bi20",
            "prunekit prune smollm2-135m --ratio 0.1 --calib c4 --plan-only --out plan.json",
            "prunekit prune ./big-llama --ratio 0.2 --calib c4 --metric bi --streaming --plan-only --out plan.json",
            "prunekit prune ./my-mixtral --ratio 0.25 --calib c4 --granularity expert --out out/experts25",
            "prunekit prune smollm2-135m --plan plan.json --eval wiki --out out/from-plan --json",
        ),
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--ratio",
        type=float,
        metavar="R",
        help="fraction of block parameters to remove, strictly between 0 and 1 (with --granularity expert: "
        "of the experts of every MoE layer; required unless --plan)",
    )
    p.add_argument(
        "--calib",
        metavar="TEXT",
        help="calibration text (required, except with a --plan that does not repair weights): " + TEXT_HELP,
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder for the pruned model (with --plan-only: the plan JSON file to write)",
    )
    p.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        help="what may be removed: whole blocks, single sublayers (attention/MLP/MoE; the default metric: "
        f"{BEST_SUBLAYER['metric']}, repair {BEST_SUBLAYER['repair']}), channel groups inside "
        "sublayers (width: KV groups with their query heads, FFN channels), mixed: blocks and sublayers, "
        "plus channel groups when the metric scores them (the default metric for width and mixed: "
        f"{BEST_WIDTH['metric']}, repair {BEST_WIDTH['repair']}), or expert: whole experts of MoE layers, "
        f"--ratio then being a fraction of each layer's experts (default metric {BEST_EXPERT['metric']})",
    )
    p.add_argument(
        "--round-to",
        type=positive("--round-to"),
        default=DEFAULT_ROUND_TO,
        metavar="N",
        help="width: kept channels of every family are a multiple of N (along its narrowest member; "
        f"default {DEFAULT_ROUND_TO})",
    )
    p.add_argument(
        "--width-allocation",
        choices=("global", "uniform"),
        default=BEST_WIDTH["width_allocation"],
        help="width: uniform removes the same number of groups of each kind from every layer (plain "
        "from_pretrained reloads it); global spreads the budget over layers by estimated loss per parameter "
        f"(per-layer widths, reload with load_pruned). Default {BEST_WIDTH['width_allocation']}",
    )
    p.add_argument(
        "--expert-allocation",
        choices=("global", "uniform"),
        default=BEST_EXPERT["expert_allocation"],
        help="expert: uniform removes ceil(R x experts) from every MoE layer (plain from_pretrained reloads "
        "it); global removes as many in total where an expert's share of its layer's importance is lowest "
        f"(per-layer counts, reload with load_pruned). Default {BEST_EXPERT['expert_allocation']}",
    )
    p.add_argument(
        "--top-k",
        choices=("error", "clamp"),
        default="error",
        help="expert: a layer left with fewer experts than its router's top_k is an error, or clamp: that "
        "layer's top_k becomes the number of experts left (default error)",
    )
    p.add_argument(
        "--scope",
        type=_scope,
        default=(),
        metavar="TOWERS",
        help="towers the plan may touch: all (default), or tower names, comma-separated (a vision-language "
        "model has vision and text; see prunekit inspect). --ratio is then a fraction of those towers' "
        "block parameters; the budget is reported per tower",
    )
    p.add_argument(
        "--metric",
        metavar="M",
        help="importance metric (default: none; the candidates above are compared on held-out windows)",
    )
    p.add_argument(
        "--planner",
        choices=("rank", "greedy"),
        help="rank: score once, drop the least important; greedy: re-measure after each removal (trial metrics)",
    )
    p.add_argument(
        "--repair",
        choices=REPAIRS,
        help="lsq: fold what removed branches contributed into surviving output projections that add linearly "
        "into the stream (none where a post-norm follows), fitted by least squares on the calibration text and "
        "kept only where it lowers the loss on held-out calibration windows; prints what each run got; refit: "
        "also refit the next surviving writers after each gap so the stream after each matches the unpruned "
        "model's (refit_cosine: per-token relative error) (default: each candidate of the default method with "
        "and without repair; none when --metric is given)",
    )
    p.add_argument(
        "--recover",
        choices=("none", "repair", "lora"),
        help="recovery after surgery: none; repair = the least-squares fold of --repair lsq (no added "
        "parameters); lora = the plan's repair, then LoRA fine-tuning (peft) on --lora-text, merged into the "
        "weights (a plain transformers model; recorded in plan.json). Default: as --repair",
    )
    add_lora_args(p, DEFAULT_HEAL_TEXTS)
    add_calib_window_args(p)
    p.add_argument("--plan-only", action="store_true", help="write only the plan JSON to --out (a file path)")
    p.add_argument(
        "--streaming",
        action="store_true",
        help=STREAMING_HELP
        + "; plans with a named --metric and no repair: the rank planner at granularity block, sublayer, "
        "mixed (block/sublayer metrics), width (channel metrics; uniform or global allocation; not the "
        "channels inside fused experts) or expert, or the greedy planner at block or sublayer granularity "
        "(nri, sleb: each round of trials forks from the committed removals, a pass over the blocks per 8 "
        "trials). With --plan-only the model is never loaded whole; otherwise it is loaded after planning for "
        "the surgery",
    )
    p.add_argument(
        "--plan",
        metavar="PLAN.json",
        help="apply this plan instead of planning (checked against the model's fingerprint)",
    )
    add_eval_args(p, "also report perplexity before and after on this text: " + TEXT_HELP)
    add_force_arg(p)
    add_load_args(p)
    p.set_defaults(func=cmd_prune)


def _candidate(c: Candidate) -> str:
    gran = "" if c.granularity == "block" else f" {c.granularity}"
    return f"{c.metric}{gran}" + ("" if c.repair == "none" else f" + {c.repair}")


def _scope(value: str) -> tuple[str, ...]:
    """--scope: ``all`` or tower names, comma-separated."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names:
        raise argparse.ArgumentTypeError("--scope needs 'all' or tower names, e.g. vision or text,vision")
    return () if "all" in names else names


def cmd_prune(args: argparse.Namespace, ui: UI) -> int:
    """Parse nothing more, prune with :func:`prunekit_core.prune` (the checks and the policy live there),
    print as it goes, and with ``--json`` print its report."""
    from ..study.pipeline import prune

    res = prune(
        args.model,
        ratio=args.ratio,
        calib=args.calib,
        plan=args.plan,
        metric=args.metric,
        planner=args.planner,
        granularity=args.granularity,
        repair=args.repair,
        recover=args.recover,
        seq_len=args.seq_len,
        windows=args.windows,
        eval=args.eval,
        eval_seq_len=args.eval_seq_len,
        eval_tokens=args.eval_tokens,
        scope=args.scope,
        round_to=args.round_to,
        width_allocation=args.width_allocation,
        expert_allocation=args.expert_allocation,
        top_k=args.top_k,
        streaming=args.streaming,
        **lora_kwargs(args),
        seed=args.seed,
        out=args.out,
        plan_only=args.plan_only,
        overwrite=args.force,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        reporter=UIReporter(ui),
    )
    if ui.json_mode:
        ui.emit_json(res.report)
    return EXIT_OK
