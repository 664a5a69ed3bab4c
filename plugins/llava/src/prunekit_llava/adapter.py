"""The LLaVA adapter: a vision tower, a multi-modal projector and a language model, as three IR towers.

``LlavaForConditionalGeneration`` (transformers 5.24) holds ``model.vision_tower`` (a CLIP or SigLIP
vision model: a Conv2d patch embedding, a pre-norm ViT encoder, post norm, optional pooling head),
``model.multi_modal_projector`` (two linears that map the chosen vision hidden state to the language
model's width) and ``model.language_model`` with the outer ``lm_head``.

- ``vision``: the encoder blocks (``vision.blocks.3``, ``vision.blocks.3.attn`` / ``.mlp``); the patch
  embedding, position embeddings and norms are stages, never removed.
- ``projector``: a stage between the towers (not on a residual edge: removing it breaks the dimensions).
- ``text``: whatever installed adapter describes the language model (the Llama plugin for Llama, Mistral,
  Qwen2; Mixtral's for MoE), through :func:`prunekit_core.adapters.compose.map_submodel`. Nothing about decoders is
  repeated here.

Removing vision blocks moves ``vision_feature_layer`` so the projector reads the same point of the
stream; ``vision_config.num_hidden_layers`` follows the stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit_core.adapters.base import count_params, get_module, hf_config, hf_model, module_attr
from prunekit_core.adapters.compose import ComposedAdapter, MappedSubmodel, map_submodel
from prunekit_core.adapters.declared import BranchSpec, build_blocks
from prunekit_core.adapters.vision import image_features, remap_hidden_state_index
from prunekit_core.ir.errors import CalibrationError
from prunekit_core.ir.model import Connection, Dim, ModelIR, Stage, Tower

SUPPORTED = ("LlavaForConditionalGeneration",)
VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LANGUAGE = "model.language_model"
#: vision-model stages: attribute -> (stage id suffix, kind)
_VISION_STAGES = {
    "embeddings": ("embed", "stem"),
    "pre_layrnorm": ("pre_norm", "norm"),
    "post_layernorm": ("post_norm", "norm"),
    "head": ("head", "head"),
}
#: each CLIP/SigLIP encoder layer: x = x + self_attn(layer_norm1(x)); x = x + mlp(layer_norm2(x)); no KV cache
VISION_BRANCHES = (
    BranchSpec(
        name="attn",
        kind="attention",
        module="self_attn",
        norm="layer_norm1",
        output="tuple",
        out_proj="self_attn.out_proj",
    ),
    BranchSpec(name="mlp", kind="mlp", module="mlp", norm="layer_norm2", out_proj="mlp.fc2"),
)


def _vision_layers(vision: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


class LlavaAdapter(ComposedAdapter):
    name = "llava"
    description = (
        "LLaVA vision-language models (LlavaForConditionalGeneration): CLIP/SigLIP vision tower, projector, "
        "and a language model described by its own plugin"
    )
    supported = SUPPORTED

    def match(self, model: nn.Module) -> float | None:
        if type(model).__name__ in self.supported:
            return 100.0
        inner: Any = getattr(model, "model", None)
        if (
            all(hasattr(inner, n) for n in ("vision_tower", "multi_modal_projector", "language_model"))
            and _vision_layers(inner.vision_tower) is not None
            and hasattr(model, "lm_head")
        ):
            return 10.0
        return None

    def submodels(self, model: nn.Module) -> list[MappedSubmodel]:
        return [map_submodel(model, LANGUAGE, prefix="text", head="lm_head")]

    def own_towers(self, model: nn.Module) -> list[Tower]:
        vision = get_module(model, VISION)
        layers = _vision_layers(vision)
        if layers is None:
            raise ValueError(f"{type(vision).__name__} has no encoder.layers; not a CLIP/SigLIP vision tower")
        vconf = hf_config(model).vision_config
        stages = tuple(
            Stage(id=f"vision.{sid}", kind=kind, module=f"{VISION}.{attr}", params=count_params([mod]))
            for attr, (sid, kind) in _VISION_STAGES.items()
            if isinstance(mod := getattr(vision, attr, None), nn.Module)
        )
        projector = get_module(model, PROJECTOR)
        text_hidden = hf_config(model).get_text_config(decoder=True).hidden_size
        return [
            Tower(
                name="vision",
                width=Dim(name="hidden", size=vconf.hidden_size),
                blocks_path=f"{VISION}.encoder.layers",
                blocks=build_blocks(
                    layers, f"{VISION}.encoder.layers", [VISION_BRANCHES] * len(layers), tower="vision"
                ),
                stages=stages,
            ),
            Tower(
                name="projector",
                width=Dim(name="hidden", size=text_hidden),
                blocks_path=PROJECTOR,
                blocks=(),
                stages=(
                    Stage(
                        id="projector.mlp",
                        kind="projector",
                        module=PROJECTOR,
                        params=count_params([projector]),
                    ),
                ),
            ),
        ]

    def connections(self, model: nn.Module) -> list[Connection]:
        config = hf_config(model)
        layers = config.vision_feature_layer
        n = len(layers) if isinstance(layers, (list, tuple)) else 1
        text_hidden = config.get_text_config(decoder=True).hidden_size
        return [
            Connection(source="vision", target="projector", dim=config.vision_config.hidden_size * n),
            Connection(source="projector", target="text", dim=text_hidden),
        ]

    def calibration_inputs(
        self, model: nn.Module, windows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each window starts with one image's placeholder tokens; the images are scikit-image's samples."""
        from .images import vision_pixel_values

        pixel_values = vision_pixel_values(hf_config(model).vision_config, windows.shape[0])
        with torch.no_grad():
            n_image = image_features(model, pixel_values[:1]).shape[0]
        if windows.shape[1] < n_image + 2:
            raise CalibrationError(
                f"calibration windows of {windows.shape[1]} tokens cannot hold an image ({n_image} tokens) and "
                f"text: use --seq-len {n_image + 64} or more"
            )
        ids = windows.clone()
        ids[:, :n_image] = hf_config(model).image_token_id
        return ids, {"pixel_values": pixel_values.to(hf_model(model).dtype)}

    def tower_configs(self, model: nn.Module) -> dict[str, Any]:
        return {"vision": hf_config(model).vision_config, "text": self.text_config(model)}

    def finalize_own_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        kept = kept_blocks.get("vision")
        if kept is None:
            return
        n_before = len(ir_before.tower("vision").blocks)
        top = hf_config(model)
        configs = {id(c): c for c in (top, getattr(hf_model(model).model, "config", top))}
        for config in configs.values():
            layer = config.vision_feature_layer
            if isinstance(layer, (list, tuple)):
                config.vision_feature_layer = type(layer)(
                    remap_hidden_state_index(i, n_before, kept) for i in layer
                )
            else:
                config.vision_feature_layer = remap_hidden_state_index(layer, n_before, kept)
        vision_configs = {
            id(c): c
            for c in (hf_config(model).vision_config, module_attr(get_module(model, VISION), "config"))
        }
        for vconf in vision_configs.values():
            vconf.num_hidden_layers = len(kept)
