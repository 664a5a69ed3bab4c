"""The Llama-family adapter: Llama, Mistral and Qwen2 declared by tables (docs/plugins/writing-a-plugin.md).

Each decoder layer ``model.layers[i]`` computes
``x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))``: two branches on two
residual edges. ``self_attn`` has ``q/k/v/o_proj``, owns the KV-cache slot ``layer_idx`` and returns a
2-tuple (so its stand-in must too); ``mlp`` is a gated MLP with ``gate/up/down_proj``. The stack sits
between ``model.embed_tokens`` and ``model.norm`` + ``lm_head``.

Width pruning: the attention's KV groups (one KV head with its query heads) and the MLP's channels, built
by the core's :func:`~prunekit_core.adapters.groups.kv_groups` and :func:`~prunekit_core.adapters.groups.ffn_channels` from
the names below. ``match_layout``: a model of another class laid out the same way (a fine-tuning
library's subclass) matches with score 10.
"""

from __future__ import annotations

from prunekit_core import BranchSpec, DeclaredDecoderAdapter, LayoutSpec, ffn_channels, kv_groups

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

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
MLP = BranchSpec(
    name="mlp",
    kind="mlp",
    module="mlp",
    norm="post_attention_layernorm",
    out_proj="mlp.down_proj",
    groups=(
        ffn_channels(gate="gate_proj", up="up_proj", down="down_proj", config_field="intermediate_size"),
    ),
)


class LlamaFamilyAdapter(DeclaredDecoderAdapter):
    name = "llama"
    description = "Llama-family dense decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    model_classes = SUPPORTED
    match_layout = True
    layout = LAYOUT
    branches = (ATTENTION, MLP)
