"""What the generic adapter's discovery costs on a real model, against the Llama plugin, side by side.

Loads SmolLM2-135M (30 Llama blocks), builds its IR with the Llama plugin, with the generic adapter
(torch.export discovery), and with the generic adapter again (remembered), on one thread; checks the two
adapters agree on every unit; prints a Markdown table.

    python bench/generic_discovery.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.adapters.generic import GenericAdapter  # noqa: E402
from prunekit_core.registry.plugins import get_adapter  # noqa: E402


def _timed(fn):  # noqa: ANN001, ANN202
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    model, _tok, _ = pk.load_model("smollm2-135m")
    llama, generic = get_adapter("llama"), GenericAdapter()
    ir_llama, s_llama = _timed(lambda: llama.build_ir(model))
    ir_generic, s_first = _timed(lambda: generic.build_ir(model))
    _, s_again = _timed(lambda: generic.build_ir(model))
    fields = ("id", "kind", "module", "norm", "output", "residual", "params", "uses_cache", "out_proj")
    same = [[getattr(s, f) for f in fields] for s in ir_generic.sublayers()] == [
        [getattr(s, f) for f in fields] for s in ir_llama.sublayers()
    ] and [(b.id, b.params) for b in ir_generic.blocks()] == [(b.id, b.params) for b in ir_llama.blocks()]
    print(
        f"SmolLM2-135M: {len(ir_llama.blocks())} blocks, {len(ir_llama.sublayers())} sublayers; units agree: {same}"
    )
    print()
    print("| adapter | build_ir s |")
    print("|---|---|")
    print(f"| llama plugin | {s_llama:.3f} |")
    print(f"| generic, first call (torch.export + discovery) | {s_first:.2f} |")
    print(f"| generic, again (remembered) | {s_again:.3f} |")


if __name__ == "__main__":
    main()
