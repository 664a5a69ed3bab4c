"""Depth-pruning benchmark on SmolLM2-135M: published metrics vs prunekit's best planner, side by side.

Protocol (the same for every method, measured in one run): calibrate on the c4 text (32 x 256 tokens),
evaluate perplexity on the wiki text (16 x 1024 tokens, non-overlapping windows from the start), fp32, no
fine-tuning. Budgets are fractions of the decoder blocks' parameters (embeddings and head excluded); every
plan removes at least that much. The last column divides each perplexity by ShortGPT BI's at the same
budget: the goal for prunekit's best planner is at most 0.85.

    python bench/depth_pruning.py                      # full protocol, about 20-30 minutes on 2 cores
    python bench/depth_pruning.py --eval-windows 4     # quicker, noisier
    python bench/depth_pruning.py --methods bi,best --ratios 0.1
    python bench/depth_pruning.py --model smollm2-135m,llama,gemma2,gemma3,olmo2,granite --methods bi,default

``--model`` (repeatable, or comma-separated) takes model specs (Hugging Face folders, GGUF files, aliases
such as smollm2-135m) and tiny random config names (prunekit_core.testing.tiny: llama, gemma2, gemma3,
olmo2, granite, ...). For every model the summary prints the default method's (no metric named) ratio to
ShortGPT BI: on the held-out calibration loss it chose by (the 8 windows of the calibration text after the
calibration windows) and, for real models, on the evaluation perplexity. Tiny models run on random
token windows and have no evaluation text.

Writes the Markdown table to stdout and to ``--out`` (default bench/results/depth_pruning.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.ir.defaults import DEFAULT_HELDOUT_WINDOWS  # noqa: E402
from prunekit_core.planning.planner import BEST  # noqa: E402
from prunekit_core.testing.tiny import TINY_MODELS, VISION_LANGUAGE, tiny_windows  # noqa: E402

METHODS: dict[str, tuple[str, dict]] = {
    "bi": (
        "ShortGPT Block Influence",
        {"metric": "bi", "granularity": "block", "planner": "rank", "repair": "none"},
    ),
    "angular": (
        "Angular distance (span)",
        {"metric": "angular", "granularity": "block", "planner": "rank", "repair": "none"},
    ),
    "whatmatters": (
        '"What Matters" joint sublayer drop',
        {"metric": "sublayer_drop", "granularity": "sublayer", "planner": "rank", "repair": "none"},
    ),
    "nri": (
        "NRI (one removal trial per sublayer)",
        {"metric": "nri", "granularity": "sublayer", "planner": "rank", "repair": "none"},
    ),
    "bi_lsq": (
        "repaired BI (bi_lsq) + LSQ repair",
        {"metric": "bi_lsq", "granularity": "block", "planner": "rank", "repair": "lsq"},
    ),
    "angular+lsq": (
        "Angular distance span + LSQ repair",
        {"metric": "angular", "granularity": "block", "planner": "rank", "repair": "lsq"},
    ),
    "bi+lsq": (
        "ShortGPT BI + LSQ repair",
        {"metric": "bi", "granularity": "block", "planner": "rank", "repair": "lsq"},
    ),
    # the stream refit (prunekit_core/surgery/refit.py): the writers around each gap matched to the unpruned stream
    "angular+refit": (
        "Angular distance span + stream refit",
        {"metric": "angular", "granularity": "block", "planner": "rank", "repair": "refit"},
    ),
    "angular+refit_cosine": (
        "Angular distance span + stream refit (cosine)",
        {"metric": "angular", "granularity": "block", "planner": "rank", "repair": "refit_cosine"},
    ),
    "bi+refit": (
        "ShortGPT BI + stream refit",
        {"metric": "bi", "granularity": "block", "planner": "rank", "repair": "refit"},
    ),
    "best": (
        "prunekit best: " + ", ".join(f"{k} {v}" for k, v in BEST.items()),
        dict(BEST),
    ),
    # slow (hundreds of trials on 2 cores); run explicitly with --methods
    "greedy": (
        "NRI greedy, re-scored after each removal (mixed)",
        {"metric": "nri", "granularity": "mixed", "planner": "greedy", "repair": "none"},
    ),
    "sleb": (
        "SLEB greedy blocks",
        {"metric": "sleb", "granularity": "block", "planner": "greedy", "repair": "none"},
    ),
}
# the self-validating default: no metric named (planning.select)
METHODS["default"] = ("prunekit default: candidates compared on held-out calibration windows", {})
DEFAULT_METHODS = "bi,angular,whatmatters,nri,bi_lsq,best,default"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        action="append",
        help="repeatable or comma-separated: model specs and tiny config names (default smollm2-135m)",
    )
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--eval", dest="eval_text", default="wiki")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--ratios", default="0.1,0.2")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {list(METHODS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "depth_pruning.md"))
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

    models = [m.strip() for arg in (args.model or ["smollm2-135m"]) for m in arg.split(",") if m.strip()]
    t0 = time.perf_counter()
    summary, tables = [], []
    for name in models:
        if name in TINY_MODELS:
            summary += run_tiny(name, args, ratios)
            continue
        rows, table = run_model(name, args, ratios, methods, t0)
        tables.append(table)
        summary += default_vs_bi(name, rows)
    text = "\n".join(tables) + ("\n" + render_summary(summary, args) if summary else "")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def run_tiny(name: str, args: argparse.Namespace, ratios: list[float]) -> list[dict]:
    """The default method and BI on a tiny random model: held-out calibration loss only (no eval text)."""
    n, seq = args.calib_windows, min(args.calib_seq_len, 128)  # the tiny configs hold 128 positions
    ids = tiny_windows(n + DEFAULT_HELDOUT_WINDOWS, seq)
    scope = ["text"] if name in VISION_LANGUAGE else []
    out = []
    for ratio in ratios:
        try:
            res = pk.prune(TINY_MODELS[name](), ratio=ratio, calib=ids[:n], heldout=ids[n:], scope=scope)
        except pk.PrunekitError as exc:  # a family prunekit cannot prune yet: say so, go on
            out.append({"model": name, "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        out.append({"model": name, "ratio": ratio, **choice(res.plan)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def choice(plan: pk.PrunePlan) -> dict:
    """The default's pick and its held-out loss next to BI's (both from the plan's candidate table)."""
    from prunekit_core.planning.select import label

    chosen = next(c for c in plan.candidates if c.chosen)
    bi = next(c for c in plan.candidates if label(c) == "bi")
    return {
        "chosen": label(chosen),
        "removed": [u.replace("text.blocks.", "") for u in chosen.remove],
        "heldout_default": chosen.heldout_loss,
        "heldout_bi": bi.heldout_loss,
        "heldout_ratio": chosen.heldout_loss / bi.heldout_loss
        if chosen.heldout_loss and bi.heldout_loss
        else None,
    }


def default_vs_bi(name: str, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["method"] != "default":
            continue
        bi = next((b for b in rows if b["method"] == "bi" and b["ratio"] == r["ratio"]), None)
        out.append(
            {
                "model": name,
                "ratio": r["ratio"],
                **r["choice"],
                "ppl_default": r["perplexity"],
                "ppl_bi": bi["perplexity"] if bi else None,
                "ppl_ratio": r["perplexity"] / bi["perplexity"] if bi else None,
            }
        )
    return out


def render_summary(summary: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# The default method vs ShortGPT BI, per model",
        "",
        f"Held-out loss: mean next-token loss on the {DEFAULT_HELDOUT_WINDOWS} windows of `{args.calib}` after the "
        f"{args.calib_windows} calibration windows (tiny models: random token windows), after surgery and "
        "repair; eval perplexity: the protocol above (real models only).",
        "",
        "| model | budget | default chose | removed | held-out loss (default / BI) | ratio | eval ppl (default / BI) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['ratio']:.0%} | {r['error']} | | | | | |")
            continue
        ppl = f"{r['ppl_default']:.2f} / {r['ppl_bi']:.2f}" if r.get("ppl_bi") else "-"
        pr = f"{r['ppl_ratio']:.3f}x" if r.get("ppl_ratio") else "-"
        lines.append(
            f"| {r['model']} | {r['ratio']:.0%} | {r['chosen']} | {', '.join(r['removed'])} | "
            f"{r['heldout_default']:.4f} / {r['heldout_bi']:.4f} | {r['heldout_ratio']:.4f}x | {ppl} | {pr} |"
        )
    return "\n".join(lines) + "\n"


def run_model(
    name: str, args: argparse.Namespace, ratios: list[float], methods: list[str], t0: float
) -> tuple[list[dict], str]:
    """Every method on one real model (the protocol above); returns the rows and their table."""
    args = argparse.Namespace(**{**vars(args), "model": name})
    model, tok, _ = pk.load_model(name)
    every = pk.load_windows(
        tok, args.calib, seq_len=args.calib_seq_len, num_windows=args.calib_windows + DEFAULT_HELDOUT_WINDOWS
    ).ids
    calib, heldout = every[: args.calib_windows], every[args.calib_windows :]
    evalw = pk.load_windows(tok, args.eval_text, seq_len=args.eval_seq_len, num_windows=args.eval_windows).ids
    cal = pk.calibrate(model, calib)
    base = pk.perplexity(model, evalw)
    print(
        f"baseline perplexity {base.perplexity:.2f} on {base.tokens} {args.eval_text} tokens "
        f"({base.windows} x {base.seq_len}); calibration {cal.tokens} {args.calib} tokens; "
        f"block parameters {pk.inspect(model).block_params()} (embeddings and head excluded)",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    for ratio in ratios:
        for key in methods:
            label, kwargs = METHODS[key]
            # the one pipeline on a copy, with the calibration pass every method shares
            res = pk.prune(
                copy.deepcopy(model), ratio=ratio, calib=calib, calibration=cal, heldout=heldout, **kwargs
            )
            plan, plan_s, apply_s = res.plan, res.timings["plan"], res.timings["apply"]
            pruned = res.model
            ppl = pk.perplexity(pruned, evalw).perplexity
            row = {
                "ratio": ratio,
                "method": key,
                "label": label,
                "removed": plan.remove,
                "achieved": plan.achieved_ratio,
                "perplexity": ppl,
                "plan_s": plan_s,
                "apply_s": apply_s,
            }
            if plan.candidates:
                row["choice"] = choice(plan)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del pruned, res
    return rows, render(rows, base.perplexity, args, time.perf_counter() - t0)


def render(rows: list[dict], base: float, args: argparse.Namespace, total_s: float) -> str:
    bi = {r["ratio"]: r["perplexity"] for r in rows if r["method"] == "bi"}
    lines = [
        f"# Depth pruning on {args.model}",
        "",
        f"Calibration: {args.calib_windows} x {args.calib_seq_len} tokens of `{args.calib}`; evaluation: "
        f"{args.eval_windows} x {args.eval_seq_len} tokens of `{args.eval_text}`; fp32; no healing. "
        f"Baseline perplexity **{base:.2f}**. Budget = fraction of block parameters (embeddings and head "
        f"excluded). torch {torch.__version__}, {torch.get_num_threads()} threads; total {total_s / 60:.1f} min.",
        "",
        "| budget | method | removed | achieved | perplexity | vs ShortGPT BI | plan s | apply s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{r['perplexity'] / bi[r['ratio']]:.3f}x" if r["ratio"] in bi else "-"
        removed = ", ".join(u.replace("text.blocks.", "") for u in r["removed"])
        lines.append(
            f"| {r['ratio']:.0%} | {r['label']} | {removed} | {r['achieved']:.1%} | {r['perplexity']:.2f} | "
            f"{rel} | {r['plan_s']:.1f} | {r['apply_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
