"""The conformance kit's expert checks fail on broken MoE adapters (and pass on the real one)."""

from __future__ import annotations

import pytest
import torch
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


class Kit(AdapterConformance):
    def make_model(self):  # noqa: ANN201
        return tiny_mixtral("grouped_mm")  # eager ignores a stale num_experts; grouped_mm does not


def kit(adapter: MoEAdapter) -> Kit:
    instance = Kit()
    instance.adapter = adapter
    return instance


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("adapter_cls", [KeepsRouterRows, KeepsExpertCount])
def test_kit_catches_fault(adapter_cls) -> None:  # noqa: ANN001
    with pytest.raises((AssertionError, RuntimeError, IndexError)):
        kit(adapter_cls()).test_expert_removal_equals_masked_router()


def test_real_adapter_passes() -> None:
    kit(MoEAdapter()).test_expert_removal_equals_masked_router()
