"""Pruning vs quantization on SmolLM2-135M: a `prunekit sweep` grid, its report, and the executor speedup.

Two parts, measured in one run:

1. Executor speedup: the same 4 cells (unpruned x 4 formats) run one after another (``serial``, torch
   using every core, then with one thread) and through the local process pool (``local``: one
   single-threaded worker per core). Each run is a cold ``prunekit sweep`` process; the three alternate,
   ``--repeats`` times, and medians are compared.
2. The grid: ratios x formats with prunekit's best pruning method (angular span + least-squares repair)
   and ShortGPT BI, through the local executor, into a resumable SQLite store; then the report.

To keep it short on two shared cores the evaluation uses fewer tokens than bench/depth_pruning.py
(default 4 x 512 tokens of wiki, stated in the report); calibration 32 x 256 tokens of c4, as there (with
8 x 256 the angular span moves to blocks 10-15 and 20% pruning breaks: docs/results/prune_vs_quant.md).

    python bench/prune_vs_quant.py                       # writes docs/results/prune_vs_quant*
    python bench/prune_vs_quant.py --skip-speedup        # the grid only (resumes a killed run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunekit_core.study import sweep as sw  # noqa: E402
from prunekit_core.study.report import write_report  # noqa: E402

FORMATS = "none,mxfp8_e4m3,mxfp6_e2m3,mxfp4,int8,int4_g32,int4_g128"
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def make_config(args: argparse.Namespace, ratios: list[float], formats: list[str]) -> sw.SweepConfig:
    return sw.validate_sweep_config(
        {
            "model": args.model,
            "calibration": {"text": args.calib, "seq_len": args.calib_seq_len, "windows": args.calib_windows},
            "evaluation": {
                "text": args.eval_text,
                "seq_len": args.eval_seq_len,
                "windows": args.eval_windows,
            },
            "methods": [
                {"name": m} | ({} if m == "best" else {"metric": m}) for m in args.methods.split(",")
            ],
            "ratios": ratios,
            "formats": formats,
        }
    )


def timed_sweep(cfg: sw.SweepConfig, executor: str, threads: int) -> tuple[float, dict[str, float]]:
    """Wall time of a cold ``prunekit sweep`` process (imports, model load, cells) and its perplexities.

    Every executor runs as the user would run it, in a fresh process: the serial one pays its imports and
    model load once, the pool's workers each pay their model load (the imports are paid once, by the
    forkserver). ``threads`` sets ``OMP_NUM_THREADS`` of that process (the pool's workers use one each).
    """
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "sweep.json").write_text(json.dumps(cfg.model_dump()))
        db = Path(d) / "r.sqlite"
        cmd = [sys.executable, "-m", "prunekit_core.cli", "sweep", str(Path(d) / "sweep.json")]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        subprocess.run(
            [*cmd, "--results", str(db), "--executor", executor], env=env, check=True, capture_output=True
        )
        wall = time.perf_counter() - t0
        ppl = {r["cell"]: r["perplexity"] for r in sw.read_results(db)}
    return wall, ppl


def speedup(args: argparse.Namespace) -> str:
    """Serial (all cores, one core) and local pool, interleaved ``--repeats`` times; medians compared."""
    cores = os.cpu_count() or 1
    cell_args = argparse.Namespace(
        **(
            vars(args)
            | {"eval_windows": args.speedup_eval_windows, "eval_seq_len": args.speedup_eval_seq_len}
        )
    )
    cfg = make_config(cell_args, [0.0], ["none", "mxfp8_e4m3", "mxfp4", "int4_g32"])
    runs = {"serial_all": ("serial", cores), "serial_one": ("serial", 1), "local": ("local", 1)}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    ppls: dict[str, dict[str, float]] = {}
    for i in range(args.repeats):
        for name, (executor, threads) in runs.items():
            wall, ppls[name] = timed_sweep(cfg, executor, threads)
            walls[name].append(wall)
            print(f"speedup run {i + 1}/{args.repeats}: {name} {wall:.1f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    same = all(
        abs(ppls["serial_all"][k] - ppls["local"][k]) <= 1e-4 * ppls["serial_all"][k] for k in ppls["local"]
    )

    def row(label: str, k: str) -> str:
        each = ", ".join(f"{w:.1f}" for w in walls[k])
        return f"| {label} | {med[k]:.1f} | {each} | {med[k] / med['local']:.2f}x |"

    lines = [
        "## Executor speedup (4 cells: unpruned x none, mxfp8_e4m3, mxfp4, int4_g32)",
        "",
        f"{cores} CPU cores (shared with other jobs: timings are noisy). Each run is a cold `prunekit sweep` "
        f"process (imports, model load, the 4 cells); the three executors run interleaved, {args.repeats} "
        "times; the table compares medians. Evaluation "
        f"{cell_args.eval_windows} x {cell_args.eval_seq_len} tokens of {args.eval_text} per cell "
        "(`--speedup-eval-windows`, `--speedup-eval-seq-len`).",
        "",
        "| executor | median wall s | runs (s) | speedup of local |",
        "|---|---|---|---|",
        row(f"serial, torch {cores} threads", "serial_all"),
        row("serial, torch 1 thread (the pool's cells, one after another)", "serial_one"),
        row(f"local pool, {min(cores, 4)} workers x 1 thread", "local"),
        "",
        f"Same perplexities from both executors: {'yes' if same else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


def per_bit(rows: list[dict]) -> str:
    """Each pruned-only row against the best unpruned, quantized row that is no bigger."""
    ok = [r for r in rows if r["perplexity"] is not None]
    quant = [r for r in ok if r["method"] == "none" and r["format"] != "none"]
    lines = [
        "",
        "## Pruning alone vs quantization alone at no more bits",
        "",
        "| pruning only | bits/param | perplexity | best unpruned quantized at <= bits | bits/param | perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in ok if r["method"] != "none" and r["format"] == "none"), key=lambda r: r["ratio"]
    ):
        fits = [q for q in quant if q["bits_per_param"] <= r["bits_per_param"]]
        best = min(fits, key=lambda q: q["perplexity"]) if fits else None
        lines.append(
            f"| {r['method']} {r['ratio']:.0%} | {r['bits_per_param']:.3f} | {r['perplexity']:.2f} | "
            + (
                f"{best['format']} | {best['bits_per_param']:.3f} | {best['perplexity']:.2f} |"
                if best
                else "- | - | - |"
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--eval", dest="eval_text", default="wiki")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--ratios", default="0,0.1,0.2,0.3")
    ap.add_argument("--methods", default="best,bi", help="comma-separated metric names, or best")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--skip-speedup", action="store_true")
    ap.add_argument(
        "--speedup-eval-windows",
        type=int,
        default=8,
        help="evaluation windows per cell in the speedup part (a cell's work against the fixed start-up)",
    )
    ap.add_argument("--speedup-eval-seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each executor in the speedup part")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    parts = []
    if not args.skip_speedup:
        parts.append(speedup(args))
        print(parts[-1], flush=True)
        (out / "executor_speedup.md").write_text(parts[-1])

    cfg = make_config(args, [float(r) for r in args.ratios.split(",")], args.formats.split(","))
    db = out / "prune_vs_quant.sqlite"

    def on_row(row: dict, done: int, total: int) -> None:
        print(
            f"[{done}/{total}] {row['cell']}: ppl {row['perplexity']}, {row['bits_per_param']:.3f} bits/param",
            file=sys.stderr,
            flush=True,
        )

    summary = sw.run_sweep(cfg, db, executor="local", on_row=on_row)
    print(json.dumps(summary), file=sys.stderr)
    title = (
        f"Pruning x quantization on {args.model}: calibration {args.calib_windows} x {args.calib_seq_len} "
        f"{args.calib}, evaluation {args.eval_windows} x {args.eval_seq_len} {args.eval_text}"
    )
    paths = write_report(db, out, title=title)
    for name in ("report", "plot"):
        final = out / f"prune_vs_quant_{paths[name].name}"
        paths[name].replace(final)
        paths[name] = final
    md = paths["report"].read_text().replace("(pareto.png)", f"({paths['plot'].name})")
    md += per_bit(sw.read_results(db))
    paths["report"].write_text(md)
    print(md)
    print(
        f"total {time.perf_counter() - t0:.0f} s; wrote {paths['report']}, {paths['plot']}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
