"""Recovery benchmark on SmolLM2-135M: no recovery vs closed-form repair vs LoRA healing, side by side.

Protocol: calibrate on the c4 text (32 x 256 tokens), evaluate perplexity on the wiki text (16 x 1024 tokens
from the start, as bench/depth_pruning.py), fp32. Budgets are fractions of the decoder blocks' parameters.
Rows per budget: ShortGPT Block Influence unhealed (the reference), prunekit's best plan (angular span)
without recovery, with the least-squares repair (``--recover repair``; adds no parameters), and with repair
then LoRA healing (``--recover lora``) on the packaged c4 (after the calibration tokens), technical and
tiny texts — never the evaluation text. Wall time and training tokens are printed for each recovery, and
LoRA's seconds per step, precision and threads, under a header naming the CPU, cores and load
(``bench/lora_speed.py`` times the steps alone, in a minute or two).

    python bench/recovery.py                          # full protocol (about 14 minutes on 2 cores)
    python bench/recovery.py --lora-steps 40 --eval-windows 4 --ratios 0.1   # quicker, noisier
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.study.pipeline import Reporter  # noqa: E402
from prunekit_core.study.recovery import DEFAULT_HEAL_TEXTS, PRECISIONS, training_windows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_speed import machine  # noqa: E402


class _Loud(Reporter):
    """LoRA healing's progress line (a bar on a terminal), as ``prunekit prune --recover lora`` shows it."""

    training_progress = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ratios", default="0.1,0.2")
    ap.add_argument("--lora-steps", type=int, default=110)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--lora-seq-len", type=int, default=256)
    ap.add_argument("--lora-precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recovery.md"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    host = machine()
    print(json.dumps({"machine": host}), file=sys.stderr, flush=True)
    model, tok, _ = pk.load_model(args.model)
    calib_w = pk.load_windows(tok, "c4", seq_len=256, num_windows=args.calib_windows)
    calib = calib_w.ids
    evalw = pk.load_windows(tok, "wiki", seq_len=1024, num_windows=args.eval_windows).ids
    train = training_windows(
        tok,
        seq_len=args.lora_seq_len,
        texts=DEFAULT_HEAL_TEXTS,
        exclude=("wiki",),
        skip_tokens={"c4": calib.numel()},
    )
    cal = pk.calibrate(model, calib)
    base = pk.perplexity(model, evalw).perplexity
    print(f"baseline {base:.2f}; healing windows {tuple(train.shape)}", file=sys.stderr, flush=True)
    rows = []

    def row(
        ratio: float,
        label: str,
        m: torch.nn.Module,
        recover_s: float,
        tokens: int,
        removed: list[str],
        lora: str = "",
    ) -> None:
        ppl = pk.perplexity(m, evalw).perplexity
        rows.append(
            {
                "ratio": ratio,
                "label": label,
                "ppl": ppl,
                "recover_s": recover_s,
                "tokens": tokens,
                "removed": removed,
                "lora": lora,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    lora = dict(
        recover="lora",
        lora_texts=DEFAULT_HEAL_TEXTS,
        lora_steps=args.lora_steps,
        lora_lr=args.lora_lr,
        lora_rank=args.lora_rank,
        lora_batch=args.lora_batch,
        lora_seq_len=args.lora_seq_len,
        lora_precision=args.lora_precision,
        seed=0,
    )
    for ratio in [float(r) for r in args.ratios.split(",")]:
        # every row is one run of the pipeline on a copy, with the calibration pass they share
        res = pk.prune(
            copy.deepcopy(model),
            ratio=ratio,
            calib=calib,
            calibration=cal,
            metric="bi",
            granularity="block",
            planner="rank",
            repair="none",
        )
        row(ratio, "ShortGPT BI, no recovery", res.model, 0.0, 0, res.plan.remove)
        best = pk.prune(model, ratio=ratio, calib=calib, calibration=cal, plan_only=True).plan  # angular, lsq
        plain = best.model_copy(update={"repair": "none"})
        res = pk.prune(copy.deepcopy(model), plan=plain)
        row(ratio, "prunekit best plan, no recovery", res.model, 0.0, 0, best.remove)
        res = pk.prune(copy.deepcopy(model), plan=best, calib=calib)
        rep_s = res.timings["apply"]
        row(ratio, "+ repair (least squares, 0 added params)", res.model, rep_s, calib.numel(), best.remove)
        # the same repair again, then LoRA healing on the texts after the calibration tokens (--recover lora)
        res = pk.prune(
            copy.deepcopy(model), tokenizer=tok, plan=best, calib=calib_w, reporter=_Loud(), **lora
        )
        rep = res.recovery
        assert rep is not None
        row(
            ratio,
            f"+ repair + LoRA (r{args.lora_rank}, {args.lora_steps} steps)",
            res.model,
            res.timings["apply"] + rep.wall_s,
            calib.numel() + rep.tokens,
            best.remove,
            f"{rep.wall_s / rep.steps:.2f} s/step ({rep.steps_per_s:.3f} steps/s), {rep.precision}, "
            f"{rep.threads} thread{'s' if rep.threads != 1 else ''}",
        )
        del res
    lines = [
        f"Baseline {base:.2f} on {evalw.shape[0]} x {evalw.shape[1]} wiki tokens; calibration {calib.shape[0]} x 256 "
        f"c4 tokens; healing texts {', '.join(DEFAULT_HEAL_TEXTS)} (c4 after the calibration tokens); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; total {(time.perf_counter() - t0) / 60:.1f} min.",
        f"CPU {host['cpu']} ({', '.join(cast(list[str], host['extensions']))}; "
        f"torch {host['torch_cpu_capability']}), "
        f"{host['cores']} cores, load {host['load']:.1f} at the start.",
        "",
        "| budget | method | removed | perplexity | vs ShortGPT BI | recovery s | tokens used | LoRA speed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next(x["ppl"] for x in rows if x["ratio"] == r["ratio"] and x["label"].startswith("ShortGPT"))
        lines.append(
            f"| {r['ratio']:.0%} | {r['label']} | {', '.join(u.rsplit('.', 1)[-1] for u in r['removed'])} | "
            f"{r['ppl']:.2f} | {r['ppl'] / ref:.3f}x | {r['recover_s']:.1f} | {r['tokens']:,} | {r['lora']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
