"""The Llama-family adapter: ``model.model.layers[i]`` with ``self_attn`` and ``mlp`` on two residual edges.

Each decoder layer computes ``x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))``
with a dense gated MLP. The layout (matching, IR, attention KV groups, FFN channels) is the core's
:class:`~prunekit_core.decoder.LlamaLayoutAdapter`; this plugin names the classes it covers.
"""

from __future__ import annotations

from prunekit_core.decoder import LlamaLayoutAdapter

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class LlamaFamilyAdapter(LlamaLayoutAdapter):
    name = "llama"
    description = "Llama-family dense decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    supported = SUPPORTED
