"""The conformance kit on tiny random GOT-OCR2, with an image in every prompt."""

from __future__ import annotations

import torch
from prunekit_llava.got_ocr2 import GotOcr2Adapter
from test_got_ocr2 import IMAGE_TOKEN, IMAGE_TOKENS, make_got

from prunekit_core.ir import ModelIR
from prunekit_core.testing import AdapterConformance


class TestGotOcr2Conformance(AdapterConformance):
    adapter = GotOcr2Adapter()

    def make_model(self) -> torch.nn.Module:
        return make_got()

    def input_ids(self, model: torch.nn.Module, *, batch: int = 2, length: int | None = None, seed: int = 0):
        """Random text ids (never the image token) with one image's placeholders after the first token."""
        length = length or self.seq_len
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(
            IMAGE_TOKEN + 1, model.config.text_config.vocab_size, (batch, length), generator=gen
        )
        if length > IMAGE_TOKENS + 1:
            ids[:, 1 : 1 + IMAGE_TOKENS] = IMAGE_TOKEN
        return ids

    def model_inputs(self, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One image per row that holds image placeholders (the same pixels for every call)."""
        rows = int((ids == IMAGE_TOKEN).any(1).sum())
        if not rows:
            return {}
        gen = torch.Generator().manual_seed(1)
        size = model.config.vision_config.image_size
        return {"pixel_values": torch.randn(rows, 3, size, size, generator=gen)}

    def width_removals(self, ir: ModelIR, *, uniform: bool) -> dict[str, list[int]]:
        """The kit's choice, but per-layer cuts go to the first block that has channel groups: the SAM
        blocks come first and declare none (the conv channels are stage families, tested in
        test_got_ocr2.py against their own references)."""
        if uniform:
            return super().width_removals(ir, uniform=True)
        first = next(b for b in ir.blocks() if any(s.channel_groups for s in b.sublayers))
        fams = super().width_removals(ir, uniform=True)
        return {f: g for f, g in fams.items() if f.startswith(first.id + ".")}
