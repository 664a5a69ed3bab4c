"""Vision towers: pre-norm ViT encoder blocks and the hidden-state index a multimodal model reads.

A ViT encoder layer computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``: two branches on the
tower's residual stream, removable like a decoder's, declared like a decoder's (a plugin lists each
block's :class:`~prunekit_core.adapters.declared.BranchSpec` and calls :func:`~prunekit_core.adapters.declared.build_blocks`
with the tower's name). What is not on a residual edge (the Conv2d patch embedding, position embeddings,
the pre/post norms, a pooling head) is a :class:`~prunekit_core.ir.model.Stage`.

Vision-language models read a chosen hidden state of the tower (LLaVA's ``vision_feature_layer``: an
index into ``(embeddings, after block 0, ..., after block N-1)``, negative from the end). Removing blocks
shifts that index; :func:`remap_hidden_state_index` keeps it on the same point of the stream.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ir.errors import PlanError
from .base import module_attr

__all__ = ["feature_fidelity", "image_features", "remap_hidden_state_index"]


def remap_hidden_state_index(index: int, n_blocks: int, kept: list[int]) -> int:
    """``index`` into ``hidden_states`` of an ``n_blocks`` stack, moved to the same stream point after
    only the blocks ``kept`` (old indices, in order) remain. Negative indices stay negative.

    Hidden state ``k`` is the stream after blocks ``0..k-1``; after surgery the same point follows the
    kept blocks among those. Removing blocks after the point (e.g. the last CLIP block when the model
    reads ``-2``) leaves the representation exactly as it was.
    """
    total = n_blocks + 1
    if not -total <= index < total:
        raise PlanError(f"hidden-state index {index} is out of range for a tower of {n_blocks} blocks")
    absolute = index % total
    new_absolute = sum(1 for i in kept if i < absolute)
    return new_absolute - (len(kept) + 1) if index < 0 else new_absolute


@torch.no_grad()
def image_features(model: nn.Module, pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """What the language model receives for ``pixel_values``: the projector's outputs, ``[tokens, dim]``
    over all images (``model.get_image_features``, which vision-language models in transformers share)."""
    out = module_attr(model, "get_image_features")(pixel_values=pixel_values, **kwargs)
    feats: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def feature_fidelity(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean cosine similarity between matching image-feature vectors before and after pruning (1 = equal
    directions). The quality measure of a vision tower where no pretrained weights exist to measure
    accuracy with."""
    if before.shape != after.shape:
        raise ValueError(f"feature shapes differ: {tuple(before.shape)} vs {tuple(after.shape)}")
    return float(torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).mean())
