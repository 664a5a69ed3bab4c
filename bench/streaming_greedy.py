"""What greedy planning costs under ``--streaming``: passes over the weights and block loads per step.

Saves a random Llama of ``--layers`` blocks (small widths: the counts, not the speed, are the point) and
plans with the greedy planner twice, in memory and streaming, from the same calibration windows; checks the
plans are equal and prints, per greedy step, the trials measured, the passes over the blocks and the blocks
loaded from disk, against what one pass per trial (plus one per commit) would cost.

    python bench/streaming_greedy.py --layers 30 --metric nri --granularity sublayer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit_core as pk
from prunekit_core.scoring.streaming import StreamingTrialRunner, open_streaming, stream_calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--metric", default="nri", choices=("nri", "sleb"))
    ap.add_argument("--granularity", default="sublayer", choices=("block", "sublayer"))
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(3, 500, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    kw = dict(ratio=args.ratio, metric=args.metric, planner="greedy", granularity=args.granularity)
    t = time.perf_counter()
    ref = pk.prune(model, calib=windows, plan_only=True, **kw).plan  # calibrate + plan, in memory
    t_mem = time.perf_counter() - t

    steps: list[tuple[int, int, int]] = []  # (trials, passes, block loads) when each commit happens
    runners: list[StreamingTrialRunner] = []
    commit = StreamingTrialRunner.commit

    def counted(self: StreamingTrialRunner, remove: list[str]) -> None:
        if not runners:
            runners.append(self)
        steps.append((self.trials, self.passes, self.sm.loaded_blocks))
        commit(self, remove)

    StreamingTrialRunner.commit = counted  # type: ignore[method-assign]  # a bench probe: counts every commit
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m")
        sm = open_streaming(Path(tmp) / "m")
        t = time.perf_counter()
        cal = stream_calibrate(sm, windows)
        loads0 = sm.loaded_blocks
        plan = pk.plan_pruning(sm.model, cal, **kw)
        t_stream = time.perf_counter() - t
    runner = runners[0]
    assert plan.remove == ref.remove and plan.scores == ref.scores, "streaming greedy plan differs"
    n = args.layers
    print(
        f"random Llama, {n} blocks; greedy:{args.metric} at {args.granularity} granularity, ratio {args.ratio}; "
        f"{args.windows} trial windows x {args.seq_len} tokens, chunk {runner.chunk}"
    )
    print(f"plan equal to the in-memory greedy plan: {len(plan.remove)} units {plan.remove}")
    print("| step | trials | passes | block loads | one pass per trial: passes |")
    print("|---:|---:|---:|---:|---:|")
    prev = (0, 0, loads0)
    for k, cur in enumerate([*steps, (runner.trials, runner.passes, sm.loaded_blocks)]):
        trials, passes, loads = (c - p for c, p in zip(cur, prev, strict=True))
        label = str(k + 1) if k < len(steps) else "final loss"
        print(f"| {label} | {trials} | {passes} | {loads} | {trials + (1 if k else 0)} |")
        prev = cur
    print(
        f"total: {runner.trials} trials, {runner.passes} passes, {sm.loaded_blocks - loads0} block loads "
        f"({(sm.loaded_blocks - loads0) / n:.1f} model loads), {runner.block_forwards} block forwards; "
        f"one pass per trial and per commit: {runner.trials + len(steps) + 1} passes "
        f"({(runner.trials + len(steps) + 1) * n} block loads)"
    )
    print(f"wall: in memory {t_mem:.1f} s (calibrate + plan), streaming {t_stream:.1f} s (calibrate + plan)")


if __name__ == "__main__":
    main()
