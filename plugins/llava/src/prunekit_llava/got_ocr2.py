"""The GOT-OCR2 adapter: a SAM ViT, a conv neck, a conv projector and a Qwen2 language model.

``GotOcr2ForConditionalGeneration`` (transformers 5.24) holds:

- ``model.vision_tower``: a Conv2d patch embedding and an absolute position embedding, then SAM ViT
  layers (``x = x + attn(layer_norm1(x)); x = x + mlp(layer_norm2(x))``, windowed attention except in the
  layers ``vision_config.global_attn_indexes``), then the *neck*: 1x1 conv, channel LayerNorm, 3x3 conv,
  channel LayerNorm;
- ``model.multi_modal_projector``: two stride-2 3x3 convs (``output_channels -> 2 * output_channels ->``
  the language model's width) and a linear into the language model;
- ``model.language_model`` with the outer ``lm_head``: a Qwen2 decoder.

Towers: ``vision`` (the SAM blocks on residual edges: removable, ``vision.blocks.3``,
``vision.blocks.3.attn`` / ``.mlp``), ``projector``, and ``text``, which whatever installed adapter
describes Qwen2 maps (the Llama plugin) through :func:`prunekit_core.adapters.compose.map_submodel`.

None of the neck's and projector's convs is on a residual edge: each one's output is the next one's only
input, so removing one breaks the dimensions. They are narrowed instead, as coupled channel groups
(:func:`prunekit_core.adapters.groups.conv_channels`):

- ``vision.neck.conv1.channels``: conv1's out-channels = layer_norm1's features = conv2's in-channels;
- ``vision.neck.conv2.channels``: conv2's out-channels = layer_norm2's features = conv_upsampler1's
  in-channels;
- ``projector.conv_upsampler1.channels``: its out-channels = conv_upsampler2's in-channels;
- ``projector.conv_upsampler2.channels``: its out-channels = the projector linear's in-features.

The config has one count for the first three (``vision_config.output_channels``, and twice that for the
upsampler): cutting conv1 and conv2 to ``k`` channels and conv_upsampler1 to ``2k`` reloads with plain
``from_pretrained``; any other cut (and any cut of conv_upsampler2, whose width the config ties to the
language model's) reloads with :func:`prunekit_core.load_pruned`.

Removing vision blocks renumbers ``vision_config.global_attn_indexes`` so every kept layer keeps its
window (each layer's relative position table is sized for its window) and sets ``num_hidden_layers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit_core.adapters.base import count_params, get_module, hf_config, iter_modules, module_attr
from prunekit_core.adapters.compose import ComposedAdapter, MappedSubmodel, map_submodel
from prunekit_core.adapters.declared import BranchSpec, build_blocks
from prunekit_core.adapters.groups import conv_channels
from prunekit_core.ir.model import ChannelGroup, Connection, Dim, ModelIR, Stage, Tower

if TYPE_CHECKING:
    from prunekit_core.adapters.base import WidthCut

__all__ = ["GotOcr2Adapter"]

SUPPORTED = ("GotOcr2ForConditionalGeneration",)
#: each SAM ViT layer: x = x + attn(layer_norm1(x)); x = x + mlp(layer_norm2(x)). A removed attention hands
#: back zeros shaped like its (window-partitioned) input: the layer un-partitions the windows before adding,
#: which a scalar zero cannot go through
VISION_BRANCHES = (
    BranchSpec(
        name="attn",
        kind="attention",
        module="attn",
        norm="layer_norm1",
        output="tuple",
        full_zero=True,
        out_proj="attn.proj",
    ),
    BranchSpec(name="mlp", kind="mlp", module="mlp", norm="layer_norm2", out_proj="mlp.lin2"),
)
VISION = "model.vision_tower"
NECK = f"{VISION}.neck"
PROJECTOR = "model.multi_modal_projector"
LANGUAGE = "model.language_model"


def _is_got_ocr2(model: nn.Module) -> bool:
    """The module layout of GOT-OCR2, under whatever class name."""
    inner = getattr(model, "model", None)
    vision = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    neck = getattr(vision, "neck", None)
    return (
        isinstance(getattr(vision, "layers", None), nn.ModuleList)
        and all(isinstance(getattr(neck, n, None), nn.Conv2d) for n in ("conv1", "conv2"))
        and all(
            isinstance(getattr(projector, n, None), nn.Conv2d) for n in ("conv_upsampler1", "conv_upsampler2")
        )
        and isinstance(getattr(projector, "multimodal_projector", None), nn.Linear)
        and hasattr(inner, "language_model")
        and hasattr(model, "lm_head")
    )


def neck_channels(model: nn.Module) -> tuple[ChannelGroup, ...]:
    """The neck's two conv-channel families (``vision_config.output_channels`` counts each)."""
    out = {"output_channels": 1}
    return (
        conv_channels(
            "vision.neck.conv1.channels",
            model,
            f"{NECK}.conv1",
            [f"{NECK}.conv2"],
            norms=[f"{NECK}.layer_norm1"],
            config_fields=out,
            config="vision_config",
        ),
        conv_channels(
            "vision.neck.conv2.channels",
            model,
            f"{NECK}.conv2",
            [f"{PROJECTOR}.conv_upsampler1"],
            norms=[f"{NECK}.layer_norm2"],
            config_fields=out,
            config="vision_config",
        ),
    )


def projector_channels(model: nn.Module) -> tuple[ChannelGroup, ...]:
    """The projector's two conv-channel families: conv_upsampler1 has ``2 * output_channels``;
    conv_upsampler2's count is the language model's width, which no vision field can change."""
    return (
        conv_channels(
            "projector.conv_upsampler1.channels",
            model,
            f"{PROJECTOR}.conv_upsampler1",
            [f"{PROJECTOR}.conv_upsampler2"],
            config_fields={"output_channels": 1},
            config="vision_config",
            config_divisor=2,
        ),
        conv_channels(
            "projector.conv_upsampler2.channels",
            model,
            f"{PROJECTOR}.conv_upsampler2",
            [f"{PROJECTOR}.multimodal_projector"],
            in_config=False,
        ),
    )


class GotOcr2Adapter(ComposedAdapter):
    name = "got_ocr2"
    description = (
        "GOT-OCR2 (GotOcr2ForConditionalGeneration): SAM ViT blocks, conv neck and conv projector narrowed "
        "as coupled channel groups, and a language model described by its own plugin"
    )
    supported = SUPPORTED

    def match(self, model: nn.Module) -> float | None:
        if type(model).__name__ in self.supported:
            return 100.0
        return 10.0 if _is_got_ocr2(model) else None

    def submodels(self, model: nn.Module) -> list[MappedSubmodel]:
        return [map_submodel(model, LANGUAGE, prefix="text", head="lm_head")]

    def own_towers(self, model: nn.Module) -> list[Tower]:
        vision = get_module(model, VISION)
        vconf = hf_config(model).vision_config
        layers = list(iter_modules(get_module(vision, "layers")))
        blocks = build_blocks(layers, f"{VISION}.layers", [VISION_BRANCHES] * len(layers), tower="vision")
        stages = [
            Stage(
                id="vision.patch_embed",
                kind="stem",
                module=f"{VISION}.patch_embed",
                params=count_params([get_module(vision, "patch_embed")]),
            )
        ]
        if isinstance(vision.pos_embed, nn.Parameter):
            stages.append(
                Stage(
                    id="vision.pos_embed",
                    kind="embedding",
                    module=f"{VISION}.pos_embed",
                    params=vision.pos_embed.numel(),
                )
            )
        stages.append(
            Stage(
                id="vision.neck",
                kind="neck",
                module=NECK,
                params=count_params([get_module(vision, "neck")]),
                channel_groups=neck_channels(model),
            )
        )
        projector = get_module(model, PROJECTOR)
        return [
            Tower(
                name="vision",
                width=Dim(name="hidden", size=vconf.hidden_size),
                blocks_path=f"{VISION}.layers",
                blocks=blocks,
                stages=tuple(stages),
            ),
            Tower(
                name="projector",
                width=Dim(
                    name="channels",
                    size=module_attr(get_module(projector, "conv_upsampler1"), "out_channels"),
                ),
                blocks_path=PROJECTOR,
                blocks=(),
                stages=(
                    Stage(
                        id="projector",
                        kind="projector",
                        module=PROJECTOR,
                        params=count_params([projector]),
                        channel_groups=projector_channels(model),
                    ),
                ),
            ),
        ]

    def calibration_inputs(
        self, model: nn.Module, windows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As for LLaVA: each window starts with one image's placeholder tokens, and the images are
        scikit-image's sample photographs (CLIP normalisation, which GOT-OCR2's image processor uses too)."""
        from .adapter import LlavaAdapter

        # LLaVA's method, borrowed: it reads only the model and its config, nothing of LlavaAdapter's own
        return LlavaAdapter.calibration_inputs(self, model, windows)  # type: ignore[arg-type]  # see above

    def connections(self, model: nn.Module) -> list[Connection]:
        neck = get_module(model, NECK)
        projector = get_module(model, PROJECTOR)
        return [
            Connection(
                source="vision",
                target="projector",
                dim=module_attr(get_module(neck, "conv2"), "out_channels"),
            ),
            Connection(
                source="projector",
                target="text",
                dim=module_attr(get_module(projector, "multimodal_projector"), "out_features"),
            ),
        ]

    def tower_configs(self, model: nn.Module) -> dict[str, Any]:
        return {"vision": hf_config(model).vision_config, "text": self.text_config(model)}

    def finalize_own_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        kept = kept_blocks.get("vision")
        if kept is None:
            return
        # the layers keep their window sizes; the config must say which of them attend globally, or a model
        # built from it gives a kept layer the wrong window (and a wrongly sized position table)
        remap = {old: new for new, old in enumerate(kept)}
        for vconf in _vision_configs(model):
            globals_ = vconf.global_attn_indexes
            vconf.global_attn_indexes = type(globals_)(remap[i] for i in globals_ if i in remap)
            vconf.num_hidden_layers = len(kept)

    def finalize_width(self, model: nn.Module, ir_before: ModelIR, cuts: dict[str, WidthCut]) -> None:
        """The core set ``vision_config.output_channels`` from the conv families; hand the text tower's
        cuts to its adapter and keep the vision tower's own config in step."""
        own = ir_before.stage_channel_groups()
        super().finalize_width(model, ir_before, {f: c for f, c in cuts.items() if f not in own})
        configs = _vision_configs(model)
        for vconf in configs[1:]:
            vconf.output_channels = configs[0].output_channels


def _vision_configs(model: nn.Module) -> list[Any]:
    """The vision config and, when it is another object, the one the vision tower holds."""
    out = [hf_config(model).vision_config]
    own = getattr(get_module(model, VISION), "config", None)
    if own is not None and own is not out[0]:
        out.append(own)
    return out
