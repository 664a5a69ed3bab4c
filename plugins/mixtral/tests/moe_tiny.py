"""Tiny random Mixtral and Qwen2-MoE models shared by the plugin's tests."""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
MIXTRAL = dict(COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
QWEN2_MOE = dict(
    COMMON,
    intermediate_size=64,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=40,
    num_experts=5,
    num_experts_per_tok=2,
)
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _randomize(model: torch.nn.Module) -> None:
    """Weights large enough that routing differs clearly between tokens and experts (the default init
    gives near-identical router logits; Qwen2-MoE's router starts at zero)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)


def tiny_mixtral(implementation: str = "grouped_mm", **overrides) -> MixtralForCausalLM:
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**{**MIXTRAL, **overrides})).eval()
    _randomize(model)
    model.set_experts_implementation(implementation)
    return model


def tiny_qwen2_moe(implementation: str = "grouped_mm", **overrides) -> Qwen2MoeForCausalLM:
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**QWEN2_MOE, **overrides})).eval()
    _randomize(model)
    model.set_experts_implementation(implementation)
    return model


def save_tiny_mixtral(folder, **overrides):
    """:func:`tiny_mixtral` and a word-level tokenizer (``w<i>`` -> id ``i + 3``) as a Hugging Face folder."""
    from prunekit_core.testing import word_tokenizer

    tiny_mixtral(**overrides).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
