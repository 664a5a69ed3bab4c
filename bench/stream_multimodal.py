"""Streaming calibration of a vision-language model vs the in-memory pass: peak RSS, time, equal scores.

Builds a random LLaVA (a CLIP vision tower and a Llama language model, sizes from the arguments), saves
it as safetensors shards, then runs in two fresh subprocesses:

- ``memory``: load the whole model, put one sample image in front of every window, ``calibrate``;
- ``stream``: ``open_streaming`` + ``calibration_inputs`` on the skeleton + ``stream_calibrate``.

Prints one JSON object: each side's peak RSS (VmHWM), seconds, the bytes of vision-block outputs the
streaming pass held for replay, and whether the ``bi`` scores of both towers are equal bit for bit.

    python bench/stream_multimodal.py                 # CLIP-B/16 at 224 px + an 8-block 1024-wide Llama
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def build(folder: Path, args: argparse.Namespace) -> int:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = 32000
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=args.vision_width,
            intermediate_size=4 * args.vision_width,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_width // 64,
            image_size=args.image_size,
            patch_size=16,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=args.text_width,
            intermediate_size=4 * args.text_width,
            num_hidden_layers=args.text_layers,
            num_attention_heads=args.text_width // 64,
            num_key_value_heads=args.text_width // 64,
            max_position_embeddings=2048,
        ),
        image_token_id=vocab - 1,
        image_seq_length=(args.image_size // 16) ** 2,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder, max_shard_size="200MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(mode: str, folder: str, windows: int, seq_len: int) -> None:
    import prunekit_core as pk

    ids = torch.randint(3, 30000, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"mode": mode}
    t = time.perf_counter()
    if mode == "stream":
        from prunekit_core.scoring.streaming import open_streaming, stream_calibrate, stream_score

        sm = open_streaming(folder)
        ids, extra = sm.calibration_inputs(ids)
        cal = stream_calibrate(sm, ids, inputs=extra)
        bi = stream_score(sm, cal, "bi").values
        out.update(replay_gb=sm.replay_bytes / 1e9, loaded_blocks=sm.loaded_blocks)
    else:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        ids, extra = pk.select_adapter(model).calibration_inputs(model, ids)
        cal = pk.calibrate(model, ids, inputs=extra)
        bi = pk.score(model, cal, "bi").values
    out.update(
        seconds=round(time.perf_counter() - t, 2),
        peak_rss_gb=round(_vm_hwm_gb(), 3),
        towers={k: s.tokens for k, s in cal.towers.items()},
        bi=bi,
    )
    print("RESULT " + json.dumps(out), flush=True)


def run_child(mode: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, str(folder), str(args.windows), str(args.seq_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} child failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision-layers", type=int, default=12)
    p.add_argument("--vision-width", type=int, default=768)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--text-width", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tmp", default=None, help="where to write the model (default: the system temp dir)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prunekit-mm-stream-", dir=args.tmp))
    try:
        folder = root / "llava"
        weight_bytes = build(folder, args)
        memory = run_child("memory", folder, args)
        stream = run_child("stream", folder, args)
        equal = memory.pop("bi") == stream.pop("bi")
        print(
            json.dumps(
                {
                    "weights_gb": round(weight_bytes / 1e9, 3),
                    "args": vars(args),
                    "memory": memory,
                    "stream": stream,
                    "bi_equal": equal,
                    "rss_ratio_stream_vs_memory": round(stream["peak_rss_gb"] / memory["peak_rss_gb"], 3),
                },
                indent=1,
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
