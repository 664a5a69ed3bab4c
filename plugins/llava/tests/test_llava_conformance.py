"""The core conformance suite on tiny random LLaVA models, with an image in every sequence."""

from __future__ import annotations

import torch
from llava_tiny import IMAGE_TOKEN, pixel_values, tiny_llava, tiny_llava_moe, with_image_tokens
from prunekit_llava import LlavaAdapter

from prunekit_core.ir.model import ModelIR
from prunekit_core.testing import AdapterConformance


class _LlavaConformance(AdapterConformance):
    adapter = LlavaAdapter()
    capabilities = {"depth", "sublayers", "width", "towers"}
    vocab_size = IMAGE_TOKEN  # text ids are drawn below the image token
    tower = "clip"

    def make_model(self):
        return tiny_llava(self.tower)

    def input_ids(self, model, *, batch=2, length=None, seed=0):
        return with_image_tokens(super().input_ids(model, batch=batch, length=length, seed=seed))

    def model_inputs(self, model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values(ids.shape[0])}

    def block_removals(self, ir: ModelIR) -> list[list[str]]:
        # every block alone, then a plan across both towers, then two vision blocks (the uniform plan)
        return [[b.id] for b in ir.blocks()] + [
            ["vision.blocks.1", "text.blocks.2"],
            ["vision.blocks.1", "vision.blocks.3"],
        ]

    def mixed_removal(self, ir: ModelIR) -> list[str]:
        # a text attention first (later KV-cache indices shift), whole blocks in both towers, single
        # branches in both towers
        return [
            "text.blocks.0.attn",
            "vision.blocks.2",
            "text.blocks.1",
            "vision.blocks.0.attn",
            "text.blocks.3.mlp",
        ]


class TestLlavaClip(_LlavaConformance):
    tower = "clip"


class TestLlavaSiglip(_LlavaConformance):
    tower = "siglip"


class TestLlavaMixtral(_LlavaConformance):
    """A Mixtral language model inside LLaVA: the Mixtral plugin's expert surgery through composition."""

    tower = "clip"
    capabilities = {"depth", "sublayers", "width", "experts", "towers"}

    def make_model(self):
        return tiny_llava_moe()

    def configure_loaded(self, model):
        model.model.language_model.set_experts_implementation("eager")
        return model

    def mixed_removal(self, ir: ModelIR) -> list[str]:
        return [u.replace("text.blocks.3.mlp", "text.blocks.3.moe") for u in super().mixed_removal(ir)]
