"""The conformance kit's stage and tower checks catch broken declarations.

Each faulty adapter below gets one thing about GOT-OCR2's conv stages or its two towers wrong; the named kit
check must fail on it with the one error that check raises for it: a failed comparison, the adapter's own
dimension check refusing the narrowed model (``conv_channels``), or ``load_pruned`` refusing a checkpoint
that contradicts its config. Anything else (a crash elsewhere) fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_got_ocr2_conformance as conformance  # a module import: pytest must not collect the class twice
import torch
from prunekit_llava.got_ocr2 import GotOcr2Adapter

from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.model import ChannelGroup, ModelIR


def _edit_family(ir: ModelIR, fid: str, edit) -> ModelIR:  # noqa: ANN001
    """``ir`` with stage family ``fid`` replaced by ``edit(family)``."""
    towers = []
    for t in ir.towers:
        stages = tuple(
            st.model_copy(
                update={"channel_groups": tuple(edit(g) if g.id == fid else g for g in st.channel_groups)}
            )
            for st in t.stages
        )
        towers.append(t.model_copy(update={"stages": stages}))
    return ir.model_copy(update={"towers": tuple(towers)})


def _without(model: torch.nn.Module, fam: ChannelGroup, suffix: str) -> ChannelGroup:
    """``fam`` without its members on parameters ending in ``suffix``, with ``params_per_group`` lowered to
    match, so that only the surgery itself can reveal the fault."""
    gone = [m for m in fam.members if m.param.endswith(suffix)]
    params = dict(model.named_parameters())
    less = sum(params[m.param].numel() // params[m.param].shape[m.axis] for m in gone)
    return fam.model_copy(
        update={
            "members": tuple(m for m in fam.members if m not in gone),
            "params_per_group": fam.params_per_group - less,
        }
    )


class ForgetsProjectorConsumer(GotOcr2Adapter):
    """conv_upsampler1's family leaves out conv_upsampler2's input columns."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _edit_family(
            super().build_ir(model),
            "projector.conv_upsampler1.channels",
            lambda f: _without(model, f, "conv_upsampler2.weight"),
        )


class ForgetsNeckNorm(GotOcr2Adapter):
    """conv1's family leaves out the channel LayerNorm between conv1 and conv2."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _edit_family(
            super().build_ir(model),
            "vision.neck.conv1.channels",
            lambda f: _without(model, f, "layer_norm1.weight"),
        )


class ClaimsProjectorInputInConfig(GotOcr2Adapter):
    """conv_upsampler2's family claims the config describes its cut (it cannot: the linear's input)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _edit_family(
            super().build_ir(model),
            "projector.conv_upsampler2.channels",
            lambda f: f.model_copy(update={"in_config": True}),
        )


class ForgetsTextCacheIndices(GotOcr2Adapter):
    """Does not hand the text tower's share of a block removal to its adapter: the language model's KV-cache
    indices (and text config) are not renumbered."""

    def finalize_surgery(self, model: torch.nn.Module, ir_before: ModelIR, kept_blocks: dict) -> None:
        self.finalize_own_surgery(model, ir_before, {k: v for k, v in kept_blocks.items() if k != "text"})


# (fault, the kit check that must catch it, what the check raises, the message it must raise): a fault
# caught by anything else fails its test
COUPLED = "the coupled dimensions the plugin declares do not match the model"
FAULTS = [
    (
        ForgetsProjectorConsumer,
        "test_stage_width_removal_equals_zeroed_groups",
        PlanError,  # the adapter's own dimension check (conv_channels) refuses the narrowed model
        r"conv_upsampler2 has 16 input channels, but .*conv_upsampler1 produces 14 channels; " + COUPLED,
    ),
    (
        ForgetsNeckNorm,
        "test_stage_width_removal_equals_zeroed_groups",
        PlanError,
        r"layer_norm1 has 8 features, but .*conv1 produces 6 channels; " + COUPLED,
    ),
    (
        ClaimsProjectorInputInConfig,
        "test_stage_width_save_reload_roundtrip",
        # save_pruned reads the real shapes off the model (the checkpoint is right, and guarded); the plan's
        # claim that the config describes the cut fails at plain from_pretrained
        AssertionError,
        r"plain from_pretrained cannot load stages\d+, whose config claims to describe the pruned model",
    ),
    (
        ForgetsTextCacheIndices,
        "test_stage_width_cached_generation_matches_full_forward",
        AssertionError,
        r"after removing \['text\.blocks\.0'\] and narrowing \{.*\}: cached logits at position \d+ differ",
    ),
    (
        ForgetsTextCacheIndices,
        "test_towers_blocks_removed_in_every_tower",
        AssertionError,
        r"tower 'text': config\.num_hidden_layers=\d+ after removing one of its \d+ blocks",
    ),
]
CASES = [(adapter, test) for adapter, test, _exc, _match in FAULTS]


@pytest.mark.parametrize(
    ("adapter_cls", "test", "raises", "match"), FAULTS, ids=[f"{a.__name__}-{t}" for a, t, _e, _m in FAULTS]
)
def test_kit_catches_stage_fault(
    adapter_cls: type[GotOcr2Adapter], test: str, raises: type[Exception], match: str, tmp_path: Path
) -> None:
    kit = conformance.TestGotOcr2Conformance()
    kit.adapter = adapter_cls()
    method = getattr(kit, test)
    with pytest.raises(raises, match=match):
        method(tmp_path) if "tmp_path" in method.__code__.co_varnames else method()


@pytest.mark.parametrize("test", sorted({t for _, t in CASES}))
def test_the_correct_adapter_passes_the_same_checks(test: str, tmp_path: Path) -> None:
    method = getattr(conformance.TestGotOcr2Conformance(), test)
    method(tmp_path) if "tmp_path" in method.__code__.co_varnames else method()


def test_every_stage_and_tower_check_has_a_fault() -> None:
    from prunekit_core.testing import AdapterConformance

    checks = {n for n in vars(AdapterConformance) if n.startswith(("test_stage_", "test_towers_"))}
    assert checks == {t for _, t in CASES}, (
        f"stage and tower checks without a broken adapter: {checks - {t for _, t in CASES}}"
    )
