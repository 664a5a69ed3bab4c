"""``prunekit prune``: plan and apply pruning to a parameter budget, evaluate, save."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..defaults import (
    BEST,
    BEST_EXPERT,
    BEST_SUBLAYER,
    BEST_WIDTH,
    DEFAULT_HEAL_TEXTS,
    DEFAULT_ROUND_TO,
    GRANULARITIES,
    check_ratio,
)
from ..errors import CalibrationError, PlanError
from .inputs import (
    check_heal_texts,
    check_model,
    check_out,
    check_text,
    load_model,
    multimodal,
    sample_images,
    text_windows,
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
    positive,
)
from .steps import heal_lora, open_streaming, save_plan, stream_calibrate
from .ui import EXIT_OK, UI, bars, fmt_params, ppl_dict

if TYPE_CHECKING:
    from ..defaults import Granularity, PlannerName, RepairName


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
            f"Defaults: metric {BEST['metric']}, planner {BEST['planner']}, granularity {BEST['granularity']}, "
            f"repair {BEST.get('repair', 'none')} (prunekit's best planner). With another --metric the planner defaults to greedy for trial "
            "metrics (nri, sleb) and rank otherwise, and the granularity to what the metric scores (block for "
            "bi/angular, sublayer for sublayer_drop).\n\n"
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
    p.add_argument("--metric", metavar="M", help=f"importance metric (default {BEST['metric']})")
    p.add_argument(
        "--planner",
        choices=("rank", "greedy"),
        help="rank: score once, drop the least important; greedy: re-measure after each removal (trial metrics)",
    )
    p.add_argument(
        "--repair",
        choices=("none", "lsq"),
        help="lsq: fold what removed branches contributed into surviving output projections, fitted by least "
        f"squares on the calibration text (default {BEST.get('repair', 'none')} with the default metric, none "
        "when --metric is given)",
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


def _scope(value: str) -> tuple[str, ...]:
    """--scope: ``all`` or tower names, comma-separated."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names:
        raise argparse.ArgumentTypeError("--scope needs 'all' or tower names, e.g. vision or text,vision")
    return () if "all" in names else names


def cmd_prune(args: argparse.Namespace, ui: UI) -> int:
    from rich.table import Table

    from ..api import calibrate, inspect
    from ..checkpoint import save_pruned
    from ..evaluate import count_parameters, perplexity
    from ..plan import PrunePlan
    from ..planning import (
        budget_by_tower,
        budget_params,
        check_budget,
        plan_pruning,
        resolve_method,
        uses_width,
    )
    from ..scoring import Calibration
    from ..surgery import apply_plan
    from ..vision import feature_fidelity, image_features

    # cheap checks first: nothing is loaded, computed or written before all of them pass
    given_plan: PrunePlan | None = None
    if args.plan is not None:
        if args.plan_only:
            raise PlanError("--plan-only makes a plan; --plan applies an existing one: choose one")
        given_plan = PrunePlan.load(args.plan)
    else:
        if args.ratio is None:
            raise PlanError(
                "--ratio is required (a fraction of block parameters in (0, 1)) unless --plan is given"
            )
        check_ratio(args.ratio)
        if args.calib is None:
            raise CalibrationError("--calib TEXT is required to plan (or pass an existing plan with --plan)")
    # BEST unless a metric is named; a named metric runs as published (planning.resolve_method)
    repair_arg = args.repair
    if args.recover in ("none", "repair"):
        wanted = "none" if args.recover == "none" else "lsq"
        if repair_arg is not None and repair_arg != wanted:
            raise PlanError(
                f"--recover {args.recover} contradicts --repair {repair_arg}: pass one of them "
                "(--recover repair is --repair lsq; --recover none turns the repair off)"
            )
        repair_arg = wanted
    heal_texts = check_heal_texts(args) if args.recover == "lora" else ()
    metric_name, planner, granularity, repair = resolve_method(
        args.metric, args.planner, args.granularity, repair_arg
    )
    if args.streaming:
        _check_streaming_prune(args, metric_name, planner, granularity, repair)
    if given_plan is None:
        check_text(args.calib)
    elif given_plan.repair != "none":
        if args.calib is None:
            raise CalibrationError(
                f"the plan repairs weights (repair={given_plan.repair}) when applied: pass --calib TEXT "
                "(the calibration text it was made with)"
            )
        check_text(args.calib)
    if args.eval is not None:
        check_text(args.eval)
    out = Path(args.out).expanduser()
    check_out(out, plan_only=args.plan_only, force=args.force)
    check_model(args.model)

    streamed_plan: PrunePlan | None = None
    if args.streaming:  # plan from a streaming pass; the model is loaded afterwards only for surgery
        streamed_plan = _plan_streaming(args, ui, metric_name, planner, granularity, repair)
        if args.plan_only:
            save_plan(streamed_plan, out)
            ui.say(f"plan written to {out} (streaming: the model was never loaded whole)")
            if ui.json_mode:
                ui.emit_json(
                    {
                        "model": args.model,
                        "out": str(out.absolute()),
                        "plan": streamed_plan.model_dump(mode="json"),
                        "removed": list(streamed_plan.remove),
                        "achieved_ratio": streamed_plan.achieved_ratio,
                        "written": "plan",
                    }
                )
            return EXIT_OK
        given_plan = streamed_plan
    model, tok, _src = load_model(ui, args.model, args)
    ir = inspect(model)
    if given_plan is None and not uses_width(metric_name, granularity):
        check_budget(
            ir.restricted(args.scope), args.ratio, granularity
        )  # parameter counts: before calibration
    cal_windows = None
    if args.calib is not None and (given_plan is None or given_plan.repair != "none"):
        cal_windows = text_windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
    eval_windows = None
    if args.eval is not None:
        eval_windows = text_windows(
            tok, args.eval, seq_len=args.eval_seq_len, num_windows=None, max_tokens=args.eval_tokens
        )

    result: dict[str, Any] = {"model": args.model, "out": str(out.absolute())}
    params_before = count_parameters(model)
    ppl_before = None
    if eval_windows is not None:
        with ui.step(f"perplexity before on {args.eval}"):
            ppl_before = perplexity(model, eval_windows.ids, progress=bars())
        ui.say(
            f"perplexity before: {ppl_before.perplexity:.3f} on {ppl_before.tokens} tokens of {args.eval} "
            f"(seq_len {ppl_before.seq_len})"
        )

    if given_plan is None:
        assert cal_windows is not None
        if granularity == "expert":
            target = None
            ui.say(
                f"budget: at least {args.ratio:g} of the experts of "
                + ("every MoE layer" if args.expert_allocation == "uniform" else "all MoE layers together")
            )
        else:
            scoped = ir.restricted(args.scope)
            target = budget_params(scoped, args.ratio)
            where = f" of tower(s) {', '.join(args.scope)}" if args.scope else ""
            ui.say(
                f"budget: at least {args.ratio:g} of the {fmt_params(scoped.block_params())} block parameters"
                f"{where} (embeddings and head excluded) = {fmt_params(target)} parameters"
            )
        ui.info(
            f"calibration: {cal_windows.num_windows} windows x {cal_windows.seq_len} tokens of {args.calib}; "
            f"planner {planner}, metric {metric_name}, granularity {granularity}, repair {repair}"
        )
        ids, extra = multimodal(model, cal_windows.ids)  # a vision-language model: images in every window
        if uses_width(metric_name, granularity) or granularity == "expert":
            # width planners read the windows, not stream stats
            cal = Calibration(windows=ids, inputs=extra)
        else:
            with ui.step("calibrate"):
                cal = calibrate(model, ids, inputs=extra)
        with ui.step(f"plan ({planner}:{metric_name}, {granularity})"):
            plan = plan_pruning(
                model,
                cal,
                ratio=args.ratio,
                metric=metric_name,
                granularity=granularity,
                planner=planner,
                repair=repair,
                on_step=lambda msg: ui.info("  " + msg),
                round_to=args.round_to,
                width_allocation=args.width_allocation,
                expert_allocation=args.expert_allocation,
                top_k_policy=args.top_k,
                scope=args.scope,
                repair_optional=repair_arg is None,
            )
        if plan.repair != repair:  # a defaulted repair the plan's towers cannot take
            ui.say(next((n for n in plan.notes if "repair" in n), f"repair: {plan.repair}"))
        result["budget"] = {
            "ratio": args.ratio,
            "target_params": target,
            "block_params": ir.restricted(args.scope).block_params(),
            "excludes": "embeddings and head",
            "scope": list(args.scope) or "all",
        }
        if granularity == "expert":
            result["budget"]["unit"] = "experts per MoE layer"
    else:
        plan = given_plan
        ui.say(
            f"plan: {args.plan or 'streaming'} ({plan.method or 'no method recorded'}, {len(plan.remove)} units, "
            f"{len(plan.remove_groups)} narrowed channel-group families)"
        )

    units = ir.units()
    families = ir.all_channel_groups()
    title = f"plan: remove {len(plan.remove)} unit(s)"
    if plan.remove_groups:
        title += f", narrow {len(plan.remove_groups)} channel-group familie(s)"
    table = Table(title=title)
    for col in ("unit", "kind", "params", "score"):
        table.add_column(col, justify="right" if col in ("params", "score") else "left")
    for uid in plan.remove:
        unit = units.get(uid)
        kind = getattr(unit, "kind", "block") if unit is not None else "?"
        sc = plan.scores.get(uid)
        table.add_row(uid, kind, fmt_params(unit.params) if unit else "?", "" if sc is None else f"{sc:.4g}")
    for fid, groups in plan.remove_groups.items():
        fam = families[fid][1] if fid in families else None
        kind = f"{fam.kind} -{len(groups)}/{fam.count}" if fam else "?"
        table.add_row(fid, kind, fmt_params(len(groups) * fam.params_per_group) if fam else "?", "")
    ui.table(table)
    shape = "uniform (the config describes it)" if plan.is_uniform else "non-uniform"
    ui.say(
        f"achieved: {fmt_params(plan.removed_params)} of {fmt_params(plan.block_params)} block parameters "
        f"removed ({plan.achieved_ratio:.2%}); {shape}"
    )
    per_tower = budget_by_tower(ir, plan)
    if len(per_tower) > 1:
        for name, (gone, total) in per_tower.items():
            ui.say(
                f"  tower {name}: {fmt_params(gone)} of {fmt_params(total)} block parameters ({gone / total:.2%})"
            )
    result["by_tower"] = {n: {"removed": g, "block_params": t} for n, (g, t) in per_tower.items()}
    result["plan"] = plan.model_dump(mode="json")
    result["removed"] = list(plan.remove)
    result["achieved_ratio"] = plan.achieved_ratio
    result["uniform"] = plan.is_uniform

    if args.plan_only:
        save_plan(plan, out)
        ui.say(f"plan written to {out}")
        result["written"] = "plan"
        if ui.json_mode:
            ui.emit_json(result)
        return EXIT_OK

    images = sample_images(model)
    feats_before = image_features(model, images) if images is not None else None
    with ui.step("apply plan" + (f" (repair {plan.repair})" if plan.repair != "none" else "")):
        apply_plan(model, plan, repair_windows=cal_windows.ids if cal_windows is not None else None)
    plan = model._prunekit_plan  # as applied: says whether the config alone describes the result
    result["uniform"] = plan.is_uniform
    if args.recover == "lora":
        skip = {args.calib: cal_windows.num_tokens} if cal_windows is not None else {}
        model, result["recovery"] = heal_lora(args, ui, model, tok, heal_texts, skip)
        plan = model._prunekit_plan
    params_after = count_parameters(model)
    ui.say(f"parameters: {fmt_params(params_before.total)} -> {fmt_params(params_after.total)}")
    if feats_before is not None:
        fidelity = feature_fidelity(feats_before, image_features(model, images))
        ui.say(
            f"image-feature fidelity: {fidelity:.4f} (mean cosine of the projector's outputs before/after, "
            f"{images.shape[0]} sample images)"
        )
        result["image_feature_fidelity"] = fidelity
    result["params_before"] = params_before.total
    result["params_after"] = params_after.total
    ppl_after = None
    if eval_windows is not None:
        with ui.step(f"perplexity after on {args.eval}"):
            ppl_after = perplexity(model, eval_windows.ids, progress=bars())
        ui.say(
            f"perplexity after:  {ppl_after.perplexity:.3f} on {ppl_after.tokens} tokens of {args.eval} "
            f"(seq_len {ppl_after.seq_len})"
        )
    result["perplexity_before"] = ppl_dict(ppl_before) if ppl_before else None
    result["perplexity_after"] = ppl_dict(ppl_after) if ppl_after else None
    with ui.step(f"save {out}"):
        saved = save_pruned(model, out, tokenizer=tok, plan=plan, overwrite=args.force)
    auto = "AutoModelForCausalLM" if len(ir.towers) == 1 else type(model).__name__
    loader = f"{auto}.from_pretrained(dir)" if plan.is_uniform else "prunekit_core.load_pruned(dir)"
    ui.say(f"saved to {saved}; reload with {loader}")
    result["out"] = str(saved)
    result["written"] = "checkpoint"
    if ui.json_mode:
        ui.emit_json(result)
    return EXIT_OK


def _check_streaming_prune(
    args: argparse.Namespace, metric: str, planner: str, granularity: str, repair: str
) -> None:
    from ..metrics import ChannelMetric
    from ..plugins import get_metric
    from ..streaming import check_streaming_metric, streaming_metrics

    if args.plan is not None:
        raise PlanError("--streaming makes a plan; --plan applies an existing one: drop --streaming")
    if args.metric is None:
        raise PlanError(
            f"--streaming needs a metric it can compute: pass --metric (one of {', '.join(streaming_metrics())}; "
            f"the default method, {metric} with repair {repair}, reads the whole model)"
        )
    m = get_metric(metric)
    check_streaming_metric(m)
    if repair != "none":
        raise PlanError(f"--streaming plans without repair; got repair {repair} (pass --repair none)")
    if planner != "rank" and (planner != "greedy" or granularity not in ("block", "sublayer")):
        raise PlanError(
            f"--streaming plans with the rank planner, or with the greedy one at block or sublayer granularity; "
            f"got planner {planner}, granularity {granularity} (pass --planner rank, or --granularity block or "
            "sublayer)"
        )
    if granularity == "mixed" and isinstance(m, ChannelMetric):
        raise PlanError(
            "the mixed planner with a channel metric measures its candidate plans on pruned copies of the "
            "whole model, which --streaming does not hold: use --granularity width, a block or sublayer "
            "metric at --granularity mixed, or drop --streaming"
        )
    if args.recover == "lora":
        raise PlanError("--streaming cannot heal with LoRA (it needs the whole model): drop one of them")


def _plan_streaming(
    args: argparse.Namespace,
    ui: UI,
    metric: str,
    planner: PlannerName,
    granularity: Granularity,
    repair: RepairName,
) -> Any:
    from ..planning import budget_params, check_budget, plan_pruning, uses_width
    from ..plugins import get_metric
    from ..width_scoring import WidthCurveObserver

    sm, tok = open_streaming(ui, args.model)
    if not uses_width(metric, granularity):
        check_budget(sm.ir.restricted(args.scope), args.ratio, granularity)  # before the streaming pass
    windows = text_windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
    if granularity != "expert":
        scoped = sm.ir.restricted(args.scope)
        where = f" of tower(s) {', '.join(args.scope)}" if args.scope else ""
        ui.say(
            f"budget: at least {args.ratio:g} of the {fmt_params(scoped.block_params())} block parameters"
            f"{where} (embeddings and head excluded) = {fmt_params(budget_params(scoped, args.ratio))} "
            "parameters"
        )
    ui.info(
        f"calibration: {windows.num_windows} windows x {windows.seq_len} tokens of {args.calib}; "
        f"planner {planner}, metric {metric}, granularity {granularity}, streaming"
    )
    m = get_metric(metric)
    if uses_width(metric, granularity):  # the width cost model's curves, block by block
        curves = [WidthCurveObserver(m, repair=False)]  # --streaming plans without repair (checked above)
        cal = stream_calibrate(ui, sm, windows.ids, [], curves, images=False)  # text windows, as in memory
    else:
        cal = stream_calibrate(ui, sm, windows.ids, [m])
    loads = sm.loaded_blocks
    with ui.step(f"plan ({planner}:{metric}, {granularity})"):
        plan = plan_pruning(
            sm.model,
            cal,
            ratio=args.ratio,
            metric=metric,
            granularity=granularity,
            planner=planner,
            repair=repair,
            adapter=sm.adapter,
            round_to=args.round_to,
            width_allocation=args.width_allocation,
            expert_allocation=args.expert_allocation,
            top_k_policy=args.top_k,
            scope=args.scope,
            on_step=lambda msg: ui.info("  " + msg),
        )
    if sm.loaded_blocks > loads:
        ui.info(f"removal trials: {sm.loaded_blocks - loads} more block loads from disk")
    return plan
