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

from prunekit_core.errors import CalibrationError, CheckpointError
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


class NeverMatches(LlamaFamilyAdapter):
    """Claims no model at all."""

    def match(self, model: torch.nn.Module) -> float | None:
        return None


class TouchesWeightsOnSurgery(LlamaFamilyAdapter):
    """Rescales the final norm during surgery, even when the plan removes nothing."""

    def finalize_surgery(self, model, ir_before, kept_blocks) -> None:  # noqa: ANN001
        super().finalize_surgery(model, ir_before, kept_blocks)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)


class SwapsPreNorms(LlamaFamilyAdapter):
    """Declares the MLP's pre-norm as the attention's (same parameter count, wrong module)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _map_sublayers(
            super().build_ir(model),
            lambda s: s.model_copy(
                update={"norm": s.norm.replace("input_layernorm", "post_attention_layernorm")}
            ),
        )


class ReversesBlockIndices(LlamaFamilyAdapter):
    """Numbers the blocks backwards: unit text.blocks.0 deletes the last layer."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        ir = super().build_ir(model)
        tower = ir.towers[0]
        n = len(tower.blocks)
        blocks = tuple(b.model_copy(update={"index": n - 1 - b.index}) for b in tower.blocks)
        return ir.model_copy(update={"towers": (tower.model_copy(update={"blocks": blocks}),)})


class MutatesOnBuild(LlamaFamilyAdapter):
    """Writes into the model's config every time it describes the model."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        model.config.prunekit_builds = getattr(model.config, "prunekit_builds", 0) + 1
        return super().build_ir(model)


class ForgetsFinalNorm(LlamaFamilyAdapter):
    """Does not say where the final norm is, so the end of the stream cannot be observed."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        ir = super().build_ir(model)
        return ir.model_copy(update={"towers": (ir.towers[0].model_copy(update={"final_norm": None}),)})


class SlicesOutputRows(LlamaFamilyAdapter):
    """Declares o_proj's KV-group slices along rows (its output) instead of columns (its input)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        def fix(s):  # noqa: ANN001, ANN202
            groups = tuple(
                g.model_copy(
                    update={
                        "members": tuple(
                            m.model_copy(update={"axis": 0}) if m.param.endswith("o_proj.weight") else m
                            for m in g.members
                        )
                    }
                )
                for g in s.channel_groups
            )
            return s.model_copy(update={"channel_groups": groups})

        return _map_sublayers(super().build_ir(model), fix)


class ForgetsIntermediateSize(LlamaFamilyAdapter):
    """Narrows FFNs without telling the config (``intermediate_size`` stays as it was)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        def fix(s):  # noqa: ANN001, ANN202
            groups = tuple(
                g.model_copy(update={"config_fields": {}}) if g.kind == "ffn_channel" else g
                for g in s.channel_groups
            )
            return s.model_copy(update={"channel_groups": groups})

        return _map_sublayers(super().build_ir(model), fix)


def _map_sublayers(ir: ModelIR, fn) -> ModelIR:  # noqa: ANN001
    tower = ir.towers[0]
    blocks = tuple(
        b.model_copy(update={"sublayers": tuple(fn(s) for s in b.sublayers)}) for b in tower.blocks
    )
    return ir.model_copy(update={"towers": (tower.model_copy(update={"blocks": blocks}),)})


class LlamaKit(AdapterConformance):
    adapter = LlamaFamilyAdapter()
    capabilities = {"depth", "sublayers", "width"}

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
    (NeverMatches, ["test_adapter_matches"]),
    (UndercountsBlocks, ["test_ir_covers_every_parameter"]),
    (TouchesWeightsOnSurgery, ["test_prune_nothing_changes_nothing"]),
    (SwapsPreNorms, ["test_branch_removal_equals_zeroed_branch"]),
    (ReversesBlockIndices, ["test_block_removal_equals_skipped_block"]),
    (ForgetsCacheRenumbering, ["test_cached_generation_matches_full_forward", "test_left_padded_generate"]),
    (KeepsLayerCount, ["test_config_consistent", "test_save_reload_roundtrip"]),
    (
        MutatesOnBuild,
        [
            "test_plan_for_other_model_rejected",
            "test_remove_every_block_rejected",
            "test_width_remove_every_group_rejected",
        ],
    ),
    (ForgetsFinalNorm, ["test_metrics_finite_on_every_unit"]),
    (SlicesOutputRows, ["test_width_removal_equals_zeroed_groups"]),
    (ForgetsCacheRenumbering, ["test_width_cached_generation_matches_full_forward"]),
    (ForgetsIntermediateSize, ["test_width_save_reload_roundtrip"]),
]
CASES = [(adapter, test) for adapter, tests in FAULTS for test in tests]


def test_every_check_has_a_fault() -> None:
    # expert checks need an MoE model: plugins/mixtral/tests/test_moe_kit_faults.py breaks each of them;
    # stage checks need conv stages: plugins/llava/tests/test_got_ocr2_kit_faults.py breaks each of them
    checks = {
        n
        for n in dir(AdapterConformance)
        if n.startswith("test_") and not n.startswith(("test_expert_", "test_stage_"))
    }
    assert checks == {t for _, t in CASES}, (
        f"checks without a broken adapter: {checks - {t for _, t in CASES}}"
    )


@pytest.mark.parametrize(("adapter_cls", "test"), CASES, ids=[f"{a.__name__}-{t}" for a, t in CASES])
def test_kit_catches_fault(adapter_cls: type[LlamaFamilyAdapter], test: str, tmp_path: Path) -> None:
    # a failed comparison, load_pruned refusing a checkpoint that contradicts its own config, or
    # calibration refusing an IR it cannot observe; a crash of the model itself also counts as loud
    with pytest.raises((AssertionError, CheckpointError, CalibrationError, RuntimeError)):
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


# --- strict expected failures ----------------------------------------------------------------------------

pytest_plugins = ["pytester"]

KIT_MODULE = """
import torch
from prunekit_llama import LlamaFamilyAdapter
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit_core.testing import AdapterConformance


class NeverMatches(LlamaFamilyAdapter):
    def match(self, model):
        return None


class TestKit(AdapterConformance):
    adapter = {adapter}
    capabilities = {{"depth", "sublayers", "width"}}
    expected_failures = {declared!r}

    def make_model(self):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config).eval()
"""


@pytest.mark.parametrize(
    ("adapter", "declared", "outcome"),
    [
        ("NeverMatches()", {"test_adapter_matches": "knowingly broken"}, {"xfailed": 1}),
        ("LlamaFamilyAdapter()", {"test_adapter_matches": "stale declaration"}, {"failed": 1}),
        ("LlamaFamilyAdapter()", {"test_no_such_check": "typo"}, {"errors": 1}),
        ("LlamaFamilyAdapter()", {}, {"passed": 1}),
    ],
    ids=["declared-failure-xfails", "stale-declaration-fails", "unknown-check-errors", "no-declaration"],
)
def test_expected_failures_are_strict(
    pytester: pytest.Pytester, adapter: str, declared: dict, outcome: dict
) -> None:
    pytester.makepyfile(test_kit=KIT_MODULE.format(adapter=adapter, declared=declared))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "test_adapter_matches")
    result.assert_outcomes(**outcome)
