"""Hugging Face decoders laid out like Llama, described once for every plugin that meets the layout.

``model.model.layers[i]`` computes ``x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))``;
``self_attn`` has ``q/k/v/o_proj`` and owns the KV-cache slot ``layer_idx`` (it returns a 2-tuple, so its
stand-in must too); the stack sits between ``model.embed_tokens`` and ``model.norm`` + ``lm_head``. Llama,
Mistral, Qwen2, Mixtral and Qwen2-MoE share this; they differ in what ``mlp`` is, which a plugin says by
overriding :meth:`LlamaLayoutAdapter.mlp_sublayer` (and :meth:`~LlamaLayoutAdapter.is_mlp` for matching).
"""

from __future__ import annotations

from torch import nn

from .adapter import DecoderAdapter, RemovedBranch, count_params, get_module, hf_model, module_tensor
from .groups import attention_kv_groups, gated_mlp_channels
from .ir import Block, Dim, ModelIR, ResidualEdge, Stage, Sublayer, Tower

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")


def is_gated_mlp(module: nn.Module) -> bool:
    """A dense gated MLP with ``gate_proj``, ``up_proj`` and ``down_proj``."""
    return all(hasattr(module, n) for n in _GATED_MLP)


class LlamaLayoutAdapter(DecoderAdapter):
    """Matching and IR for the Llama layout; subclasses set ``supported`` and describe their ``mlp``."""

    #: model class names matched exactly (score 100)
    supported: tuple[str, ...] = ()

    def is_mlp(self, module: nn.Module) -> bool:
        """Whether ``module`` is an MLP branch this adapter describes (default: a dense gated MLP)."""
        return is_gated_mlp(module)

    def is_model(self, layers: nn.ModuleList) -> bool:
        """A further structural condition on the whole stack (default: none)."""
        return True

    def mlp_sublayer(
        self, bid: str, path: str, mlp: nn.Module, norm: str, edge: ResidualEdge, params: int
    ) -> Sublayer:
        """The IR of layer ``bid``'s live MLP branch at ``path`` (default: a dense gated MLP)."""
        return Sublayer(
            id=f"{bid}.mlp",
            kind="mlp",
            module=path,
            norm=norm,
            output="tensor",
            residual=edge,
            params=params,
            out_proj=f"{path}.down_proj",
            channel_groups=(gated_mlp_channels(f"{bid}.mlp.channels", path, mlp, "intermediate_size"),),
        )

    def _is_layer(self, layer: nn.Module) -> bool:
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        attn_ok = isinstance(attn, RemovedBranch) or (
            attn is not None and all(hasattr(attn, n) for n in _ATTN)
        )
        mlp_ok = isinstance(mlp, RemovedBranch) or (mlp is not None and self.is_mlp(mlp))
        return (
            attn_ok
            and mlp_ok
            and hasattr(layer, "input_layernorm")
            and hasattr(layer, "post_attention_layernorm")
        )

    def match(self, model: nn.Module) -> float | None:
        if type(model).__name__ in self.supported:
            return 100.0
        layers = getattr(getattr(model, "model", None), "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and all(self._is_layer(layer) for layer in layers)
            and self.is_model(layers)
            and hasattr(model, "lm_head")
            and hasattr(getattr(model, "config", None), "num_hidden_layers")
        ):
            return 10.0  # same layout under another class name
        return None

    def build_ir(self, model: nn.Module) -> ModelIR:
        config = self.text_config(model)
        blocks: list[Block] = []
        point = 0
        for i, layer in enumerate(hf_model(model).model.layers):
            bid = f"text.blocks.{i}"
            path = f"model.layers.{i}"
            subs: list[Sublayer] = []
            if not isinstance(layer.self_attn, RemovedBranch):
                subs.append(
                    Sublayer(
                        id=f"{bid}.attn",
                        kind="attention",
                        module=f"{path}.self_attn",
                        norm=f"{path}.input_layernorm",
                        output="tuple",
                        residual=ResidualEdge(stream="text", source=point, target=point + 1),
                        params=count_params([layer.self_attn, layer.input_layernorm]),
                        out_proj=f"{path}.self_attn.o_proj",
                        uses_cache=True,
                        channel_groups=(
                            attention_kv_groups(
                                f"{bid}.attn.kv_groups", f"{path}.self_attn", layer.self_attn, config
                            ),
                        ),
                    )
                )
                point += 1
            if not isinstance(layer.mlp, RemovedBranch):
                edge = ResidualEdge(stream="text", source=point, target=point + 1)
                params = count_params([layer.mlp, layer.post_attention_layernorm])
                norm = f"{path}.post_attention_layernorm"
                subs.append(self.mlp_sublayer(bid, f"{path}.mlp", layer.mlp, norm, edge, params))
                point += 1
            blocks.append(
                Block(id=bid, index=i, module=path, sublayers=tuple(subs), params=count_params([layer]))
            )
        embed = hf_model(model).get_input_embeddings()
        head = hf_model(model).get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        stages = (
            Stage(
                id="text.embed",
                kind="embedding",
                module="model.embed_tokens",
                params=module_tensor(embed, "weight").numel(),
            ),
            Stage(
                id="text.norm",
                kind="norm",
                module="model.norm",
                params=count_params([get_module(model, "model.norm")]),
            ),
            Stage(
                id="text.head",
                kind="head",
                module="lm_head",
                params=0 if tied else count_params([head]),
                tied_to="text.embed" if tied else None,
            ),
        )
        tower = Tower(
            name="text",
            width=Dim(name="hidden", size=config.hidden_size),
            blocks_path="model.layers",
            blocks=tuple(blocks),
            stages=stages,
            final_norm="model.norm",
            head="lm_head",
        )
        return ModelIR(
            architecture=type(model).__name__,
            model_type=str(getattr(config, "model_type", "")),
            adapter=self.name,
            towers=(tower,),
            total_params=count_params([model]),
        )
