"""Tiny random LLaVA models (CLIP or SigLIP vision tower, Llama language model) and their inputs."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    SiglipVisionConfig,
)

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1  # the last id: random text ids are drawn below it
IMAGE_SIZE, PATCH = 16, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLIP drops its CLS token ("default"), SigLIP has none ("full")

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
)


def tiny_llava(
    tower: str = "clip", *, feature_layer: int | list[int] = -2, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A seeded tiny LLaVA in eval mode; ``tower`` is ``clip`` or ``siglip``."""
    if tower == "clip":
        vision, strategy = CLIPVisionConfig(**VISION), "default"
    else:
        vision, strategy = SiglipVisionConfig(**VISION), "full"
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TEXT),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_moe(seed: int = 0) -> LlavaForConditionalGeneration:
    """A seeded tiny LLaVA whose language model is a Mixtral (eager experts, weights large enough that
    routing differs between tokens)."""
    text = MixtralConfig(
        **{**TEXT, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.model.language_model.set_experts_implementation("eager")
    return model


def pixel_values(batch: int, seed: int = 0) -> torch.Tensor:
    """One seeded random image, repeated ``batch`` times (rows of a batch see the same image)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).expand(batch, -1, -1, -1).contiguous()


def with_image_tokens(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with the image placeholders at the first positions."""
    ids = ids.clone()
    ids[:, :IMAGE_TOKENS] = IMAGE_TOKEN
    return ids


def save_tiny_llava(folder, tower: str = "clip", **kwargs):
    """:func:`tiny_llava` and a word-level tokenizer (``w<i>`` -> id ``i + 3``) as a Hugging Face folder."""
    from prunekit_core.testing import word_tokenizer

    tiny_llava(tower, **kwargs).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_text(path, words: int = 3000, seed: int = 1):
    """A plain-text file of random ``w<i>`` words the tiny tokenizer knows."""
    gen = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (words,), generator=gen)) + "\n")
    return path
