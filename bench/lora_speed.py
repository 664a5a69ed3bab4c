"""LoRA healing speed on SmolLM2-135M: seconds per step and steps per second on this machine.

Times ``heal_lora`` as ``prunekit prune smollm2-135m --ratio 0.1 --recover lora`` runs it (rank 8 on every
linear layer of the kept blocks, 4 windows of 256 tokens per step), on the 10% plan's model (blocks 13-15
removed; no calibration needed, the speed does not depend on which blocks go), for a few steps at each
thread count and precision asked for. The first step of each run is a warm-up and is left out of the rate.
Prints the CPU model, its vector extensions, the torch threads and the load average with every row, and
the time 110 steps (the CLI's default) would take.

    python bench/lora_speed.py                              # 6 steps, this process's threads, auto precision
    python bench/lora_speed.py --threads 1,2 --precision fp32,bf16 --steps 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.study.recovery import (  # noqa: E402
    DEFAULT_HEAL_TEXTS,
    cpu_cores,
    heal_lora,
    load_average,
    native_bf16,
    training_windows,
)

REMOVED_AT_10 = (13, 14, 15)  # prunekit's 10% plan on SmolLM2-135M (docs/benchmarks.md)


def machine() -> dict[str, object]:
    """CPU model, the vector extensions that matter for torch's kernels, cores, threads and load."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {
        "cpu": model,
        "extensions": [f for f in wanted if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "cores": cpu_cores(),
        "threads": torch.get_num_threads(),
        "load": load_average(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6, help="steps per run, the first one a warm-up (default 6)")
    ap.add_argument("--threads", default="", help="thread counts, comma-separated (default: torch's)")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16, comma-separated (default auto)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is a warm-up)")

    base, tok, _ = pk.load_model(args.model)
    ir = pk.inspect(base)
    remove = [f"text.blocks.{i}" for i in REMOVED_AT_10]
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(base, ir), remove=remove)
    pk.prune(base, plan=plan)  # the pipeline, with nothing to calibrate, evaluate or save
    train = training_windows(tok, seq_len=args.seq_len, texts=DEFAULT_HEAL_TEXTS, exclude=("wiki",))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    print(json.dumps({"machine": machine(), "removed": remove}), flush=True)

    threads = [int(t) for t in args.threads.split(",") if t.strip()] or [torch.get_num_threads()]
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for precision in [p.strip() for p in args.precision.split(",") if p.strip()]:
            base.load_state_dict(state)  # each run starts from the same pruned weights
            stamps = [time.perf_counter()]
            load_before = load_average()
            cpu0 = time.process_time()
            _, rep = heal_lora(
                base,
                train,
                rank=args.rank,
                steps=args.steps,
                batch_size=args.batch,
                seed=0,
                precision=precision,
                on_step=lambda _step, _loss, log=stamps: log.append(time.perf_counter()),
            )
            cpu = time.process_time() - cpu0
            per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][
                1:
            ]  # the first step warms up
            mean = statistics.mean(per_step)
            rows.append(
                {
                    "threads": n,
                    "precision": rep.precision,
                    "timed_steps": len(per_step),
                    "s_per_step": round(mean, 3),
                    "s_per_step_median": round(statistics.median(per_step), 3),
                    "steps_per_s": round(1 / mean, 4),
                    "warmup_s": round(stamps[1] - stamps[0], 3),
                    "projected_110_steps_s": round(110 * mean, 1),
                    "cpu_s_per_wall_s": round(cpu / (time.perf_counter() - stamps[0]), 2),
                    "loss_first": round(rep.loss_first, 4),
                    "load_before": load_before,
                    "load_after": load_average(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
