"""The gptj adapter: where a GPTJForCausalLM's blocks, branches and stages are.

Written by `prunekit new-plugin` from the structure the generic adapter discovered in a tiny GPTJForCausalLM.
Branches with the same ``edge`` are added to the same stream value (parallel attention and MLP).
"""

from __future__ import annotations

from prunekit_core.declared import BranchSpec, DeclaredDecoderAdapter, LayoutSpec


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
        BranchSpec(name="attn", kind="attention", module="attn", output="tuple", uses_cache=True, edge=0),
        BranchSpec(name="mlp", kind="mlp", module="mlp", edge=0),
    )
