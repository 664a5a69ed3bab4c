"""The conformance kit must fail on broken adapters, and only on the test that covers the fault.

Each broken adapter subclasses the real Llama-family adapter and gets one thing wrong. The kit subclasses
here are deliberately not named ``Test*``: pytest must not collect them as suites; these tests call their
methods directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prunekit_llama import LlamaFamilyAdapter
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit_core.ir.errors import CalibrationError, CheckpointError
from prunekit_core.ir.model import ModelIR
from prunekit_core.ir.stream import StreamWrite
from prunekit_core.testing import AdapterConformance, check_needs


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


class PairsDownProjWrong(LlamaFamilyAdapter):
    """Declares the FFN channels' ``down_proj`` slices one group to the right of ``gate/up``'s (and one group
    fewer, so every slice stays inside its tensor): shapes stay consistent, but channel ``i`` of gate/up is
    removed together with column ``i + 1`` of down_proj. Only the numerical reference can see it."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        def fix(s):  # noqa: ANN001, ANN202
            families = []
            for fam in s.channel_groups:
                if any(m.param.endswith("down_proj.weight") for m in fam.members):
                    members = tuple(
                        m.model_copy(update={"offset": m.offset + m.width})
                        if m.param.endswith("down_proj.weight")
                        else m
                        for m in fam.members
                    )
                    fam = fam.model_copy(update={"members": members, "count": fam.count - 1})
                families.append(fam)
            return s.model_copy(update={"channel_groups": tuple(families)})

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


class DropsChannelGroups(LlamaFamilyAdapter):
    """Stops declaring its channel groups (the issue's example: every width check would silently go)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _map_sublayers(super().build_ir(model), lambda s: s.model_copy(update={"channel_groups": ()}))


class AttentionOnly(LlamaFamilyAdapter):
    """A correct adapter that lets only attention branches go: its MLPs, so its blocks, are not removable."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _map_sublayers(
            super().build_ir(model),
            lambda s: s if s.kind == "attention" else s.model_copy(update={"removable": False}),
        )


class DeclaresNormAsAttention(LlamaFamilyAdapter):
    """Declares the attention's pre-norm as the branch (the old generic description of OLMo2: a branch
    named after a norm, the attention it wraps undeclared)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _map_sublayers(
            super().build_ir(model),
            lambda s: (
                s
                if s.kind != "attention"
                else s.model_copy(
                    update={"module": s.norm, "norm": None, "kind": "mlp", "uses_cache": False, "params": 64}
                )
            ),
        )


class HalvesTheScale(LlamaFamilyAdapter):
    """Declares that every branch's output reaches the stream multiplied by 0.5 (Llama multiplies by 1)."""

    def build_ir(self, model: torch.nn.Module) -> ModelIR:
        return _map_sublayers(
            super().build_ir(model), lambda s: s.model_copy(update={"write": StreamWrite(scale=0.5)})
        )


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


# (fault, the kit check that must catch it, what the check raises, the message it must raise): a fault
# caught by anything else (a crash elsewhere, another check's assertion) fails its test
REJECTED = "a rejected plan modified the model"
FAULTS = [
    (NeverMatches, "test_adapter_matches", AssertionError, "llama does not match its own model"),
    (
        UndercountsBlocks,
        "test_ir_covers_every_parameter",
        AssertionError,
        r"block text\.blocks\.0 declares 36928 params, its module has 36992",
    ),
    (
        TouchesWeightsOnSurgery,
        "test_prune_nothing_changes_nothing",
        AssertionError,
        "an empty plan changed the logits",
    ),
    (
        SwapsPreNorms,
        "test_branch_removal_equals_zeroed_branch",
        AssertionError,
        r"removing \['text\.blocks\.0\.attn'\]: Tensor-likes are not close",
    ),
    (
        ReversesBlockIndices,
        "test_block_removal_equals_skipped_block",
        AssertionError,
        r"removing \['text\.blocks\.0'\]: Tensor-likes are not close",
    ),
    (
        ForgetsCacheRenumbering,
        "test_cached_generation_matches_full_forward",
        AssertionError,
        "cached decoding failed after surgery: IndexError",
    ),
    (
        ForgetsCacheRenumbering,
        "test_left_padded_generate",
        AssertionError,
        r"generate\(\) failed after surgery: IndexError",
    ),
    (
        KeepsLayerCount,
        "test_config_consistent",
        AssertionError,
        r"text config\.num_hidden_layers=4, but 2 blocks remain",
    ),
    (
        KeepsLayerCount,
        "test_save_reload_roundtrip",
        CheckpointError,  # load_pruned refuses a checkpoint whose config contradicts its own structure record
        r"does not match its structure record: missing weights \['model\.layers\.3\.",
    ),
    (MutatesOnBuild, "test_plan_for_other_model_rejected", AssertionError, REJECTED),
    (MutatesOnBuild, "test_remove_every_block_rejected", AssertionError, REJECTED),
    (MutatesOnBuild, "test_width_remove_every_group_rejected", AssertionError, REJECTED),
    (
        ForgetsFinalNorm,
        "test_metrics_finite_on_every_unit",
        CalibrationError,  # calibration refuses an IR whose end of the stream it cannot observe
        "tower text has no final norm/head",
    ),
    (
        SlicesOutputRows,
        "test_width_removal_equals_zeroed_groups",
        AssertionError,
        r"narrowing \{.*\} left a model whose forward fails: RuntimeError: mat1 and mat2 shapes",
    ),
    (
        PairsDownProjWrong,
        "test_width_removal_equals_zeroed_groups",
        AssertionError,
        "narrowed model differs from the model with those groups zeroed",
    ),
    (
        ForgetsCacheRenumbering,
        "test_width_cached_generation_matches_full_forward",
        AssertionError,
        "cached decoding failed after surgery: IndexError",
    ),
    (
        ForgetsIntermediateSize,
        "test_width_save_reload_roundtrip",
        AssertionError,
        "plain from_pretrained cannot load uniform, whose config claims to describe the pruned model",
    ),
    (
        DeclaresNormAsAttention,
        "test_branches_own_their_modules",
        AssertionError,
        r"block text\.blocks\.0: model\.layers\.0\.self_attn \(LlamaAttention, 12288 parameters\) holds a "
        r"KV-cache slot \(layer_idx\) but is in no declared branch .* declare it as a branch, "
        r'BranchSpec\(module="self_attn", kind="attention", output="tuple", uses_cache=True\)',
    ),
    (
        HalvesTheScale,
        "test_stream_write_matches_the_forward",
        AssertionError,
        r"branch text\.blocks\.0\.attn: its output reaches the stream multiplied by 1, but it declares "
        r"scale=0\.5: declare the multiplier",
    ),
    (
        DropsChannelGroups,
        "test_capabilities_match_the_ir",
        AssertionError,
        "LlamaKit declares capability 'width' .* shows none",
    ),
]
CASES = [(adapter, test) for adapter, test, _exc, _match in FAULTS]


def test_every_check_has_a_fault() -> None:
    # expert checks need an MoE model: plugins/mixtral/tests/test_moe_kit_faults.py breaks each of them;
    # stage and tower checks need conv stages and two towers: plugins/llava/tests/test_got_ocr2_kit_faults.py
    checks = {
        n
        for n in vars(AdapterConformance)
        if n.startswith("test_") and not n.startswith(("test_expert_", "test_stage_", "test_towers_"))
    }
    assert checks == {t for _, t in CASES}, (
        f"checks without a broken adapter: {checks - {t for _, t in CASES}}"
    )


@pytest.mark.parametrize(
    ("adapter_cls", "test", "raises", "match"), FAULTS, ids=[f"{a.__name__}-{t}" for a, t, _e, _m in FAULTS]
)
def test_kit_catches_fault(
    adapter_cls: type[LlamaFamilyAdapter], test: str, raises: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(raises, match=match):
        run(kit(adapter_cls()), test, tmp_path)


@pytest.mark.parametrize("test", sorted({t for _, t in CASES}))
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


# --- capabilities --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, r"must declare what its adapter supports .* Choose from: depth: .*towers: "),
        ({"capabilities": "width"}, "must declare what its adapter supports as a set of capability names"),
        ({"capabilities": {"depth", "sublayer"}}, r"names unknown \['sublayer'\]\. Choose from: depth"),
        (
            {
                "capabilities": {"depth", "sublayers"},
                "test_width_cached_generation_matches_full_forward": print,
            },
            "overrides test_width_cached_generation_matches_full_forward, a check of \\['width'\\]",
        ),
    ],
    ids=["missing", "a-string", "unknown-name", "override-undeclared"],
)
def test_capabilities_must_be_declared(body: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        type("TestUndeclared", (AdapterConformance,), body)


def test_a_declared_capability_the_ir_lacks_fails_its_checks() -> None:
    """A plugin that stops declaring its channel groups but still claims width fails every width check."""
    with pytest.raises(AssertionError, match="LlamaKit declares capability 'width' .* its checks cannot run"):
        kit(DropsChannelGroups()).test_width_removal_equals_zeroed_groups()


class DepthOnlyKit(LlamaKit):
    capabilities = {"depth", "sublayers"}


def test_an_undeclared_capability_the_ir_shows_fails() -> None:
    with pytest.raises(
        AssertionError,
        match=r"shows 'width' .* DepthOnlyKit\.capabilities does not declare it, so \['test_width_",
    ):
        DepthOnlyKit().test_capabilities_match_the_ir()


def test_an_undeclared_check_is_not_callable() -> None:
    with pytest.raises(AssertionError, match="DepthOnlyKit does not declare 'width' in capabilities"):
        DepthOnlyKit().test_width_removal_equals_zeroed_groups()
    # a subclass that declares it again gets the check back
    again = type("WidthAgain", (DepthOnlyKit,), {"capabilities": {"depth", "sublayers", "width"}})
    check = again.test_width_removal_equals_zeroed_groups
    assert check is AdapterConformance.test_width_removal_equals_zeroed_groups
    assert not hasattr(check, "_prunekit_undeclared")


class AttentionOnlyKit(AdapterConformance):
    """Branches without whole blocks: the kit's mixed plans fall back to removable branches only."""

    adapter = AttentionOnly()
    capabilities = {"sublayers", "width"}
    make_model = LlamaKit.make_model


def test_a_branch_only_adapter_passes_its_checks(tmp_path: Path) -> None:
    checks = sorted(
        n
        for n in vars(AdapterConformance)
        if n.startswith("test_") and not hasattr(getattr(AttentionOnlyKit, n), "_prunekit_undeclared")
    )
    assert "test_block_removal_equals_skipped_block" not in checks and "test_config_consistent" in checks
    for check in checks:
        (tmp_path / check).mkdir()
        run(AttentionOnlyKit(), check, tmp_path / check)


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


def test_undeclared_checks_are_not_collected(pytester: pytest.Pytester) -> None:
    module = KIT_MODULE.format(adapter="LlamaFamilyAdapter()", declared={}).replace(
        '"depth", "sublayers", "width"', '"depth", "sublayers"'
    )
    pytester.makepyfile(test_kit=module)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "--co")
    collected = [line.rsplit("::", 1)[1] for line in result.outlines if "::" in line]
    runs = sorted(
        n
        for n in vars(AdapterConformance)
        if n.startswith("test_") and check_needs(n) <= {"depth", "sublayers"}
    )
    assert sorted(collected) == runs and not any("width" in c for c in collected)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "capabilities_match")
    result.assert_outcomes(failed=1)  # the IR shows width: the declaration is incomplete
    result.stdout.fnmatch_lines(["*shows 'width'*does not declare it*"])


@pytest.mark.parametrize(
    ("adapter", "declared", "outcome"),
    [
        ("NeverMatches()", {"test_adapter_matches": "knowingly broken"}, {"xfailed": 1}),
        ("LlamaFamilyAdapter()", {"test_adapter_matches": "stale declaration"}, {"failed": 1}),
        ("LlamaFamilyAdapter()", {"test_no_such_check": "typo"}, {"errors": 1}),
        ("LlamaFamilyAdapter()", {"test_expert_save_reload_roundtrip": "never runs"}, {"errors": 1}),
        ("LlamaFamilyAdapter()", {}, {"passed": 1}),
    ],
    ids=[
        "declared-failure-xfails",
        "stale-declaration-fails",
        "unknown-check-errors",
        "undeclared-capability-errors",
        "no-declaration",
    ],
)
def test_expected_failures_are_strict(
    pytester: pytest.Pytester, adapter: str, declared: dict, outcome: dict
) -> None:
    pytester.makepyfile(test_kit=KIT_MODULE.format(adapter=adapter, declared=declared))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "test_adapter_matches")
    result.assert_outcomes(**outcome)
