"""Speed where users run it: llama.cpp prefill and decode tokens/s of SmolLM2-135M, unpruned and pruned at
each granularity, exported by `prunekit export --format gguf` at each type, beside the ideal speedup.

For each granularity (block, sublayer, width, mixed) the model is pruned to ``--ratio`` of its decoder
blocks' parameters with prunekit's best planner for that granularity (calibration: c4, ``--calib-windows``
x 256 tokens), saved, and exported at f16, q8_0 and q4_0 (``--types``). llama.cpp (llama-cpp-python, the
``gguf`` extra) then times, on ``--threads`` threads, a prefill of ``--prompt`` tokens of the wiki text and
``--decode`` single-token steps after it (best of ``--repeats``). Every ratio is against the unpruned
model's file of the same type, measured in the same run.

Ideal speedup: the unpruned model's parameters over the pruned one's, counting the weights a token
multiplies (every block matrix, and the output head; not the input embedding, a row lookup). Speedup
over ideal is the ratio of the two: 1.0 means llama.cpp gains exactly what the removed parameters promise.

The perplexity columns check the export: llama.cpp's perplexity of the f32 file on ``--eval-windows`` x
1024 wiki tokens against `prunekit eval`'s (transformers) on the same windows; the two agree within 1%.

    python bench/engine_speed.py                                # about 15-25 minutes on 2 cores
    python bench/engine_speed.py --types q8_0 --eval-windows 2  # quicker
    python bench/engine_speed.py --round-to 1                   # the width shapes without rounding

Writes the Markdown table to stdout and to ``--out`` (default docs/results/engine.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.io.gguf_export import export_gguf  # noqa: E402
from prunekit_core.study.engine import engine_perplexity, engine_speed, open_gguf  # noqa: E402

GRANULARITIES = ("block", "sublayer", "width", "mixed")


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters a token multiplies: every 2-D parameter but the input embedding (the head counted once,
    also when tied to the embedding)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not emb)
    return total + (head.numel() if head is emb else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--granularities", default=",".join(GRANULARITIES))
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--round-to", type=int, default=32)
    ap.add_argument("--out", default="docs/results/engine.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    types = args.types.split(",")
    grans = args.granularities.split(",")

    base, tok, _ = pk.load_model("smollm2-135m")
    calib = pk.load_windows(tok, "c4", seq_len=256, num_windows=args.calib_windows)
    wiki = pk.load_windows(tok, "wiki", seq_len=1024, num_windows=max(args.eval_windows, 1))
    prompt = wiki.ids[0, : args.prompt].tolist()
    work = Path(tempfile.mkdtemp(prefix="engine-speed-"))

    rows: list[dict[str, Any]] = []
    for gran in ["none", *grans]:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        folder = work / gran
        if gran == "none":
            pk.save_pruned(model, folder, tokenizer=tok)
        else:
            pk.prune(
                model,
                tokenizer=tok,
                ratio=args.ratio,
                calib=calib,
                granularity=gran,
                round_to=args.round_to,
                out=folder,
                eval_tokens=None,
            )
            model = pk.load_pruned(folder)
        params = matmul_params(model)
        ppl_torch = ppl_engine = float("nan")
        if args.eval_windows:
            ev = wiki.ids[: args.eval_windows]
            ppl_torch = pk.perplexity(model, ev).perplexity
            f32 = export_gguf(folder, work / f"{gran}.f32.gguf", type="f32")
            ppl_engine = engine_perplexity(open_gguf(f32.path, n_ctx=1024, n_threads=args.threads), ev)
        for kind in types:
            res = export_gguf(folder, work / f"{gran}.{kind}.gguf", type=kind)
            speed = engine_speed(
                res.path, prompt, decode_tokens=args.decode, n_threads=args.threads, repeats=args.repeats
            )
            rows.append(
                {
                    "gran": gran,
                    "type": kind,
                    "arch": res.arch,
                    "params": params,
                    "prefill": speed.prefill,
                    "decode": speed.decode,
                    "mib": sum(res.tensor_bytes.values()) / 2**20,
                    "ppl_torch": ppl_torch,
                    "ppl_engine": ppl_engine,
                }
            )
        print(f"{gran}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    ref = {r["type"]: r for r in rows if r["gran"] == "none"}
    lines = [
        f"Command: `python bench/engine_speed.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"SmolLM2-135M, ratio {args.ratio} of the block parameters, --round-to {args.round_to}; llama.cpp "
        f"(llama-cpp-python) on {args.threads} threads; prefill of {args.prompt} tokens, {args.decode} decode "
        f"steps, best of {args.repeats}. Ratios are against the unpruned file of the same type, same run.",
        "",
        "| granularity | type | arch | matmul params | ideal | prefill tok/s | prefill x | x/ideal | "
        "decode tok/s | decode x | x/ideal | MiB | ppl llama.cpp f32 | ppl prunekit | diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = ref[r["type"]]
        ideal = float(b["params"]) / float(r["params"])
        px = float(r["prefill"]) / float(b["prefill"])
        dx = float(r["decode"]) / float(b["decode"])
        pe, pt = float(r["ppl_engine"]), float(r["ppl_torch"])
        lines.append(
            f"| {r['gran']} | {r['type']} | {r['arch']} | {float(r['params']) / 1e6:.1f}M | {ideal:.3f} | "
            f"{float(r['prefill']):.0f} | {px:.3f} | {px / ideal:.2f} | {float(r['decode']):.1f} | {dx:.3f} | "
            f"{dx / ideal:.2f} | {float(r['mib']):.1f} | {pe:.3f} | {pt:.3f} | {100 * (pe / pt - 1):+.2f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
