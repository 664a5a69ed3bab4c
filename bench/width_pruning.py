"""Width-pruning benchmark on SmolLM2-135M: prunekit vs Torch-Pruning 1.6.1, and mixed vs single granularity.

Protocol (the same for every method, measured in one run): calibrate on the c4 text (32 x 256 tokens),
evaluate perplexity on the wiki text (16 x 1024 tokens, non-overlapping windows from the start), fp32, no
fine-tuning. Budgets are fractions of the decoder blocks' parameters (embeddings and head excluded); every
method removes at least that much (the achieved column says how much). Each tool runs with each of its
criteria; the summary compares each tool's best. Wall time covers scoring, planning and surgery (and
prunekit's least-squares refit), not the evaluation.

Width methods remove attention KV groups (a KV head with its query heads) and FFN channels, never the
residual width. prunekit's planners: ``width`` (channel groups only), ``depth`` (prunekit's best depth
planner: an angular-distance span of blocks with least-squares repair) and ``mixed`` (blocks, sublayers
and channel groups under one budget, on one loss-per-parameter scale).

    python bench/width_pruning.py                          # full protocol (Torch-Pruning needs .[bench])
    python bench/width_pruning.py --eval-windows 4         # quicker, noisier
    python bench/width_pruning.py --methods pk:wanda,mixed --ratios 0.1
    python bench/width_pruning.py --timing --ratios 0.1     # planner speed: old (estimated) vs new path

``--timing`` runs prunekit's default width planner, the mixed planner and the default depth planner, the
width and mixed ones both ways in one run: the new path (the few least uniform widths measured cut in
place, mixed splits left out when their width part alone cannot win) and the old one (``estimate=True``:
a removal trial of every sublayer feeds the cost model; mixed also measures its one-scale and global
candidates). It prints each run's planning and total wall time (scoring, planning, surgery and refit; no
evaluation), the old/new ratios, whether the plans are the same, and the loss on held-out calibration
windows (``--holdout-windows`` further windows of ``--calib`` that neither run saw).

Writes the Markdown table to stdout and to ``--out`` (default bench/results/width_pruning.md).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.planning.planner import BEST  # noqa: E402

#: method key -> (tool, label, plan_pruning keyword arguments or Torch-Pruning importance)
PK_METHODS: dict[str, tuple[str, dict]] = {
    "pk:magnitude": (
        "width, magnitude + refit",
        {"metric": "magnitude", "granularity": "width", "repair": "lsq"},
    ),
    "pk:wanda": ("width, Wanda + refit", {"metric": "wanda", "granularity": "width", "repair": "lsq"}),
    "pk:taylor": ("width, Taylor + refit", {"metric": "taylor", "granularity": "width", "repair": "lsq"}),
    "pk:obs": ("width, OBS + refit", {"metric": "obs", "granularity": "width", "repair": "lsq"}),
    "pk:obs-global": (
        "width, OBS + refit, global allocation",
        {"metric": "obs", "granularity": "width", "repair": "lsq", "width_allocation": "global"},
    ),
    "pk:wanda-norefit": (
        "width, Wanda, no refit",
        {"metric": "wanda", "granularity": "width", "repair": "none"},
    ),
    "depth": ("depth only (best depth planner)", {**{k: v for k, v in BEST.items()}}),
    "mixed": (
        "mixed depth + width (OBS + refit)",
        {"metric": "obs", "granularity": "mixed", "repair": "lsq"},
    ),
}
#: Torch-Pruning runs: method key -> (importance, head_pruning_ratio: None = TP's example default (the
#: budget ratio), 0 = FFN channels only)
TP_METHODS: dict[str, tuple[str, float | None]] = {
    "tp:magnitude": ("magnitude", None),
    "tp:taylor": ("taylor", None),
    "tp:hessian": ("hessian", None),
    "tp:taylor-ffn": ("taylor", 0.0),
}
DEFAULT = ",".join(
    [m for m in PK_METHODS if m not in ("pk:obs-global", "pk:wanda-norefit")] + list(TP_METHODS)
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=DEFAULT, help=f"comma-separated (default: {DEFAULT})")
    ap.add_argument("--ratios", default="0.1,0.2")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-text", default="wiki")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "width_pruning.md"))
    ap.add_argument("--timing", action="store_true", help="planner speed, old vs new path (see above)")
    ap.add_argument("--holdout-windows", type=int, default=8, help="--timing: held-out calibration windows")
    ap.add_argument("--planners", default="depth,width,mixed", help="--timing: which planners to run")
    ap.add_argument(
        "--plan-only",
        action="store_true",
        help="--timing: time planning alone (no surgery, no held-out loss)",
    )
    ap.add_argument(
        "--trial-windows", type=int, default=8, help="--timing --plan-only: removal-trial windows"
    )
    args = ap.parse_args(argv)
    if args.timing:
        return timing(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PK_METHODS and m not in TP_METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {DEFAULT}")
    tp = None
    if any(m in TP_METHODS for m in methods):
        try:
            import tp_baseline as tp  # noqa: PLC0415 - optional, needs torch-pruning
        except ImportError as exc:
            ap.error(f"{exc}. Install the benchmark extra: .venv/bin/pip install -e '.[bench]'")
    ratios = [float(r) for r in args.ratios.split(",")]

    t0 = time.perf_counter()
    model, tok, _ = pk.load_model(args.model)
    calib = pk.load_windows(tok, args.calib, seq_len=args.calib_seq_len, num_windows=args.calib_windows).ids
    evalw = pk.load_windows(tok, args.eval_text, seq_len=args.eval_seq_len, num_windows=args.eval_windows).ids
    base = pk.perplexity(model, evalw)
    print(
        f"baseline perplexity {base.perplexity:.2f} on {base.tokens} {args.eval_text} tokens", file=sys.stderr
    )
    rows = []
    for ratio in ratios:
        for key in methods:
            pruned = copy.deepcopy(model)
            t = time.perf_counter()
            if key in PK_METHODS:
                label, kwargs = PK_METHODS[key]
                # the one pipeline: it skips the calibration pass for planners that read only the windows
                plan = pk.prune(pruned, ratio=ratio, calib=calib, **kwargs).plan
                achieved, tool = plan.achieved_ratio, "prunekit"
                detail = _describe(plan)
                print("\n".join(plan.notes), file=sys.stderr)
            else:
                importance, head_ratio = TP_METHODS[key]
                label = f"Torch-Pruning, {importance}" + (
                    ", FFN only" if head_ratio == 0 else ", heads + FFN"
                )
                info = tp.prune_with_torch_pruning(  # type: ignore[union-attr]  # tp is imported when a TP method runs
                    pruned, calib, ratio, importance, head_pruning_ratio=head_ratio
                )
                achieved, tool = info["achieved_ratio"], "Torch-Pruning"
                detail = (
                    f"query heads {_summary(info['heads_per_layer'])}; FFN {_summary(info['ffn_per_layer'])}"
                )
            wall = time.perf_counter() - t
            ppl = pk.perplexity(pruned, evalw).perplexity
            row = {
                "ratio": ratio,
                "method": key,
                "tool": tool,
                "label": label,
                "achieved": achieved,
                "perplexity": ppl,
                "wall_s": wall,
                "detail": detail,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del pruned
    table = render(rows, base.perplexity, args, time.perf_counter() - t0)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return 0


def timing(args: argparse.Namespace) -> int:
    """Old vs new planner path, side by side in one run (see the module docstring)."""
    import prunekit_core.planning.width as width_mod

    t0 = time.perf_counter()
    model, tok, _ = pk.load_model(args.model)
    n, hold_n = args.calib_windows, args.holdout_windows
    ids = pk.load_windows(tok, args.calib, seq_len=args.calib_seq_len, num_windows=n + hold_n).ids
    calib, hold = ids[:n], ids[n:]
    load = os.getloadavg()[0]
    lines = [
        f"# Planner speed on {args.model}, old (estimated) vs new path",
        "",
        f"Calibration {n} x {args.calib_seq_len} tokens of `{args.calib}`, held-out loss on the next {hold_n} "
        f"windows; torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load {load:.1f} at start.",
        "",
        "| budget | planner | path | plan s | total s | held-out loss | plan |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    original = width_mod.plan_width
    wanted = args.planners.split(",")
    runs = [("depth", "new", BEST)] if "depth" in wanted else []
    for gran in [g for g in ("width", "mixed") if g in wanted]:
        kwargs = (
            {"granularity": gran}
            if gran == "width"
            else {"metric": "obs", "granularity": "mixed", "repair": "lsq"}
        )
        runs += [(gran, "new", kwargs), (gran, "old", kwargs)]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        seen: dict[str, dict[str, object]] = {}
        for gran, path, kwargs in runs:
            pruned = copy.deepcopy(model)
            width_mod.plan_width = functools.partial(original, estimate=path == "old")  # type: ignore[assignment]  # the planner reads it at call time
            try:
                t = time.perf_counter()
                if args.plan_only:
                    from prunekit_core.scoring.calibration import Calibration

                    plan = pk.plan_pruning(
                        pruned,
                        Calibration(windows=calib),
                        ratio=ratio,
                        trial_windows=args.trial_windows,
                        **kwargs,
                    )
                    plan_s = time.perf_counter() - t
                else:
                    res = pk.prune(pruned, ratio=ratio, calib=calib, **kwargs)
                    plan, plan_s = res.plan, res.timings.get("plan", 0.0)
                wall = time.perf_counter() - t
            finally:
                width_mod.plan_width = original  # type: ignore[assignment]  # restored
            loss_text = "-"
            if not args.plan_only:
                with torch.inference_mode():
                    loss_text = f"{float(pruned(input_ids=hold, labels=hold, use_cache=False).loss):.4f}"
            seen[f"{gran}:{path}"] = {"plan": (plan.remove, plan.remove_groups), "s": plan_s, "total": wall}
            print("\n".join(plan.notes), file=sys.stderr, flush=True)
            line = f"| {ratio:.0%} | {gran} | {path} | {plan_s:.1f} | {wall:.1f} | {loss_text} | {_describe(plan)} |"
            lines.append(line)
            print(line, flush=True)
            del pruned
        lines += ["", f"At {ratio:.0%}:"]
        for gran in [g for g in ("width", "mixed") if f"{g}:old" in seen]:
            old, new = seen[f"{gran}:old"], seen[f"{gran}:new"]
            lines.append(
                f"- {gran}: old/new planning {old['s'] / max(new['s'], 1e-9):.2f}x, total "  # type: ignore[operator]  # floats
                f"{old['total'] / max(new['total'], 1e-9):.2f}x; plans "  # type: ignore[operator]  # floats
                + ("the same" if old["plan"] == new["plan"] else "differ")
            )
        if all(k in seen for k in ("depth:new", "width:new", "mixed:new")):
            d, w, m = (seen[k]["total"] for k in ("depth:new", "width:new", "mixed:new"))
            lines.append(f"- new mixed / (depth + width): {m / (d + w):.2f}x (goal: at most 2x)")  # type: ignore[operator]  # floats
        print("\n".join(lines[-3:]), flush=True)
    lines.append(
        f"\nTotal {(time.perf_counter() - t0) / 60:.1f} min; 1-min load at the end {os.getloadavg()[0]:.1f}."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    out = (
        Path(args.out).with_name("planning_speed.md")
        if args.out.endswith("width_pruning.md")
        else Path(args.out)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def _summary(values: list[int]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi} per layer"


def _describe(plan: pk.PrunePlan) -> str:
    parts = []
    if plan.remove:
        parts.append("removes " + ", ".join(u.replace("text.blocks.", "") for u in plan.remove))
    kv = [len(g) for f, g in plan.remove_groups.items() if f.endswith("kv_groups")]
    ffn = [len(g) for f, g in plan.remove_groups.items() if f.endswith("channels")]
    if kv:
        parts.append(f"{sum(kv)} KV groups from {len(kv)} layers")
    if ffn:
        parts.append(f"FFN channels from {len(ffn)} layers ({_summary(ffn)})")
    return "; ".join(parts) or "-"


def render(rows: list[dict], base: float, args: argparse.Namespace, total_s: float) -> str:
    lines = [
        f"# Width pruning on {args.model}",
        "",
        f"Calibration: {args.calib_windows} x {args.calib_seq_len} tokens of `{args.calib}`; evaluation: "
        f"{args.eval_windows} x {args.eval_seq_len} tokens of `{args.eval_text}`; fp32; no healing. "
        f"Baseline perplexity **{base:.2f}**. Budget = fraction of block parameters (embeddings and head "
        f"excluded). torch {torch.__version__}, {torch.get_num_threads()} threads; total {total_s / 60:.1f} min.",
        "",
        "| budget | tool | method | achieved | perplexity | wall s | what goes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ratio']:.0%} | {r['tool']} | {r['label']} | {r['achieved']:.1%} | {r['perplexity']:.2f} | "
            f"{r['wall_s']:.1f} | {r['detail']} |"
        )
    lines += ["", "Summary (each tool's best criterion; mixed vs single-granularity planners):", ""]
    for ratio in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == ratio]
        best = {}
        for group, pred in (
            ("prunekit width", lambda r: r["method"].startswith("pk:")),
            ("Torch-Pruning", lambda r: r["method"].startswith("tp:")),
            ("prunekit depth", lambda r: r["method"] == "depth"),
            ("prunekit mixed", lambda r: r["method"].startswith("mixed")),
        ):
            cands = [r for r in at if pred(r)]
            if cands:
                best[group] = min(cands, key=lambda r: r["perplexity"])
        parts = [f"{g} {r['perplexity']:.2f} ({r['label']})" for g, r in best.items()]
        lines.append(f"- {ratio:.0%}: " + "; ".join(parts))
        if "prunekit width" in best and "Torch-Pruning" in best:
            q = best["prunekit width"]["perplexity"] / best["Torch-Pruning"]["perplexity"]
            lines.append(f"  - prunekit width / Torch-Pruning perplexity: {q:.3f}x")
        if "prunekit mixed" in best:
            others = [best[g]["perplexity"] for g in ("prunekit width", "prunekit depth") if g in best]
            if others:
                lines.append(
                    f"  - mixed / best single granularity: {best['prunekit mixed']['perplexity'] / min(others):.3f}x"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
