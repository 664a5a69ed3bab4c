"""The conformance kit on tiny random GOT-OCR2, with an image in every prompt."""

from __future__ import annotations

import torch
from prunekit_llava.got_ocr2 import GotOcr2Adapter
from test_got_ocr2 import IMAGE_TOKEN, IMAGE_TOKENS, UNIFORM_CONV, make_got

from prunekit_core.ir.model import ModelIR
from prunekit_core.testing import AdapterConformance


class TestGotOcr2Conformance(AdapterConformance):
    adapter = GotOcr2Adapter()
    capabilities = {"depth", "sublayers", "width", "stages", "towers"}
    vocab_size = IMAGE_TOKEN  # text ids are drawn below the image token
    normalised_stage_families = {
        f"vision.neck.{conv}.channels": "a channel LayerNorm follows; test_got_ocr2.py checks a narrower forward"
        for conv in ("conv1", "conv2")
    }

    def make_model(self) -> torch.nn.Module:
        return make_got()

    def input_ids(self, model: torch.nn.Module, *, batch: int = 2, length: int | None = None, seed: int = 0):
        """The kit's random ids, drawn below the image token, with one image's placeholders first (a
        prefill of the kit's cached-decoding checks holds them all)."""
        ids = super().input_ids(model, batch=batch, length=length, seed=seed)
        if ids.shape[1] > IMAGE_TOKENS:
            ids[:, :IMAGE_TOKENS] = IMAGE_TOKEN
        return ids

    def model_inputs(self, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same image for every row that holds image placeholders (a row decoded alone sees the image
        it sees in a batch)."""
        rows = int((ids == IMAGE_TOKEN).any(1).sum())
        if not rows:
            return {}
        size = model.config.vision_config.image_size
        image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        return {"pixel_values": image.expand(rows, -1, -1, -1).contiguous()}

    def width_removals(self, ir: ModelIR, *, uniform: bool) -> dict[str, list[int]]:
        """The kit's choice, but per-layer cuts go to the first block that has channel groups: the SAM
        blocks come first and declare none (the conv channels are stage families, tested in
        test_got_ocr2.py against their own references)."""
        if uniform:
            return super().width_removals(ir, uniform=True)
        first = next(b for b in ir.blocks() if any(s.channel_groups for s in b.sublayers))
        fams = super().width_removals(ir, uniform=True)
        return {f: g for f, g in fams.items() if f.startswith(first.id + ".")}

    def stage_width_plans(self, ir: ModelIR) -> list[dict[str, list[int]]]:
        """The kit's cuts (none of which the config describes) and one it does: conv1 and conv2 at 6
        channels, conv_upsampler1 at 12 (vision_config.output_channels = 6)."""
        return [*super().stage_width_plans(ir), UNIFORM_CONV]
