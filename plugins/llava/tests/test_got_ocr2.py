"""GOT-OCR2 on a tiny random model: SAM blocks, the conv neck and conv projector, composed Qwen2 text.

Every surgery is compared with a reference computed without prunekit's surgery, through the whole model
with an image in the prompt: a removed SAM block equals the block bypassed by a hook, a removed branch
equals its output zeroed; narrowing a projector conv equals zeroing its removed out-channels (nothing
between it and the next layer mixes channels); narrowing a neck conv, where a channel LayerNorm follows and
its statistics change, equals the neck and projector written out by hand at the narrower width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from prunekit_llava.got_ocr2 import NECK, PROJECTOR, VISION, GotOcr2Adapter
from torch import nn
from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import prunekit_core as pk
from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.registry.plugins import select_adapter
from prunekit_core.surgery.width import config_describes_shapes
from prunekit_core.testing import (  # the kit's hook references: bypassed block, zeroed branch
    _skipped,
    _zeroed,
)

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1  # the last id: random text ids are drawn below it
IMAGE_TOKENS = 4  # 64 px / patch 8 = 8x8 grid; two stride-2 convs: 2x2 tokens
ADAPTER = GotOcr2Adapter()


def make_got(seed: int = 0) -> GotOcr2ForConditionalGeneration:
    """A tiny GOT-OCR2: 4 SAM layers (windows of 4, layers 1 and 3 global), neck of 8 channels, projector
    8 -> 16 -> 32, a 3-layer Qwen2 of width 32. Seeded and initialised with weights far from zero (the
    vision config's own initializer_range is 1e-10, which would make every vision check trivial)."""
    config = GotOcr2Config(
        vision_config=dict(
            hidden_size=32,
            output_channels=8,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1, 3],
            mlp_dim=48,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=IMAGE_TOKENS,
    )
    torch.manual_seed(seed)
    model = GotOcr2ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.vision_tower", "model.multi_modal_projector")):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1 or "pos" in name:  # biases, position tables
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))
    return model


def inputs(batch: int = 2, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with one image (``IMAGE_TOKENS`` placeholders after the first token) per row, and pixels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN, (batch, length), generator=gen)
    ids[:, 1 : 1 + IMAGE_TOKENS] = IMAGE_TOKEN
    return ids, torch.randn(batch, 3, 64, 64, generator=gen)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor | None, **kw: object) -> torch.Tensor:
    return model(input_ids=ids, pixel_values=pixels, use_cache=False, **kw).logits


def prune(
    model: nn.Module, remove: Sequence[str] = (), groups: dict[str, list[int]] | None = None
) -> nn.Module:
    ir = ADAPTER.build_ir(model)
    plan = PrunePlan(fingerprint=fingerprint(model, ir), remove=list(remove), remove_groups=groups or {})
    return pk.apply_plan(model, plan, adapter=ADAPTER).model


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the IR ----------------------------------------------------------------------------------------------


def test_ir_towers_units_and_connections() -> None:
    model = make_got()
    assert isinstance(select_adapter(model), GotOcr2Adapter)
    ir = ADAPTER.build_ir(model)
    assert [t.name for t in ir.towers] == ["vision", "projector", "text"]
    vision = ir.tower("vision")
    assert [b.id for b in vision.blocks] == [f"vision.blocks.{i}" for i in range(4)]
    assert {s.id for s in vision.blocks[3].sublayers} == {"vision.blocks.3.attn", "vision.blocks.3.mlp"}
    assert [st.id for st in vision.stages] == ["vision.patch_embed", "vision.pos_embed", "vision.neck"]
    assert [b.id for b in ir.tower("text").blocks] == ["text.blocks.0", "text.blocks.1", "text.blocks.2"]
    stage_fams = ir.stage_channel_groups()
    assert {f: (s.id, g.count) for f, (s, g) in stage_fams.items()} == {
        "vision.neck.conv1.channels": ("vision.neck", 8),
        "vision.neck.conv2.channels": ("vision.neck", 8),
        "projector.conv_upsampler1.channels": ("projector", 16),
        "projector.conv_upsampler2.channels": ("projector", 32),
    }
    conv1 = stage_fams["vision.neck.conv1.channels"][1]
    assert {(m.param.removeprefix(NECK + "."), m.axis) for m in conv1.members} == {
        ("conv1.weight", 0),
        ("layer_norm1.weight", 0),
        ("layer_norm1.bias", 0),
        ("conv2.weight", 1),
    }
    assert conv1.params_per_group == 32 + 2 + 8 * 9  # conv1 row (1x1 over 32), norm scale+shift, conv2 column
    assert [(c.source, c.target, c.dim) for c in ir.connections] == [
        ("vision", "projector", 8),
        ("projector", "text", 32),
    ]
    assert "text.blocks.0.mlp.channels" in ir.channel_groups()  # the Llama plugin's families, composed


# --- SAM blocks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed", [[0], [1], [3], [1, 2]])
def test_vision_block_removal_equals_skipped_block(removed: list[int]) -> None:
    """Windowed (0, 2) and global (1, 3) blocks: the pruned model equals the full one with those blocks
    bypassed, and the config keeps every kept layer's window."""
    ids, pixels = inputs()
    reference = make_got()
    with _skipped(reference, [f"{VISION}.layers.{i}" for i in removed]):
        want = logits(reference, ids, pixels)
    model = prune(make_got(), [f"vision.blocks.{i}" for i in removed])
    torch.testing.assert_close(logits(model, ids, pixels), want, atol=1e-6, rtol=0)
    kept = [i for i in range(4) if i not in removed]
    vconf = model.config.vision_config
    assert vconf.num_hidden_layers == len(kept) == len(model.model.vision_tower.layers)
    assert list(vconf.global_attn_indexes) == [n for n, old in enumerate(kept) if old in (1, 3)]
    fresh = GotOcr2ForConditionalGeneration(copy.deepcopy(model.config))
    assert [layer.window_size for layer in fresh.model.vision_tower.layers] == [
        layer.window_size for layer in model.model.vision_tower.layers
    ]
    assert numel(fresh) == numel(model)


@pytest.mark.parametrize("unit", ["vision.blocks.0.attn", "vision.blocks.1.attn", "vision.blocks.2.mlp"])
def test_vision_branch_removal_equals_zeroed_branch(unit: str) -> None:
    """A windowed attention (whose output is un-partitioned before the add), a global one, an MLP."""
    ids, pixels = inputs()
    reference = make_got()
    path = ADAPTER.build_ir(reference).units()[unit].module
    with _zeroed(reference, [path]):
        want = logits(reference, ids, pixels)
    model = prune(make_got(), [unit])
    torch.testing.assert_close(logits(model, ids, pixels), want, atol=1e-6, rtol=0)
    assert not torch.allclose(want, logits(make_got(), ids, pixels), atol=1e-4), "the branch did nothing"


# --- conv channels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "producer"),
    [
        ("projector.conv_upsampler1.channels", f"{PROJECTOR}.conv_upsampler1"),
        ("projector.conv_upsampler2.channels", f"{PROJECTOR}.conv_upsampler2"),
    ],
)
def test_projector_channels_equal_zeroed_contribution(family: str, producer: str) -> None:
    """No normalisation between a projector conv and the next layer: removing out-channels equals zeroing
    them at the producer (they then contribute nothing to the next conv or the linear)."""
    ids, pixels = inputs()
    removed = [0, 3, 7]
    reference = make_got()
    with torch.no_grad():
        reference.get_submodule(producer).weight[removed] = 0
    model = make_got()
    before = numel(model)
    fam = ADAPTER.build_ir(model).stage_channel_groups()[family][1]
    prune(model, groups={family: removed})
    torch.testing.assert_close(logits(model, ids, pixels), logits(reference, ids, pixels), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, ids, pixels), logits(make_got(), ids, pixels), atol=1e-4)
    assert numel(model) == before - len(removed) * fam.params_per_group
    assert model.get_submodule(producer).out_channels == fam.count - len(removed)
    assert ADAPTER.build_ir(model).stage_channel_groups()[family][1].count == fam.count - len(removed)


def _channel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW map, written out."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


@torch.no_grad()
def _narrow_image_features(
    model: GotOcr2ForConditionalGeneration, pixels: torch.Tensor, keep1: list[int], keep2: list[int]
) -> torch.Tensor:
    """The full model's image features with the neck's conv1 reduced to channels ``keep1`` and conv2 to
    ``keep2``: the neck and projector written with functional ops on slices of the full weights."""
    vision = model.model.vision_tower
    neck, proj = vision.neck, model.model.multi_modal_projector
    x = vision.patch_embed(pixels) + vision.pos_embed
    for layer in vision.layers:
        x = layer(x)
    x = x.permute(0, 3, 1, 2)
    x = F.conv2d(x, neck.conv1.weight[keep1])
    x = _channel_norm(x, neck.layer_norm1.weight[keep1], neck.layer_norm1.bias[keep1], neck.layer_norm1.eps)
    x = F.conv2d(x, neck.conv2.weight[keep2][:, keep1], padding=1)
    x = _channel_norm(x, neck.layer_norm2.weight[keep2], neck.layer_norm2.bias[keep2], neck.layer_norm2.eps)
    x = F.conv2d(x, proj.conv_upsampler1.weight[:, keep2], stride=2, padding=1)
    x = F.conv2d(x, proj.conv_upsampler2.weight, stride=2, padding=1)
    return F.linear(
        x.flatten(2).transpose(1, 2), proj.multimodal_projector.weight, proj.multimodal_projector.bias
    )


@pytest.mark.parametrize(
    "groups",
    [
        {"vision.neck.conv1.channels": [1, 6]},
        {"vision.neck.conv2.channels": [0, 2, 5]},
        {"vision.neck.conv1.channels": [7], "vision.neck.conv2.channels": [3]},
    ],
)
def test_neck_channels_through_layernorm_equal_a_narrower_forward(groups: dict[str, list[int]]) -> None:
    """A channel LayerNorm follows each neck conv: removing channels changes its statistics, so the
    reference is the neck written out at the narrower width (zeroing would be measurably different)."""
    ids, pixels = inputs()
    keep1 = [c for c in range(8) if c not in groups.get("vision.neck.conv1.channels", [])]
    keep2 = [c for c in range(8) if c not in groups.get("vision.neck.conv2.channels", [])]
    full = make_got().double()
    features = _narrow_image_features(full, pixels.double(), keep1, keep2)
    model = prune(make_got(), groups=groups).double()
    with torch.no_grad():
        got = model.model.get_image_features(pixel_values=pixels.double()).pooler_output
    torch.testing.assert_close(got, features, atol=1e-10, rtol=0)
    # and through the language model: the full model fed those features gives the pruned model's logits
    want = logits(
        full, ids, None, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}
    )
    torch.testing.assert_close(logits(model, ids, pixels.double()), want, atol=1e-10, rtol=0)
    zeroed = make_got().double()
    with torch.no_grad():
        fid, removed = next(iter(groups.items()))
        zeroed.get_submodule(f"{NECK}.{fid.split('.')[2]}").weight[removed] = 0
        assert not torch.allclose(
            zeroed.model.get_image_features(pixel_values=pixels.double()).pooler_output, got
        )
    assert model.model.vision_tower.neck.layer_norm1.normalized_shape == (len(keep1),)
    assert model.model.multi_modal_projector.conv_upsampler1.in_channels == len(keep2)


# --- config, reload, cached decoding ---------------------------------------------------------------------

UNIFORM_CONV = {
    "vision.neck.conv1.channels": [0, 5],
    "vision.neck.conv2.channels": [1, 2],
    "projector.conv_upsampler1.channels": [3, 4, 9, 15],
}


def test_uniform_conv_cut_reloads_with_plain_from_pretrained(tmp_path) -> None:  # noqa: ANN001
    """conv1 and conv2 at k channels and conv_upsampler1 at 2k: vision_config.output_channels = k
    describes the model, plain from_pretrained rebuilds it, vision blocks removed in the same plan."""
    ids, pixels = inputs()
    model = prune(make_got(), ["vision.blocks.2"], UNIFORM_CONV)
    assert model.config.vision_config.output_channels == 6 and config_describes_shapes(model)
    fresh = GotOcr2ForConditionalGeneration(copy.deepcopy(model.config))
    assert numel(fresh) == numel(model)
    out = pk.save_pruned(model, tmp_path / "uniform")
    plain, info = GotOcr2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(plain.eval(), ids, pixels), logits(model, ids, pixels), atol=0, rtol=0)


@pytest.mark.parametrize(
    "groups",
    [
        {"vision.neck.conv1.channels": [2]},  # conv1 and conv2 differ: one field cannot say both
        {"projector.conv_upsampler1.channels": [0]},  # 15 channels: not 2 * output_channels
        {"projector.conv_upsampler2.channels": [1, 30]},  # the linear's input: no config field
    ],
)
def test_per_layer_conv_cut_reloads_with_load_pruned(tmp_path, groups: dict[str, list[int]]) -> None:  # noqa: ANN001
    ids, pixels = inputs()
    model = make_got()
    ir = ADAPTER.build_ir(model)
    plan = PrunePlan(fingerprint=fingerprint(model, ir), remove=["text.blocks.1.mlp"], remove_groups=groups)
    applied = pk.apply_plan(model, plan, adapter=ADAPTER)
    assert not applied.plan.width_uniform and not config_describes_shapes(model)
    out = pk.save_pruned(model, tmp_path / "per_layer", plan=applied.plan)
    loaded = pk.load_pruned(out)
    assert type(loaded) is GotOcr2ForConditionalGeneration
    torch.testing.assert_close(logits(loaded, ids, pixels), logits(model, ids, pixels), atol=0, rtol=0)
    assert pk.read_plan(out).remove_groups == groups


@torch.no_grad()
def test_cached_generation_matches_full_forward_after_every_kind_of_cut() -> None:
    """Vision blocks, a vision branch, conv channels, a text block and text width in one plan: decoding
    token by token from a prefill that holds the image equals one full forward."""
    ids, pixels = inputs(length=14)
    groups = {**UNIFORM_CONV, "projector.conv_upsampler2.channels": [4], "text.blocks.2.mlp.channels": [0, 9]}
    model = prune(make_got(), ["vision.blocks.0", "vision.blocks.3.mlp", "text.blocks.0"], groups)
    full = logits(model, ids, pixels)
    prefill = 8
    out = model(input_ids=ids[:, :prefill], pixel_values=pixels, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], full[:, prefill - 1], atol=1e-5, rtol=0)
    cache = out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.past_key_values
        torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=1e-5, rtol=0)
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 3)


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "hint"),
    [
        ("vision.neck", "vision.neck.conv1.channels"),
        ("vision.neck.conv1", "vision.neck.conv1.channels"),
        ("projector.conv_upsampler1", "projector.conv_upsampler1.channels"),
        ("projector", "projector.conv_upsampler2.channels"),
    ],
)
def test_removing_a_conv_stage_is_refused_with_the_reason(unit: str, hint: str) -> None:
    model = make_got()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        PlanError, match=r"not a branch on a residual edge.*break the dimensions.*Narrow it instead"
    ) as err:
        prune(model, [unit])
    assert hint in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_removing_every_channel_of_a_conv_is_refused() -> None:
    with pytest.raises(PlanError, match="cannot be removed.*keep at least one channel"):
        prune(make_got(), groups={"vision.neck.conv2.channels": list(range(8))})


def test_lsq_repair_leaves_conv_stages_to_plain_slicing() -> None:
    """A plan with repair=lsq refits the narrowed text MLP's down projection on the calibration windows;
    the conv stages have no output projection to refit and are sliced as without repair."""
    ids, pixels = inputs()
    groups = {"projector.conv_upsampler1.channels": [2, 5], "text.blocks.1.mlp.channels": [0, 7]}
    base = make_got()
    ir = ADAPTER.build_ir(base)
    plan = PrunePlan(fingerprint=fingerprint(base, ir), remove=[], remove_groups=groups, repair="lsq")
    repaired = pk.apply_plan(
        base, plan, adapter=ADAPTER, repair_windows=inputs(batch=16, length=24, seed=3)[0]
    ).model
    plain = prune(make_got(), groups=groups)
    conv = f"{PROJECTOR}.conv_upsampler2.weight"
    assert torch.equal(repaired.get_parameter(conv), plain.get_parameter(conv))
    down = "model.language_model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(repaired.get_parameter(down), plain.get_parameter(down))
    assert logits(repaired, ids, pixels).isfinite().all()
