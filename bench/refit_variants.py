"""Stream-refit variants on SmolLM2-135M, side by side (docs/benchmarks.md, "Stream refit").

Plans with ``METRIC`` (default angular) at ``RATIOS`` (default 0.1,0.2), then applies each of ``VARIANTS``
(``none``, ``lsq``, ``refitN`` = stream refit of depth N, ``refitall``, a trailing ``c`` = cosine objective)
and prints the loss on 16 x 256 held-out c4 tokens (windows 33-48, not the calibration windows) and the
bench's wiki perplexity (16 x 1024 tokens). Calibration: the first 32 x 256 c4 tokens. Variants are
compared on the held-out c4 loss; the wiki column is reported, never used to choose.

    OMP_NUM_THREADS=2 RATIOS=0.1,0.2 VARIANTS=refit4,refit4c,refitall python bench/refit_variants.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.registry.plugins import select_adapter  # noqa: E402
from prunekit_core.surgery.apply import apply_removals, branches_masked, resolve_removals  # noqa: E402
from prunekit_core.surgery.refit import stream_refit  # noqa: E402
from prunekit_core.surgery.repair import lsq_repair  # noqa: E402


def main() -> int:
    t0 = time.time()
    model, tok, _ = pk.load_model("smollm2-135m")
    model.eval()
    allc4 = pk.load_windows(tok, "c4", seq_len=256, num_windows=48).ids
    calib, hold = allc4[:32], allc4[32:48]
    evalw = pk.load_windows(tok, "wiki", seq_len=1024, num_windows=16).ids
    print("load", round(time.time() - t0, 1), flush=True)

    def c4loss(m: torch.nn.Module) -> float:
        with torch.inference_mode():
            losses = [
                m(input_ids=hold[i : i + 8], labels=hold[i : i + 8]).loss.item() for i in range(0, 16, 8)
            ]
        return sum(losses) / len(losses)

    ratios = [float(r) for r in os.environ.get("RATIOS", "0.1,0.2").split(",")]
    variants = os.environ.get("VARIANTS", "none,lsq,refit0,refit4").split(",")
    metric = os.environ.get("METRIC", "angular")
    cal = pk.calibrate(model, calib)
    for ratio in ratios:
        plan = pk.plan_pruning(
            model, cal, ratio=ratio, metric=metric, granularity="block", planner="rank", repair="none"
        )
        print("ratio", ratio, "remove", plan.remove, flush=True)
        for v in variants:
            t = time.time()
            m = copy.deepcopy(model)
            ad = select_adapter(m)
            ir = ad.build_ir(m)
            resolved = resolve_removals(ir, list(plan.remove))
            if v == "lsq":
                lsq_repair(m, ir, resolved, calib, masked=branches_masked)
            elif v.startswith("refit"):
                spec = v[5:]
                cosine = spec.endswith("c")
                spec = spec.rstrip("c")
                stream_refit(
                    m,
                    ir,
                    resolved,
                    calib,
                    masked=branches_masked,
                    depth=None if spec == "all" else int(spec),
                    objective="cosine" if cosine else "lsq",
                )
            repair_s = time.time() - t
            apply_removals(m, ad, ir, resolved)
            row = {
                "ratio": ratio,
                "variant": v,
                "c4_hold_loss": round(c4loss(m), 4),
                "wiki_ppl": round(pk.perplexity(m, evalw).perplexity, 3),
                "repair_s": round(repair_s, 1),
            }
            print(json.dumps(row), flush=True)
            del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
