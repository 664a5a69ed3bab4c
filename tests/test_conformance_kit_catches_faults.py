"""The conformance kit must fail on broken adapters, and only on the test that covers the fault.

Each broken adapter subclasses the real Llama-family adapter and gets one thing wrong. The kit subclasses
here are deliberately not named ``Test*``: pytest must not collect them as suites; these tests call their
methods directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prunekit_llama import LlamaFamilyAdapter
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit_core.errors import CheckpointError
from prunekit_core.ir import ModelIR
from prunekit_core.testing import AdapterConformance


class ForgetsCacheRenumbering(LlamaFamilyAdapter):
    """Leaves ``self_attn.layer_idx`` as it was before blocks and attentions were removed."""

    def renumber_cache_indices(self, model: torch.nn.Module) -> None:
        pass


class UndercountsBlocks(LlamaFamilyAdapter):
    """Forgets the pre-attention norm weight when counting each block's parameters."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        ir = super().build_ir(model)
        tower = ir.towers[0]
        blocks = tuple(
            b.model_copy(update={"params": b.params - model.config.hidden_size}) for b in tower.blocks
        )
        return ir.model_copy(update={"towers": (tower.model_copy(update={"blocks": blocks}),)})


class KeepsLayerCount(LlamaFamilyAdapter):
    """Does everything but update ``config.num_hidden_layers``."""

    def finalize_surgery(self, model, ir_before, kept_blocks) -> None:  # noqa: ANN001
        n = model.config.num_hidden_layers
        super().finalize_surgery(model, ir_before, kept_blocks)
        model.config.num_hidden_layers = n


class LlamaKit(AdapterConformance):
    adapter = LlamaFamilyAdapter()

    def make_model(self) -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        return LlamaForCausalLM(config).eval()


def kit(adapter: LlamaFamilyAdapter) -> LlamaKit:
    instance = LlamaKit()
    instance.adapter = adapter
    return instance


def run(instance: AdapterConformance, test: str, tmp_path: Path) -> None:
    method = getattr(instance, test)
    if "tmp_path" in method.__code__.co_varnames[: method.__code__.co_argcount]:
        method(tmp_path)
    else:
        method()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # the kit's own fixture does not apply when its methods are called directly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (fault, the kit tests that must catch it)
FAULTS = [
    (ForgetsCacheRenumbering, ["test_cached_generation_matches_full_forward", "test_left_padded_generate"]),
    (UndercountsBlocks, ["test_ir_covers_every_parameter"]),
    (KeepsLayerCount, ["test_config_consistent", "test_save_reload_roundtrip"]),
]
CASES = [(adapter, test) for adapter, tests in FAULTS for test in tests]


@pytest.mark.parametrize(("adapter_cls", "test"), CASES, ids=[f"{a.__name__}-{t}" for a, t in CASES])
def test_kit_catches_fault(adapter_cls: type[LlamaFamilyAdapter], test: str, tmp_path: Path) -> None:
    # a failed comparison, or load_pruned refusing a checkpoint that contradicts its own config
    with pytest.raises((AssertionError, CheckpointError)):
        run(kit(adapter_cls()), test, tmp_path)


@pytest.mark.parametrize("test", sorted({t for _, tests in FAULTS for t in tests}))
def test_same_tests_pass_with_the_real_adapter(test: str, tmp_path: Path) -> None:
    """Control: the failures above come from the faults, not from the kit or the model."""
    run(kit(LlamaFamilyAdapter()), test, tmp_path)


def test_forgotten_renumbering_is_silently_wrong_without_a_cache() -> None:
    """Why the cached test exists: the broken adapter passes every full-forward exactness test."""
    broken = kit(ForgetsCacheRenumbering())
    broken.test_branch_removal_equals_zeroed_branch()
    broken.test_block_removal_equals_skipped_block()


def test_make_model_is_required() -> None:
    with pytest.raises(NotImplementedError, match="make_model"):
        AdapterConformance().make_model()
