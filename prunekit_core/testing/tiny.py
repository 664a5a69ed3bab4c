"""Tiny, seeded, randomly initialised models of the families prunekit's tests build, by name.

``bench/depth_pruning.py --model gemma2`` and the default method's tests (tests/test_default_method.py)
read them from here, so the generality report and the tests cover the same models. Each function returns a
fresh model in eval mode (4 blocks, hidden size 64 or less, a 128-token vocabulary: milliseconds per
forward). ``vision_language`` names the ones whose input windows need images (the adapter's
``calibration_inputs``), pruned in the text tower only (``scope=["text"]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as T
from torch import nn

VOCAB = 128
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
)


def _tiny(model_cls: Any, config_cls: Any, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = model_cls(config_cls(**kwargs)).eval()
    return model


def llama() -> nn.Module:
    return _tiny(T.LlamaForCausalLM, T.LlamaConfig, num_key_value_heads=2, **_COMMON)


def mixtral() -> nn.Module:
    kw = dict(_COMMON, hidden_size=32, intermediate_size=48)
    return _tiny(
        T.MixtralForCausalLM,
        T.MixtralConfig,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        **kw,
    )


def llava() -> nn.Module:
    """LLaVA with a CLIP tower and a Llama language model (the last token id is the image placeholder)."""
    vision = T.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    config = T.LlavaConfig(
        vision_config=vision,
        text_config=T.LlamaConfig(num_key_value_heads=2, **_COMMON),
        image_token_index=VOCAB - 1,
        image_seq_length=4,
    )
    torch.manual_seed(0)
    model: nn.Module = T.LlavaForConditionalGeneration(config).eval()
    return model


def gptj() -> nn.Module:
    return _tiny(
        T.GPTJForCausalLM,
        T.GPTJConfig,
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=4,
        n_head=4,
        rotary_dim=8,
        n_positions=128,
    )


def gpt2() -> nn.Module:
    return _tiny(
        T.GPT2LMHeadModel, T.GPT2Config, vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128
    )


def opt() -> nn.Module:
    return _tiny(
        T.OPTForCausalLM, T.OPTConfig, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=64,
    )  # fmt: skip


def qwen3() -> nn.Module:
    return _tiny(T.Qwen3ForCausalLM, T.Qwen3Config, num_key_value_heads=2, head_dim=16, **_COMMON)


def gptneox() -> nn.Module:
    return _tiny(T.GPTNeoXForCausalLM, T.GPTNeoXConfig, **_COMMON)


def phi3() -> nn.Module:
    return _tiny(T.Phi3ForCausalLM, T.Phi3Config, num_key_value_heads=2, pad_token_id=0, **_COMMON)


def falcon() -> nn.Module:
    return _tiny(
        T.FalconForCausalLM,
        T.FalconConfig,
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
    )


def gemma2() -> nn.Module:
    """Sandwich norms (a norm after o_proj and after down_proj), sliding-window and global layers."""
    return _tiny(T.Gemma2ForCausalLM, T.Gemma2Config, num_key_value_heads=2, head_dim=16, **_COMMON)


def gemma3() -> nn.Module:
    return _tiny(T.Gemma3ForCausalLM, T.Gemma3TextConfig, num_key_value_heads=2, head_dim=16, **_COMMON)


def olmo2() -> nn.Module:
    """Post-norms only: a norm after each branch, before the residual add."""
    return _tiny(T.Olmo2ForCausalLM, T.Olmo2Config, num_key_value_heads=2, **_COMMON)


def granite() -> nn.Module:
    """A scalar multiplier (residual_multiplier) between each branch and the residual add."""
    return _tiny(
        T.GraniteForCausalLM, T.GraniteConfig, num_key_value_heads=2, residual_multiplier=0.5, **_COMMON
    )


#: name -> builder of every tiny family
TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    f.__name__: f
    for f in (
        llama,
        mixtral,
        llava,
        gptj,
        gpt2,
        opt,
        qwen3,
        gptneox,
        phi3,
        falcon,
        gemma2,
        gemma3,
        olmo2,
        granite,
    )
}
#: families whose windows carry images (pruned in the text tower: scope ["text"])
VISION_LANGUAGE = frozenset({"llava"})
#: the families no test was tuned on, which the generality report (bench/depth_pruning.py) shows
HELD_OUT_FAMILIES = ("gemma2", "gemma3", "olmo2", "granite")


def tiny_windows(n: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` random token ids below the image placeholder (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (n, seq_len), generator=gen)
