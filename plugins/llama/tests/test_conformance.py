"""The core conformance suite, run on tiny random Llama, Mistral and Qwen2 models."""

from __future__ import annotations

import torch
from prunekit_llama import LlamaFamilyAdapter
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prunekit_core.testing import AdapterConformance

LLAMA = {"depth", "sublayers", "width"}

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _tiny(model_cls, config_cls, **overrides):
    torch.manual_seed(0)
    return model_cls(config_cls(**{**TINY, **overrides})).eval()


class TestLlama(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        return _tiny(LlamaForCausalLM, LlamaConfig)


class TestLlamaNoGQA(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        return _tiny(LlamaForCausalLM, LlamaConfig, num_key_value_heads=4)


class TestLlamaGQA3(AdapterConformance):
    """Three query heads per KV head (SmolLM2's ratio), head_dim not hidden // heads."""

    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        return _tiny(
            LlamaForCausalLM,
            LlamaConfig,
            hidden_size=96,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
        )


class TestLlamaGQA4(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        return _tiny(LlamaForCausalLM, LlamaConfig, num_attention_heads=8, num_key_value_heads=2)


class TestLlamaMlpBias(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        model = _tiny(LlamaForCausalLM, LlamaConfig, mlp_bias=True, attention_bias=True)
        assert model.model.layers[0].mlp.gate_proj.bias is not None
        return model


class TestLlamaTiedEmbeddings(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        model = _tiny(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model


class TestMistralSlidingWindow(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA
    seq_len = 20  # longer than the window, so cached decoding has to evict

    def make_model(self):
        return _tiny(MistralForCausalLM, MistralConfig, sliding_window=8)


class TestQwen2(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = LLAMA

    def make_model(self):
        model = _tiny(Qwen2ForCausalLM, Qwen2Config)
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 has q/k/v bias
        return model
