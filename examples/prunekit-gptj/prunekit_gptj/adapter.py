"""The gptj adapter: where a GPTJForCausalLM's blocks, branches and stages are.

Written by `prunekit new-plugin` from the structure the generic adapter discovered in a tiny GPTJForCausalLM.
Branches with the same ``edge`` are added to the same stream value (parallel attention and MLP).

Added by hand after generation (docs/plugins/writing-a-plugin.md, step 5): the MLP's channels as a channel
group family, so width pruning works too.
"""

from __future__ import annotations

from torch import nn

from prunekit_core.adapter import module_attr
from prunekit_core.declared import BranchSpec, DeclaredDecoderAdapter, LayoutSpec
from prunekit_core.ir import ChannelGroup, GroupMember, ModelIR, Sublayer


class GptjAdapter(DeclaredDecoderAdapter):
    name = "gptj"
    description = "GPTJForCausalLM (block and sublayer pruning)"
    model_classes = ("GPTJForCausalLM",)
    layout = LayoutSpec(
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        head="lm_head",
    )
    branches = (
        BranchSpec(
            name="attn",
            kind="attention",
            module="attn",
            output="tuple",
            uses_cache=True,
            edge=0,
            out_proj="attn.out_proj",
        ),
        BranchSpec(name="mlp", kind="mlp", module="mlp", edge=0, out_proj="mlp.fc_out"),
    )

    def build_ir(self, model: nn.Module) -> ModelIR:
        ir = super().build_ir(model)
        tower = ir.towers[0]
        blocks = tuple(
            b.model_copy(update={"sublayers": tuple(self._with_channels(model, s) for s in b.sublayers)})
            for b in tower.blocks
        )
        return ir.model_copy(update={"towers": (tower.model_copy(update={"blocks": blocks}),)})

    @staticmethod
    def _with_channels(model: nn.Module, sub: Sublayer) -> Sublayer:
        """One group per MLP channel: an fc_in row and its bias, an fc_out column; sets ``n_inner``."""
        if sub.kind != "mlp":
            return sub
        fc_in = model.get_submodule(f"{sub.module}.fc_in")
        channels = ChannelGroup(
            id=f"{sub.id}.channels",
            kind="ffn_channel",
            count=module_attr(fc_in, "out_features"),
            members=(
                GroupMember(param=f"{sub.module}.fc_in.weight", axis=0, width=1),
                GroupMember(param=f"{sub.module}.fc_in.bias", axis=0, width=1),
                GroupMember(param=f"{sub.module}.fc_out.weight", axis=1, width=1),
            ),
            params_per_group=2 * module_attr(fc_in, "in_features") + 1,
            config_fields={"n_inner": 1},
        )
        return sub.model_copy(update={"channel_groups": (channels,)})
