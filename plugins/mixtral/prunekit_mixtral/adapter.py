"""The MoE adapter: Mixtral and Qwen2-MoE decoders with fused 3-D experts.

Each decoder layer computes ``x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))``
where ``mlp`` is a sparse MoE block: a router ``gate`` (``weight [E, H]``: softmax in fp32, top-k; Mixtral
renormalises the top-k weights, Qwen2-MoE only with ``norm_topk_prob``) and ``experts`` holding every expert
in two fused parameters, ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``.
Qwen2-MoE adds an always-on ``shared_expert`` (a gated MLP) scaled by ``sigmoid(shared_expert_gate(x))``, and
may keep dense MLPs in some layers (``mlp_only_layers``, ``decoder_sparse_step``).

The IR declares, per MoE sublayer (id ``text.blocks.i.moe``):

- the experts as :class:`~prunekit_core.ir.Expert` units (``text.blocks.i.moe.experts.e``, router row ``e``)
  and the shared expert (``text.blocks.i.moe.shared_expert``, no router row);
- the expert family ``text.blocks.i.moe.experts`` (kind ``expert``): expert ``e`` owns ``gate_up_proj[e]``,
  ``down_proj[e]`` and router row ``e``. Removing experts slices all three; the router then takes its
  softmax over the surviving experts only, which is exactly the unpruned router with the removed experts'
  logits forced to -inf (their probability mass goes to the survivors in proportion; with Qwen2-MoE's
  ``norm_topk_prob=False`` the top-k weights of a token therefore grow when a removed expert had mass).
  The experts must keep at least ``top_k``, unless the plan clamps ``top_k``;
- the expert-channel family ``text.blocks.i.moe.expert_channels`` (kind ``expert_channel``): channel ``c``
  is gate row ``c`` and up row ``I + c`` of every expert and down column ``c`` of every expert (the fused
  layout keeps every expert of a layer at one width);
- Qwen2-MoE: the shared expert's channels ``text.blocks.i.moe.shared_expert.channels``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from prunekit_core.adapter import count_params, get_module, module_attr
from prunekit_core.decoder import LlamaLayoutAdapter, is_gated_mlp
from prunekit_core.groups import gated_mlp_channels
from prunekit_core.ir import (
    ChannelGroup,
    Expert,
    GroupMember,
    ModelIR,
    ModuleCounter,
    ResidualEdge,
    Sublayer,
    TopK,
)

if TYPE_CHECKING:
    from prunekit_core.adapter import WidthCut

SUPPORTED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")


def is_moe_block(module: nn.Module) -> bool:
    """A sparse MoE block with a linear router and fused 3-D experts."""
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    return (
        isinstance(getattr(gate, "weight", None), nn.Parameter)
        and isinstance(gate_up, nn.Parameter)
        and isinstance(getattr(experts, "down_proj", None), nn.Parameter)
        and gate_up.dim() == 3
    )


class MoEAdapter(LlamaLayoutAdapter):
    name = "mixtral"
    description = "mixture-of-experts decoders with fused experts: MixtralForCausalLM, Qwen2MoeForCausalLM"
    supported = SUPPORTED

    def is_mlp(self, module: nn.Module) -> bool:
        return is_moe_block(module) or is_gated_mlp(module)

    def is_model(self, layers: nn.ModuleList) -> bool:
        return any(
            is_moe_block(get_module(layer, "mlp")) for layer in layers
        )  # else it is a dense (Llama) model

    # IR ---------------------------------------------------------------------------------------------

    def expert_count_field(self, config: object) -> str:
        """The config field that counts routed experts (``num_local_experts`` or ``num_experts``)."""
        return "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"

    def expert_width_field(self, config: object) -> str:
        """The config field that counts channels inside each routed expert."""
        return "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"

    def mlp_sublayer(
        self, bid: str, path: str, mlp: nn.Module, norm: str, edge: ResidualEdge, params: int
    ) -> Sublayer:
        if not is_moe_block(mlp):  # Qwen2-MoE's dense layers (mlp_only_layers, decoder_sparse_step)
            return super().mlp_sublayer(bid, path, mlp, norm, edge, params)
        return self._moe_sublayer(f"{bid}.moe", path, mlp, norm, edge, params)

    def _moe_sublayer(
        self, sid: str, path: str, moe: nn.Module, norm: str, edge: ResidualEdge, params: int
    ) -> Sublayer:
        fused = get_module(moe, "experts")
        config = module_attr(fused, "config")
        gate_up = fused.get_parameter("gate_up_proj")
        n_exp, two_i, hidden = gate_up.shape
        inter = two_i // 2
        per_expert = 2 * inter * hidden + hidden * inter + hidden  # gate/up rows, down, router row
        top_k_counters = [f"{path}.gate.top_k"]
        if hasattr(moe, "top_k"):  # Mixtral's block keeps its own copy
            top_k_counters.append(f"{path}.top_k")
        experts_family = ChannelGroup(
            id=f"{sid}.experts",
            kind="expert",
            count=n_exp,
            members=(
                GroupMember(param=f"{path}.experts.gate_up_proj", axis=0, width=1),
                GroupMember(param=f"{path}.experts.down_proj", axis=0, width=1),
                GroupMember(param=f"{path}.gate.weight", axis=0, width=1),
            ),
            params_per_group=per_expert,
            config_fields={self.expert_count_field(config): 1},
            counters=(
                ModuleCounter(module=f"{path}.experts", attr="num_experts", per_group=1),
                ModuleCounter(module=f"{path}.gate", attr="num_experts", per_group=1),
            ),
            router=f"{path}.gate.weight",
            top_k=TopK(
                value=int(module_attr(get_module(moe, "gate"), "top_k")),
                counters=tuple(top_k_counters),
                config_field="num_experts_per_tok",
            ),
        )
        channels = ChannelGroup(
            id=f"{sid}.expert_channels",
            kind="expert_channel",
            count=inter,
            members=(
                GroupMember(param=f"{path}.experts.gate_up_proj", axis=1, width=1),
                GroupMember(param=f"{path}.experts.gate_up_proj", axis=1, width=1, offset=inter),
                GroupMember(param=f"{path}.experts.down_proj", axis=2, width=1),
            ),
            params_per_group=3 * n_exp * hidden,
            config_fields={self.expert_width_field(config): 1},
            counters=(ModuleCounter(module=f"{path}.experts", attr="intermediate_dim", per_group=1),),
            # grouped_mm needs 16-byte aligned strides: 8 channels in bf16 (the down_proj rows are I wide)
            multiple_of=8,
        )
        families = [experts_family, channels]
        experts = [
            Expert(id=f"{sid}.experts.{e}", index=e, router_row=e, params=per_expert) for e in range(n_exp)
        ]
        shared = getattr(moe, "shared_expert", None)
        if shared is not None:
            families.append(
                gated_mlp_channels(
                    f"{sid}.shared_expert.channels",
                    f"{path}.shared_expert",
                    shared,
                    "shared_expert_intermediate_size",
                )
            )
            gate = getattr(moe, "shared_expert_gate", None)
            experts.append(
                Expert(
                    id=f"{sid}.shared_expert",
                    index=0,
                    router_row=None,
                    shared=True,
                    params=count_params([shared] + ([gate] if gate is not None else [])),
                )
            )
        return Sublayer(
            id=sid,
            kind="moe",
            module=path,
            norm=norm,
            output="tensor",
            residual=edge,
            params=params,
            channel_groups=tuple(families),
            experts=tuple(experts),
        )

    # surgery ------------------------------------------------------------------------------------------

    def finalize_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        config = self.text_config(model)
        step = getattr(config, "decoder_sparse_step", None)
        if isinstance(step, int) and step > 1:
            # Qwen2-MoE picks sparse layers by index ((i + 1) % step == 0): after blocks are removed the
            # indices shift, so the pattern is written out as an explicit list of dense layers instead
            n = config.num_hidden_layers
            dense = set(getattr(config, "mlp_only_layers", None) or [])
            dense |= {i for i in range(n) if (i + 1) % step != 0}
            config.mlp_only_layers = sorted(dense)
            config.decoder_sparse_step = 1
        super().finalize_surgery(model, ir_before, kept_blocks)

    def finalize_width(self, model: nn.Module, ir_before: ModelIR, cuts: dict[str, WidthCut]) -> None:
        """Keep the model-level copies of the expert counts (used by the auxiliary loss) in step."""
        super().finalize_width(model, ir_before, cuts)
        config = self.text_config(model)
        for attr, field in (
            ("num_experts", self.expert_count_field(config)),
            ("num_experts_per_tok", "num_experts_per_tok"),
        ):
            if hasattr(model, attr) and hasattr(config, field):
                setattr(model, attr, getattr(config, field))


def moe_blocks(model: nn.Module, ir: ModelIR) -> dict[str, nn.Module]:
    """Every live MoE sublayer's module by sublayer id."""
    return {s.id: get_module(model, s.module) for s in ir.sublayers() if s.kind == "moe"}
