"""Exactness that holds on any CPU: reloads run the kernels the saved model ran, and the kit's one tolerance.

A reload memory-maps safetensors, so its tensors start wherever the file puts them. On AMD EPYC CPUs (with
and without AVX-512) an unaligned operand took another vectorised path, and cached decoding of a reloaded MoE model
differed from the model in memory by up to 1.3e-6 with bitwise-equal weights. These tests force that path
on every machine (unaligned buffers, another thread count, non-contiguous weights) so that a regression
shows here, not only on the CPU that has the other kernel.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from prunekit_llama import LlamaFamilyAdapter
from transformers import MixtralConfig, MixtralForCausalLM

from prunekit_core.io.checkpoint import ALLOCATOR_ALIGNMENT, align_weights, load_pruned, save_pruned
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import apply_plan
from prunekit_core.testing import (
    KERNEL_TOLERANCE_EPS,
    _cached_logits,
    _logits,
    assert_identical,
    assert_kernel_close,
    assert_same_weights,
    kernel_tolerance,
)


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def unaligned(model: torch.nn.Module, offset: int = 8) -> int:
    """Move every parameter to a buffer that starts ``offset`` bytes past an aligned address, as a
    memory-mapped safetensors file places it; return how many moved."""
    moved = 0
    with torch.no_grad():
        for p in model.parameters():
            nbytes = p.numel() * p.element_size()
            raw = torch.empty(nbytes + ALLOCATOR_ALIGNMENT, dtype=torch.uint8)
            assert raw.data_ptr() % ALLOCATOR_ALIGNMENT == 0
            view = torch.as_strided(raw[offset : offset + nbytes].view(p.dtype), p.shape, p.stride())
            view.copy_(p.data)
            p.data = view
            moved += 1
    return moved


def misaligned(model: torch.nn.Module) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if t.data_ptr() % ALLOCATOR_ALIGNMENT]


def test_load_pruned_returns_aligned_tensors(tmp_path: Path) -> None:
    """A reload's tensors start where the CPU allocator's do, whatever offsets the file has."""
    model = tiny_llama(layers=3, tied=False)
    adapter = LlamaFamilyAdapter()
    plan = PrunePlan(fingerprint=fingerprint(model, adapter.build_ir(model)), remove=["text.blocks.1.attn"])
    apply_plan(model, plan, adapter=adapter)
    loaded = load_pruned(save_pruned(model, tmp_path / "ckpt"))
    assert misaligned(loaded) == []
    assert_same_weights(loaded, model)


def test_align_weights_restores_the_in_memory_kernels() -> None:
    """A model moved to unaligned buffers and aligned again decodes bitwise like the original, on the cache
    path too; the unaligned one only within the kit's tolerance (bitwise on some CPUs, not on others)."""
    model = tiny_mixtral()
    x = ids(128)
    want_full, want_steps = _logits(model, x), _cached_logits(model, x, 4)

    other = tiny_mixtral()
    assert unaligned(other) == len(list(other.parameters()))
    assert len(misaligned(other)) == len(list(other.parameters()))
    assert_kernel_close(_logits(other, x), want_full)
    for a, b in zip(_cached_logits(other, x, 4), want_steps, strict=True):
        assert_kernel_close(a, b)

    assert align_weights(other) == len(list(other.parameters()))
    assert misaligned(other) == []
    assert_same_weights(other, model)
    assert_identical(_logits(other, x), want_full)
    for a, b in zip(_cached_logits(other, x, 4), want_steps, strict=True):
        assert_identical(a, b)
    assert align_weights(other) == 0, "aligned tensors must not be copied again"


def test_align_weights_keeps_ties_and_strides() -> None:
    model = tiny_llama(layers=3, tied=True)
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w.data = w.data.t().contiguous().t()  # a transposed (non-contiguous) layout
    unaligned(model)
    assert not w.is_contiguous() and misaligned(model)
    strides = {n: p.stride() for n, p in model.named_parameters()}
    align_weights(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {n: p.stride() for n, p in model.named_parameters()} == strides


@pytest.mark.parametrize("threads", [1, 2])
def test_cached_decoding_within_tolerance_at_any_thread_count(threads: int) -> None:
    """Another thread count splits the work differently; cache against full forward stays inside the
    kit's tolerance, and far inside what a real fault moves (a dropped expert here)."""
    before = torch.get_num_threads()
    model, x = tiny_mixtral(), ids(128)
    try:
        torch.set_num_threads(1)
        full = _logits(model, x)
        torch.set_num_threads(threads)
        steps = _cached_logits(model, x, 4)
    finally:
        torch.set_num_threads(before)
    for i, got in enumerate(steps):
        assert_kernel_close(got, full[:, 3 + i])
    broken = tiny_mixtral()
    with torch.no_grad():
        broken.model.layers[1].mlp.experts.down_proj[0].zero_()
    with pytest.raises(AssertionError):
        assert_kernel_close(_logits(broken, x), full)


def test_kernel_tolerance_is_derived_from_the_dtype() -> None:
    ref = torch.tensor([0.5, -3.0])
    assert kernel_tolerance(ref) == KERNEL_TOLERANCE_EPS * torch.finfo(torch.float32).eps * 3.0
    small = torch.tensor([0.25])
    assert kernel_tolerance(small) == KERNEL_TOLERANCE_EPS * torch.finfo(torch.float32).eps
    assert kernel_tolerance(small.bfloat16()) == KERNEL_TOLERANCE_EPS * torch.finfo(torch.bfloat16).eps
    assert kernel_tolerance(torch.tensor([3])) == 0.0
    # a difference of a few epsilons passes, one of a hundred epsilons does not
    eps = torch.finfo(torch.float32).eps
    assert_kernel_close(ref + 4 * eps * 3.0, ref)
    with pytest.raises(AssertionError):
        assert_kernel_close(ref + 100 * KERNEL_TOLERANCE_EPS * eps * 3.0, ref)
    with pytest.raises(AssertionError):
        assert_identical(ref + eps * 4, ref)
    # generate() masks tokens to -inf: the scale comes from the finite entries, and an inf must match
    masked = torch.tensor([float("-inf"), 0.5, -3.0])
    assert kernel_tolerance(masked) == kernel_tolerance(ref)
    with pytest.raises(AssertionError):
        assert_kernel_close(torch.tensor([float("-inf"), 5.0, -3.0]), masked)
    with pytest.raises(AssertionError):
        assert_kernel_close(torch.tensor([0.0, 0.5, -3.0]), masked)


def test_non_contiguous_weights_compute_within_tolerance() -> None:
    """A transposed weight layout (another GEMM path) computes the same function within tolerance."""
    model, x = tiny_llama(layers=3, tied=False), ids(128)
    want = _logits(model, x)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
                lin.weight.data = lin.weight.data.t().contiguous().t()
    assert not model.model.layers[0].mlp.down_proj.weight.is_contiguous()
    assert_kernel_close(_logits(model, x), want)
