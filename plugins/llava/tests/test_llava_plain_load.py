"""A non-uniform LLaVA checkpoint: every plain transformers class refuses it, load_pruned loads it exactly."""

from __future__ import annotations

import pytest
import torch
from llava_tiny import IMAGE_TOKEN, pixel_values, tiny_llava, with_image_tokens
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

import prunekit_core as pk
from prunekit_core.testing import assert_identical

IDS = with_image_tokens(torch.randint(3, IMAGE_TOKEN, (2, 12), generator=torch.Generator().manual_seed(0)))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, pixel_values=pixel_values(IDS.shape[0]), use_cache=False).logits


PLANS = {
    "vision sublayer": (["vision.blocks.1.mlp"], {}),
    "text sublayer": (["text.blocks.2.attn"], {}),
    "per-layer text width": ([], {"text.blocks.0.mlp.channels": [1, 5, 9]}),
}


@pytest.mark.parametrize(("remove", "groups"), PLANS.values(), ids=PLANS.keys())
def test_plain_llava_loads_refuse_a_non_uniform_checkpoint(tmp_path, remove, groups) -> None:
    model = tiny_llava("clip")
    ir = pk.select_adapter(model).build_ir(model)
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, ir), remove=remove, remove_groups=groups)
    applied = pk.apply_plan(model, plan)
    assert not applied.plan.is_uniform
    out = pk.save_pruned(model, tmp_path / "out", plan=applied.plan)
    for cls in (LlavaForConditionalGeneration, AutoModelForImageTextToText):
        with pytest.raises(ValueError, match=r"prunekit_core\.load_pruned"):
            cls.from_pretrained(out)
    loaded = pk.load_pruned(out)
    assert type(loaded) is LlavaForConditionalGeneration
    assert_identical(logits(loaded), logits(model))
