"""The MoE adapter: Mixtral and Qwen2-MoE decoders with fused 3-D experts.

Each decoder layer computes ``x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))``
where ``mlp`` is a sparse MoE block: a router ``gate`` (``weight [E, H]``: softmax in fp32, top-k; Mixtral
renormalises the top-k weights, Qwen2-MoE only with ``norm_topk_prob``) and ``experts`` holding every expert
in two fused parameters, ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``.
Qwen2-MoE adds an always-on ``shared_expert`` (a gated MLP) scaled by ``sigmoid(shared_expert_gate(x))``, and
may keep dense MLPs in some layers (``mlp_only_layers``, ``decoder_sparse_step``).

The layout is declared by tables (:class:`~prunekit_core.adapters.declared.DeclaredDecoderAdapter`, as the Llama
plugin and docs/plugins/writing-a-plugin.md): the attention and a dense layer's MLP use the core's
``kv_groups`` and ``ffn_channels`` factories, the MoE branch declares its fused experts with factories of
its own (:class:`~prunekit_core.adapters.declared.GroupFactory`), and ``block_branches`` picks the MoE or the dense
branch per layer. The IR declares, per MoE sublayer (id ``text.blocks.i.moe``):

- the experts as :class:`~prunekit_core.ir.model.Expert` units (``text.blocks.i.moe.experts.e``, router row ``e``)
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

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from prunekit_core.adapters.base import count_params, get_module, iter_modules, module_attr
from prunekit_core.adapters.declared import (
    Branch,
    BranchSpec,
    DeclaredDecoderAdapter,
    GroupFactory,
    LayoutSpec,
)
from prunekit_core.adapters.groups import ffn_channels, kv_groups
from prunekit_core.ir.model import ChannelGroup, Expert, GroupMember, ModelIR, ModuleCounter, TopK

if TYPE_CHECKING:
    from prunekit_core.adapters.base import WidthCut

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


def expert_count_field(config: object) -> str:
    """The config field that counts routed experts (``num_local_experts`` or ``num_experts``)."""
    return "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"


def expert_width_field(config: object) -> str:
    """The config field that counts channels inside each routed expert."""
    return "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"


def _fused(branch: Branch) -> tuple[int, int, int, object]:
    """Experts, channels per expert, hidden size and the experts' config of an MoE branch."""
    fused = get_module(branch.module, "experts")
    n_exp, two_i, hidden = fused.get_parameter("gate_up_proj").shape
    return n_exp, two_i // 2, hidden, module_attr(fused, "config")


def _per_expert(inter: int, hidden: int) -> int:
    return 2 * inter * hidden + hidden * inter + hidden  # gate/up rows, down, router row


def _experts_family(branch: Branch, fid: str) -> ChannelGroup:
    n_exp, inter, hidden, config = _fused(branch)
    path, moe = branch.path, branch.module
    top_k_counters = [f"{path}.gate.top_k"]
    if hasattr(moe, "top_k"):  # Mixtral's block keeps its own copy
        top_k_counters.append(f"{path}.top_k")
    return ChannelGroup(
        id=fid,
        kind="expert",
        count=n_exp,
        members=(
            GroupMember(param=f"{path}.experts.gate_up_proj", axis=0, width=1),
            GroupMember(param=f"{path}.experts.down_proj", axis=0, width=1),
            GroupMember(param=f"{path}.gate.weight", axis=0, width=1),
        ),
        params_per_group=_per_expert(inter, hidden),
        config_fields={expert_count_field(config): 1},
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


def _expert_channels(branch: Branch, fid: str) -> ChannelGroup:
    n_exp, inter, hidden, config = _fused(branch)
    path = branch.path
    return ChannelGroup(
        id=fid,
        kind="expert_channel",
        count=inter,
        members=(
            GroupMember(param=f"{path}.experts.gate_up_proj", axis=1, width=1),
            GroupMember(param=f"{path}.experts.gate_up_proj", axis=1, width=1, offset=inter),
            GroupMember(param=f"{path}.experts.down_proj", axis=2, width=1),
        ),
        params_per_group=3 * n_exp * hidden,
        config_fields={expert_width_field(config): 1},
        counters=(ModuleCounter(module=f"{path}.experts", attr="intermediate_dim", per_group=1),),
        # grouped_mm needs 16-byte aligned strides: 8 channels in bf16 (the down_proj rows are I wide)
        multiple_of=8,
    )


def _experts(branch: Branch) -> tuple[Expert, ...]:
    """The routed experts (router row ``e``) and, in Qwen2-MoE, the shared expert (no router row)."""
    n_exp, inter, hidden, _config = _fused(branch)
    sid = branch.sublayer
    experts = [
        Expert(id=f"{sid}.experts.{e}", index=e, router_row=e, params=_per_expert(inter, hidden))
        for e in range(n_exp)
    ]
    shared = getattr(branch.module, "shared_expert", None)
    if shared is not None:
        gate = getattr(branch.module, "shared_expert_gate", None)
        params = count_params([shared] + ([gate] if gate is not None else []))
        experts.append(
            Expert(id=f"{sid}.shared_expert", index=0, router_row=None, shared=True, params=params)
        )
    return tuple(experts)


_FUSED = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
LAYOUT = LayoutSpec(
    blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", head="lm_head"
)
ATTENTION = BranchSpec(
    name="attn",
    kind="attention",
    module="self_attn",
    norm="input_layernorm",
    output="tuple",
    uses_cache=True,
    out_proj="self_attn.o_proj",
    groups=(kv_groups(q="q_proj", k="k_proj", v="v_proj", o="o_proj"),),
)
MOE = BranchSpec(
    name="moe",
    kind="moe",
    module="mlp",
    norm="post_attention_layernorm",
    groups=(
        GroupFactory(name="experts", build=_experts_family, reads=_FUSED),
        GroupFactory(name="expert_channels", build=_expert_channels, reads=_FUSED),
        ffn_channels(
            gate="shared_expert.gate_proj",
            up="shared_expert.up_proj",
            down="shared_expert.down_proj",
            config_field="shared_expert_intermediate_size",
            name="shared_expert.channels",
            optional=True,
        ),
    ),
    experts=_experts,
)
#: Qwen2-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``): a gated MLP
DENSE_MLP = BranchSpec(
    name="mlp",
    kind="mlp",
    module="mlp",
    norm="post_attention_layernorm",
    out_proj="mlp.down_proj",
    groups=(
        ffn_channels(gate="gate_proj", up="up_proj", down="down_proj", config_field="intermediate_size"),
    ),
)


class MoEAdapter(DeclaredDecoderAdapter):
    name = "mixtral"
    description = "mixture-of-experts decoders with fused experts: MixtralForCausalLM, Qwen2MoeForCausalLM"
    model_classes = SUPPORTED
    match_layout = True
    layout = LAYOUT

    def block_branches(self, model: nn.Module, index: int, block: nn.Module) -> Sequence[BranchSpec]:
        mlp = getattr(block, "mlp", None)  # has_layout asks before it knows the block has one
        return (ATTENTION, MOE if isinstance(mlp, nn.Module) and is_moe_block(mlp) else DENSE_MLP)

    def has_layout(self, model: nn.Module) -> bool:
        """The declared layout with at least one MoE block (else it is a dense, Llama, model)."""
        return super().has_layout(model) and any(
            is_moe_block(get_module(layer, "mlp")) for layer in iter_modules(get_module(model, LAYOUT.blocks))
        )

    def expert_count_field(self, config: object) -> str:
        """The config field that counts routed experts (``num_local_experts`` or ``num_experts``)."""
        return expert_count_field(config)

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
