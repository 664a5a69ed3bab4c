"""LLaVA-specific checks: the three towers, composition, the vision feature layer, stage errors."""

from __future__ import annotations

import copy

import pytest
import torch
from llava_tiny import IMAGE_TOKEN, VISION, pixel_values, tiny_llava, tiny_llava_moe, with_image_tokens
from prunekit_llava import LlavaAdapter
from transformers import LlavaForConditionalGeneration

import prunekit_core as pk
from prunekit_core.adapters.compose import map_submodel
from prunekit_core.adapters.vision import remap_hidden_state_index
from prunekit_core.ir.errors import PlanError, UnsupportedModelError


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return with_image_tokens(torch.randint(3, IMAGE_TOKEN, (batch, length), generator=gen))


@torch.no_grad()
def _logits(model, ids=None):
    ids = _ids() if ids is None else ids
    return model(input_ids=ids, pixel_values=pixel_values(ids.shape[0]), use_cache=False).logits


def _prune(model, remove, groups=None):
    ir = pk.select_adapter(model).build_ir(model)
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, ir), remove=remove, remove_groups=groups or {})
    return pk.apply_plan(model, plan).model


def test_ir_has_vision_projector_and_text_towers():
    model = tiny_llava("clip")
    ir = pk.select_adapter(model).build_ir(model)
    assert ir.adapter == "llava"
    assert [t.name for t in ir.towers] == ["vision", "projector", "text"]
    vision = ir.tower("vision")
    assert [b.id for b in vision.blocks] == [f"vision.blocks.{i}" for i in range(4)]
    assert [s.id for s in vision.blocks[3].sublayers] == ["vision.blocks.3.attn", "vision.blocks.3.mlp"]
    stages = {s.id: s.kind for s in vision.stages}
    assert stages["vision.embed"] == "stem"  # the Conv2d patch embedding lives here
    assert isinstance(model.get_submodule("model.vision_tower.embeddings.patch_embedding"), torch.nn.Conv2d)
    assert [(s.id, s.kind) for s in ir.tower("projector").stages] == [("projector.mlp", "projector")]
    assert [(c.source, c.target, c.dim) for c in ir.connections] == [
        ("vision", "projector", VISION["hidden_size"]),
        ("projector", "text", 64),
    ]
    text = ir.tower("text")
    assert text.blocks_path == "model.language_model.layers"
    assert text.blocks[2].sublayers[0].module == "model.language_model.layers.2.self_attn"
    assert "text.blocks.2.mlp.channels" in ir.channel_groups()


def test_language_model_is_described_by_its_own_plugin():
    model = tiny_llava("clip")
    sub = LlavaAdapter().submodels(model)[0]
    assert sub.adapter.name == "llama"  # composed, not copied
    inner = sub.inner_ir()
    assert inner.tower("text").blocks[0].module == "model.layers.0"
    outer = sub.outer_towers()[0]
    assert outer.blocks[0].module == "model.language_model.layers.0"
    assert sub.to_inner(outer) == inner.tower("text")  # the maps are inverse
    assert (
        sub.path_in("lm_head") == "lm_head" and sub.owns("text.blocks.1") and not sub.owns("vision.blocks.1")
    )


def test_mixtral_language_model_composes_too():
    model = tiny_llava_moe()
    sub = LlavaAdapter().submodels(model)[0]
    assert sub.adapter.name == "mixtral"
    ir = pk.select_adapter(model).build_ir(model)
    assert "text.blocks.1.moe.experts" in ir.channel_groups()
    _prune(model, ["vision.blocks.1", "text.blocks.0"], {"text.blocks.2.moe.experts": [0]})
    assert model.config.text_config.num_hidden_layers == 3
    assert model.config.vision_config.num_hidden_layers == 3
    _logits(model)  # still runs with an image


def test_unsupported_language_model_names_the_backbone():
    model = tiny_llava("clip")
    with pytest.raises(UnsupportedModelError, match="Embedding"):
        map_submodel(model, "model.language_model.embed_tokens", prefix="text", head="lm_head")


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_dropping_the_unused_last_layer_is_exact(tower):
    model = tiny_llava(tower, feature_layer=-2)
    want = _logits(model)
    params = sum(p.numel() for p in model.parameters())
    _prune(model, ["vision.blocks.3"])
    assert model.config.vision_feature_layer == -1
    assert model.config.vision_config.num_hidden_layers == 3
    assert len(model.model.vision_tower.encoder.layers) == 3
    assert sum(p.numel() for p in model.parameters()) < params
    assert torch.equal(_logits(model), want)


@pytest.mark.parametrize("feature_layer", [-2, 2, [-2, -4], [1, 3]])
@pytest.mark.parametrize("removed", [[0], [1], [2], [0, 2], [1, 3]])
def test_vision_block_removal_reads_the_same_stream_point(feature_layer, removed):
    """Reference: the unpruned model with those blocks bypassed by hooks, reading the original index."""
    model = tiny_llava("clip", feature_layer=feature_layer)
    reference = copy.deepcopy(model)
    handles = [
        reference.model.vision_tower.encoder.layers[i].register_forward_hook(
            lambda _m, args, _out: args[0], with_kwargs=False
        )
        for i in removed
    ]
    want = _logits(reference)
    for h in handles:
        h.remove()
    _prune(model, [f"vision.blocks.{i}" for i in removed])
    torch.testing.assert_close(_logits(model), want, atol=1e-6, rtol=0)
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    new = model.config.vision_feature_layer
    new = new if isinstance(new, list) else [new]
    assert [x < 0 for x in new] == [x < 0 for x in layers], "the sign convention of the index is kept"


def test_remap_hidden_state_index():
    assert remap_hidden_state_index(-2, 24, list(range(23))) == -1  # LLaVA-1.5 drops CLIP's last layer
    assert remap_hidden_state_index(-2, 4, [0, 2, 3]) == -2
    assert remap_hidden_state_index(3, 4, [0, 2, 3]) == 2
    assert remap_hidden_state_index(0, 4, [1, 2]) == 0
    with pytest.raises(PlanError, match="out of range"):
        remap_hidden_state_index(-6, 4, [0])


@pytest.mark.parametrize("stage", ["vision.embed", "projector.mlp", "text.embed"])
def test_removing_a_stage_is_a_clear_error(stage):
    model = tiny_llava("clip")
    with pytest.raises(PlanError, match="not a branch on a residual edge.*break the dimensions"):
        _prune(model, [stage])


def test_vision_units_refuse_lsq_repair_with_a_reason():
    model = tiny_llava("clip")
    ir = pk.select_adapter(model).build_ir(model)
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, ir), remove=["vision.blocks.1"], repair="lsq")
    with pytest.raises(PlanError, match="repair none"):
        pk.apply_plan(model, plan, repair_windows=_ids(4, 12))


def test_uniform_vision_and_text_plan_reloads_with_plain_from_pretrained(tmp_path):
    model = _prune(tiny_llava("siglip"), ["vision.blocks.0", "text.blocks.1"])
    out = pk.save_pruned(model, tmp_path / "m")
    plain, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(_logits(plain.eval()), _logits(model))
    loaded = pk.load_pruned(out)
    assert type(loaded) is LlavaForConditionalGeneration
    assert torch.equal(_logits(loaded), _logits(model))
