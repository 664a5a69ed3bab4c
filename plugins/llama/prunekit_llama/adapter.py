"""The Llama-family adapter: ``model.model.layers[i]`` with ``self_attn`` and ``mlp`` on two residual edges.

Each decoder layer computes ``x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))``.
Attention returns a 2-tuple, so its stand-in must too; attention owns the KV-cache slot ``self_attn.layer_idx``.
"""

from __future__ import annotations

from torch import nn

from prunekit_core.adapter import DecoderAdapter, count_params, get_module
from prunekit_core.ir import (
    Block,
    ChannelGroup,
    Dim,
    GroupMember,
    ModelIR,
    ResidualEdge,
    Stage,
    Sublayer,
    Tower,
)
from prunekit_core.surgery import RemovedBranch

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _is_llama_layer(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    attn_ok = isinstance(attn, RemovedBranch) or (attn is not None and all(hasattr(attn, n) for n in _ATTN))
    mlp_ok = isinstance(mlp, RemovedBranch) or (mlp is not None and all(hasattr(mlp, n) for n in _MLP))
    return (
        attn_ok
        and mlp_ok
        and hasattr(layer, "input_layernorm")
        and hasattr(layer, "post_attention_layernorm")
    )


class LlamaFamilyAdapter(DecoderAdapter):
    name = "llama"
    description = "Llama-family dense decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"

    def match(self, model: nn.Module) -> float | None:
        if type(model).__name__ in SUPPORTED:
            return 100.0
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and all(_is_llama_layer(layer) for layer in layers)
            and hasattr(model, "lm_head")
            and hasattr(getattr(model, "config", None), "num_hidden_layers")
        ):
            return 10.0  # same layout under another class name
        return None

    def build_ir(self, model: nn.Module) -> ModelIR:
        config = self.text_config(model)
        layers = model.model.layers
        hidden = config.hidden_size
        blocks: list[Block] = []
        point = 0
        for i, layer in enumerate(layers):
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
                        channel_groups=(self._kv_groups(bid, path, layer.self_attn, config),),
                    )
                )
                point += 1
            if not isinstance(layer.mlp, RemovedBranch):
                subs.append(
                    Sublayer(
                        id=f"{bid}.mlp",
                        kind="mlp",
                        module=f"{path}.mlp",
                        norm=f"{path}.post_attention_layernorm",
                        output="tensor",
                        residual=ResidualEdge(stream="text", source=point, target=point + 1),
                        params=count_params([layer.mlp, layer.post_attention_layernorm]),
                        out_proj=f"{path}.mlp.down_proj",
                        channel_groups=(self._ffn_channels(bid, path, layer.mlp),),
                    )
                )
                point += 1
            blocks.append(
                Block(id=bid, index=i, module=path, sublayers=tuple(subs), params=count_params([layer]))
            )
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        stages = (
            Stage(
                id="text.embed", kind="embedding", module="model.embed_tokens", params=embed.weight.numel()
            ),
            Stage(id="text.norm", kind="norm", module="model.norm", params=count_params([model.model.norm])),
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
            width=Dim(name="hidden", size=hidden),
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

    @staticmethod
    def _kv_groups(bid: str, path: str, attn: nn.Module, config: object) -> ChannelGroup:
        """One group per KV head: its k/v rows, its query heads' q rows and the matching o columns."""
        q, k = attn.q_proj, attn.k_proj
        head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_kv = k.out_features // head_dim
        q_per_kv = q.out_features // head_dim // n_kv
        members = [
            GroupMember(param=f"{path}.self_attn.q_proj.weight", axis=0, width=head_dim * q_per_kv),
            GroupMember(param=f"{path}.self_attn.k_proj.weight", axis=0, width=head_dim),
            GroupMember(param=f"{path}.self_attn.v_proj.weight", axis=0, width=head_dim),
            GroupMember(param=f"{path}.self_attn.o_proj.weight", axis=1, width=head_dim * q_per_kv),
        ]
        for proj, width in (("q_proj", head_dim * q_per_kv), ("k_proj", head_dim), ("v_proj", head_dim)):
            if getattr(attn, proj).bias is not None:
                members.append(GroupMember(param=f"{path}.self_attn.{proj}.bias", axis=0, width=width))
        per_group = sum(m.width * _other_dim(attn, m.param, m.axis) for m in members)
        return ChannelGroup(
            id=f"{bid}.attn.kv_groups",
            kind="kv_group",
            count=n_kv,
            members=tuple(members),
            params_per_group=per_group,
            config_fields={"num_key_value_heads": 1, "num_attention_heads": q_per_kv},
        )

    @staticmethod
    def _ffn_channels(bid: str, path: str, mlp: nn.Module) -> ChannelGroup:
        inter = mlp.gate_proj.out_features
        hidden = mlp.gate_proj.in_features
        members = [
            GroupMember(param=f"{path}.mlp.gate_proj.weight", axis=0, width=1),
            GroupMember(param=f"{path}.mlp.up_proj.weight", axis=0, width=1),
            GroupMember(param=f"{path}.mlp.down_proj.weight", axis=1, width=1),
        ]
        biases = [p for p in ("gate_proj", "up_proj") if getattr(mlp, p).bias is not None]
        members += [GroupMember(param=f"{path}.mlp.{p}.bias", axis=0, width=1) for p in biases]
        return ChannelGroup(
            id=f"{bid}.mlp.channels",
            kind="ffn_channel",
            count=inter,
            members=tuple(members),
            params_per_group=3 * hidden + len(biases),
            config_fields={"intermediate_size": 1},
        )


def _other_dim(attn: nn.Module, param: str, axis: int) -> int:
    leaf = param.rsplit(".", 2)
    module = get_module(attn, leaf[-2])
    tensor = getattr(module, leaf[-1])
    if tensor.dim() == 1:
        return 1
    return tensor.shape[1 - axis]
