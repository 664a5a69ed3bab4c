"""The gptj adapter: where a GPTJForCausalLM's blocks, branches and stages are.

Written by `prunekit new-plugin` from the structure the generic adapter discovered in a tiny GPTJForCausalLM.
Branches with the same ``edge`` are added to the same stream value (parallel attention and MLP).

Added by hand after generation (docs/plugins/writing-a-plugin.md, step 5): the MLP's channels as a channel
group family (``groups=``), so width pruning works too.
"""

from __future__ import annotations

from prunekit_core import BranchSpec, DeclaredDecoderAdapter, LayoutSpec, ffn_channels


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
        BranchSpec(
            name="mlp",
            kind="mlp",
            module="mlp",
            edge=0,
            out_proj="mlp.fc_out",
            # one group per MLP channel: an fc_in row and its bias, an fc_out column; n_inner counts them
            groups=(ffn_channels(up="fc_in", down="fc_out", config_field="n_inner"),),
        ),
    )
