"""The conformance kit's expert checks fail on broken MoE adapters (and pass on the real one).

Every ``test_expert_*`` check of the kit has a broken adapter here (the core's
``tests/test_conformance_kit_catches_faults.py`` covers the other checks with a broken Llama adapter; expert
checks need an MoE model, which only this plugin builds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_tiny import tiny_mixtral
from prunekit_mixtral import MoEAdapter

from prunekit_core.testing import AdapterConformance


def _edit_experts(ir, update):  # noqa: ANN001, ANN202
    towers = []
    for tower in ir.towers:
        blocks = []
        for b in tower.blocks:
            subs = []
            for s in b.sublayers:
                fams = tuple(
                    f.model_copy(update=update(f)) if f.kind == "expert" else f for f in s.channel_groups
                )
                subs.append(s.model_copy(update={"channel_groups": fams}))
            blocks.append(b.model_copy(update={"sublayers": tuple(subs)}))
        towers.append(tower.model_copy(update={"blocks": tuple(blocks)}))
    return ir.model_copy(update={"towers": tuple(towers)})


class KeepsRouterRows(MoEAdapter):
    """Slices the fused experts but not the router's rows (a family member forgotten)."""

    def build_ir(self, model):  # noqa: ANN001, ANN201
        ir = super().build_ir(model)
        return _edit_experts(ir, update=lambda f: {"members": f.members[:2]})


class KeepsExpertCount(MoEAdapter):
    """Slices everything but leaves ``num_experts`` on the modules as it was."""

    def build_ir(self, model):  # noqa: ANN001, ANN201
        return _edit_experts(super().build_ir(model), update=lambda f: {"counters": ()})


class ForgetsExpertConfig(MoEAdapter):
    """Slices experts and counters but leaves the config's expert count as it was."""

    def build_ir(self, model):  # noqa: ANN001, ANN201
        return _edit_experts(super().build_ir(model), update=lambda f: {"config_fields": {}})


class ForgetsTopKCounters(MoEAdapter):
    """Declares top_k without the module attributes that hold it, so clamping changes nothing."""

    def build_ir(self, model):  # noqa: ANN001, ANN201
        return _edit_experts(
            super().build_ir(model),
            update=lambda f: {"top_k": f.top_k.model_copy(update={"counters": ()}) if f.top_k else None},
        )


class MutatesOnBuild(MoEAdapter):
    """Writes into the model's config every time it describes the model."""

    def build_ir(self, model):  # noqa: ANN001, ANN201
        model.config.prunekit_builds = getattr(model.config, "prunekit_builds", 0) + 1
        return super().build_ir(model)


# (fault, the expert check that must catch it, the message its assertion must carry): a fault caught by
# anything else (a crash outside the check's own assertions, another check) fails its test
FAULTS = [
    (
        KeepsRouterRows,
        "test_expert_removal_equals_masked_router",
        r"removing experts \{.*\} differs from forcing their logits to -inf",
    ),
    (
        KeepsExpertCount,
        "test_expert_removal_equals_masked_router",
        r"removing experts \{.*\} left a model whose forward fails",
    ),
    (
        KeepsExpertCount,
        "test_expert_cached_generation_matches_full_forward",
        r"removing \['text\.blocks\.1'\] and experts \{.*\} left a model whose forward fails",
    ),
    (
        ForgetsExpertConfig,
        "test_expert_save_reload_roundtrip",
        "plain from_pretrained cannot load uniform, whose config claims to describe the pruned model",
    ),
    (
        ForgetsTopKCounters,
        "test_expert_below_top_k_needs_a_policy",
        r"removing experts \{.*\} with top_k clamped left a model whose forward fails",
    ),
    (MutatesOnBuild, "test_expert_remove_every_expert_rejected", "a rejected plan modified the model"),
]
CASES = [(adapter, test) for adapter, test, _match in FAULTS]


class Kit(AdapterConformance):
    capabilities = {"depth", "sublayers", "width", "experts"}

    def make_model(self):  # noqa: ANN201
        return tiny_mixtral("grouped_mm")  # eager ignores a stale num_experts; grouped_mm does not


def kit(adapter: MoEAdapter) -> Kit:
    instance = Kit()
    instance.adapter = adapter
    return instance


def run(instance: Kit, test: str, tmp_path: Path) -> None:
    method = getattr(instance, test)
    if "tmp_path" in method.__code__.co_varnames[: method.__code__.co_argcount]:
        method(tmp_path)
    else:
        method()


def test_every_expert_check_has_a_fault() -> None:
    checks = {n for n in dir(AdapterConformance) if n.startswith("test_expert_")}
    assert checks == {t for _, t in CASES}, (
        f"expert checks without a broken adapter: {checks - {t for _, t in CASES}}"
    )


@pytest.mark.parametrize(
    ("adapter_cls", "test", "match"), FAULTS, ids=[f"{a.__name__}-{t}" for a, t, _m in FAULTS]
)
def test_kit_catches_fault(adapter_cls, test: str, match: str, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(AssertionError, match=match):
        run(kit(adapter_cls()), test, tmp_path)


@pytest.mark.parametrize("test", sorted({t for _, t in CASES}))
def test_real_adapter_passes(test: str, tmp_path: Path) -> None:
    run(kit(MoEAdapter()), test, tmp_path)
