"""The best model under a size budget on SmolLM2-135M: uniform quantization, pruning + uniform, compress.

For each budget (bits per parameter of the unpruned model, every parameter counted by the exact size
accountant: scales, zero points, norms and the 16-bit parts included) three columns:

1. **uniform**: the best single format for every 2-D weight (embeddings quantized with the blocks, or left
   at 16 bits) that fits;
2. **prune + uniform**: the best point of the sweep grid that fits: prunekit's best pruning method (angular
   span + least-squares repair) at the grid's ratios, times the same formats (embeddings with the blocks or
   at 16 bits), the unpruned row included;
3. **compress**: ``prunekit compress`` at the budget (one sensitivity pass shared by every budget).

Perplexity on the evaluation text (``wiki``; the protocol is 16 x 1024 tokens). Candidate cells of the
first two columns are evaluated once and reused across budgets. Writes ``docs/results/budget.md``, its
plot and a JSON of every row.

    python bench/budget.py                                         # the full protocol
    python bench/budget.py --eval-windows 4 --eval-seq-len 512 --budgets 4.5,4   # what fits a busy machine
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prunekit_core.io.loading import load_model  # noqa: E402
from prunekit_core.io.text import load_windows  # noqa: E402
from prunekit_core.quant.base import QuantScope, get_quant_format, quantize_model, size_report  # noqa: E402
from prunekit_core.study.compress import DEFAULT_FORMATS, Compressor  # noqa: E402
from prunekit_core.study.evaluate import perplexity  # noqa: E402
from prunekit_core.study.pipeline import prune  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
UNIFORM = (
    "int8,mxfp8_e4m3,mxfp6_e2m3,fp6_llm,int6_g128,int5_g128,int4_g128,int4_g64,int4_g32,mxfp4,"
    "int3_g128,int3_g64,int3_g32,int2a_g32"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="8,6,5,4.5,4,3.5", help="bits per parameter, comma-separated")
    ap.add_argument("--eval", dest="eval_text", default="wiki")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default="c4")
    ap.add_argument(
        "--calib-windows", type=int, default=32, help="pruning calibration (and compress's local errors)"
    )
    ap.add_argument(
        "--heldout-windows", type=int, default=4, help="compress's objective: c4 windows after those"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--ratios", default="0.1,0.2,0.3", help="the pruning grid (ratio 0 is the uniform column)"
    )
    ap.add_argument("--uniform-formats", default=UNIFORM)
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="compress's candidate formats")
    ap.add_argument("--reference-format", default="int4_g64")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument(
        "--candidates",
        type=int,
        default=2,
        help="formats tried per (ratio, embeddings): the largest that fit",
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="write the report from a budget.json this script wrote (e.g. of a run stopped early) and exit",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        run_args = argparse.Namespace(**data["args"])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_report(run_args, data["rows"], None, out, data.get("wall_s", 0.0), cmd=data.get("command"))
        return 0
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",")]

    model, tok, _ = load_model(args.model, dtype=torch.float32)
    ref = sum(p.numel() for p in dict(model.named_parameters()).values())
    evalw = load_windows(tok, args.eval_text, seq_len=args.eval_seq_len, num_windows=args.eval_windows).ids
    cw = load_windows(
        tok, args.calib, seq_len=args.seq_len, num_windows=args.calib_windows + args.heldout_windows
    ).ids
    calib, heldout = cw[: args.calib_windows], cw[args.calib_windows :]
    log(
        f"model {args.model}: {ref} parameters; eval {tuple(evalw.shape)} {args.eval_text}; calib {tuple(calib.shape)}"
    )
    ppl_cache: dict[str, float] = {}

    def evaluate(key: str, build: Any) -> float:
        if key not in ppl_cache:
            t0 = time.perf_counter()
            ppl_cache[key] = perplexity(build(), evalw).perplexity
            log(f"{key}: perplexity {ppl_cache[key]:.3f} ({time.perf_counter() - t0:.0f} s)")
        return ppl_cache[key]

    # candidate cells: (ratio, format, embeddings quantized) -> bits per parameter
    pruned: dict[float, Any] = {0.0: model}
    for r in [float(x) for x in args.ratios.split(",") if x]:
        t0 = time.perf_counter()
        pruned[r] = prune(copy.deepcopy(model), ratio=r, calib=calib).model
        log(f"pruned {r:.0%} with the best method ({time.perf_counter() - t0:.0f} s)")
    cells = []
    for r, m in pruned.items():
        for q in args.uniform_formats.split(","):
            for emb in (True, False):
                scope = QuantScope(blocks=True, embeddings=emb, head=emb)
                rep = size_report(m, get_quant_format(q), scope=scope, reference_params=ref)
                cells.append(
                    {"ratio": r, "format": q, "embeddings": emb, "bits_per_param": rep.bits_per_param}
                )

    def build_cell(c: dict[str, Any]) -> Any:
        def make() -> Any:
            work = copy.deepcopy(pruned[c["ratio"]])
            scope = QuantScope(blocks=True, embeddings=c["embeddings"], head=c["embeddings"])
            quantize_model(work, get_quant_format(c["format"]), scope=scope, reference_params=ref)
            return work

        return make

    def cell_key(c: dict[str, Any]) -> str:
        return f"ratio {c['ratio']:g} {c['format']} emb {'q' if c['embeddings'] else '16'}"

    def best_fitting(budget: float, ratios: list[float]) -> dict[str, Any] | None:
        # per ratio and embedding choice, the format with the most bits that fits; the best of those measured.
        # (a format with fewer bits at the same ratio is worse in every cell measured in prune_vs_quant.md)
        best = None
        for r in ratios:
            for emb in (True, False):
                fits = [
                    c
                    for c in cells
                    if c["ratio"] == r and c["embeddings"] == emb and c["bits_per_param"] <= budget
                ]
                fits.sort(key=lambda c: -c["bits_per_param"])
                for c in fits[: args.candidates]:
                    ppl = evaluate(cell_key(c), build_cell(c))
                    if best is None or ppl < best["perplexity"]:
                        best = c | {"perplexity": ppl}
        return best

    comp = Compressor(
        model,
        calib=calib[:8],
        heldout=heldout,
        formats=args.formats.split(","),
        reference=args.reference_format,
        on_step=log,
    )
    rows = []
    for b in budgets:
        budget_bits = int(math.floor(b * ref))
        uni = best_fitting(b, [0.0])
        pq = best_fitting(b, sorted(pruned))
        t0 = time.perf_counter()
        try:
            choice, search = comp.search(budget_bits, steps=args.steps)
            work, _plan, rep = comp.materialize(choice)
            c_ppl = perplexity(work, evalw).perplexity
            fmts = choice.fmt()
            counts: dict[str, int] = {}
            for f in comp.space.families:
                q = "removed" if f.block is not None and f.block in choice.removed else fmts[f.key]
                counts[q] = counts.get(q, 0) + 1
            cres = {
                "perplexity": c_ppl,
                "bits_per_param": rep.bits_per_param,
                "removed": sorted(choice.removed),
                "embeddings": fmts.get("embeddings"),
                "families": counts,
                "heldout_loss": search["heldout_loss"],
                "additive_loss": search["additive_loss"],
                "seconds": time.perf_counter() - t0,
            }
        except Exception as exc:  # a budget below compress's smallest: reported, not fatal
            cres = {"error": str(exc)}
        log(
            f"budget {b}: uniform {uni and uni['perplexity']}, prune+uniform {pq and pq['perplexity']}, compress {cres.get('perplexity')}"
        )
        rows.append({"budget": b, "uniform": uni, "prune_uniform": pq, "compress": cres})
        (out / "budget.json").write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "command": "python bench/budget.py " + " ".join(sys.argv[1:]),
                    "wall_s": time.perf_counter() - t_start,
                    "rows": rows,
                    "cells": ppl_cache,
                },
                indent=2,
            )
        )
    write_report(args, rows, comp, out, time.perf_counter() - t_start)
    return 0


def _fmt(c: dict[str, Any] | None) -> str:
    if not c or "perplexity" not in c:
        return "- (nothing fits)" if not c else f"- ({c.get('error', '')[:60]}...)"
    return f"{c['perplexity']:.2f}"


def _what(c: dict[str, Any] | None) -> str:
    if not c or "format" not in c:
        return "-"
    emb = "emb q" if c["embeddings"] else "emb 16"
    pr = f"prune {c['ratio']:.0%} + " if c["ratio"] else ""
    return f"{pr}{c['format']}, {emb} ({c['bits_per_param']:.3f} b)"


def write_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    comp: Compressor | None,
    out: Path,
    wall: float,
    cmd: str | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmd = cmd or "python bench/budget.py " + " ".join(sys.argv[1:])
    sens_s = comp.timings.get("sensitivities", 0.0) if comp else 0.0
    lines = [
        "# The best model under a size budget: uniform quantization, pruning + uniform, compress",
        "",
        f"Model {args.model}; evaluation {args.eval_windows} x {args.eval_seq_len} tokens of {args.eval_text}; "
        f"compress's objective: {args.heldout_windows} x {args.seq_len} held-out tokens of {args.calib} "
        f"(windows {args.calib_windows}-{args.calib_windows + args.heldout_windows - 1}; never the evaluation "
        f"text); pruning calibration {args.calib_windows} x {args.seq_len} of {args.calib}. Budgets in bits per "
        "parameter of the unpruned model, every parameter counted by the exact size accountant (scales, zero "
        "points, norms and 16-bit parts included).",
        "",
        "Command:",
        "",
        f"    {cmd}",
        "",
        f"Wall time {wall / 60:.0f} min. Sensitivities: {sens_s:.0f} s "
        f"(reference format {args.reference_format}, shared by every budget).",
        "",
        "| bits/param | uniform | (which) | prune + uniform | (which) | compress | (bits, removed blocks, embeddings) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["compress"]
        detail = (
            f"{c['bits_per_param']:.3f} b, {len(c['removed'])} removed, emb {c['embeddings']}"
            if "perplexity" in c
            else "-"
        )
        lines.append(
            f"| {r['budget']:g} | {_fmt(r['uniform'])} | {_what(r['uniform'])} | {_fmt(r['prune_uniform'])} | "
            f"{_what(r['prune_uniform'])} | {_fmt(c)} | {detail} |"
        )
    lines += [
        "",
        "Caveat: the packaged SmolLM2-135M was dequantized from a Q4_1 GGUF, so its weights already sit on a "
        "4-bit grid; 4-bit results (uniform or mixed) are optimistic against a model trained in 16 bits.",
        "",
        "![perplexity against budget](budget.png)",
        "",
    ]
    (out / "budget.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("uniform", "uniform quantization"),
        ("prune_uniform", "prune + uniform"),
        ("compress", "compress"),
    ):
        pts = [(r["budget"], r[key]["perplexity"]) for r in rows if r[key] and "perplexity" in r[key]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("budget, bits per parameter (all parameters)")
    ax.set_ylabel(f"perplexity ({args.eval_text})")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
