"""prunekit keeps nothing on a user's model: no ``_prunekit*`` attribute on any module after surgery, a
save and reload, LSQ repair, LoRA healing or a streaming pass, for a tiny model of every plugin (issue 18).

What prunekit computes comes back as values (``apply_plan`` returns an ``AppliedPlan``, ``read_plan``
reads a checkpoint's plan, a streaming pass's ``Calibration`` carries its trial runner and weights digest).
The only modules prunekit puts into a model are the ``RemovedBranch`` stand-ins of removed branches; their
own fields (``kind``, ``output``, ...) are not ``_prunekit`` names.

The models and plans are the plugins' own conformance kits' (``make_model``, ``mixed_removal``,
``width_removals``, ``expert_removals``, ``stage_width_plans``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit_core as pk
from prunekit_core.planning.planner import plan_pruning
from prunekit_core.scoring.streaming import open_streaming, stream_calibrate, stream_score
from prunekit_core.study.recovery import heal_lora
from prunekit_core.testing import AdapterConformance

ROOT = Path(__file__).resolve().parent.parent

#: family -> (test folder, conformance module, kit class); imported as pytest imports them (the folder
#: first on sys.path), so a later collection of the same module finds it already imported
KITS = {
    "llama": ("plugins/llama/tests", "test_conformance", "TestLlama"),
    "mixtral": ("plugins/mixtral/tests", "test_moe_conformance", "TestMixtralEager"),
    "llava": ("plugins/llava/tests", "test_llava_conformance", "TestLlavaClip"),
    "got_ocr2": ("plugins/llava/tests", "test_got_ocr2_conformance", "TestGotOcr2Conformance"),
    "gptj": ("examples/prunekit-gptj/tests", "test_gptj_conformance", "TestGptj"),
    "generic": ("tests", "test_generic", "TestFalcon"),
}
FAMILIES = list(KITS)
#: families whose text tower the LSQ repair and LoRA healing run on here
TEXT_ONLY = ("llama", "mixtral")


def kit(family: str) -> AdapterConformance:
    folder, module, cls = KITS[family]
    path = str(ROOT / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return getattr(importlib.import_module(module), cls)()


def hidden(model: nn.Module) -> list[str]:
    """Every attribute, submodule, parameter or buffer named ``_prunekit*`` on any module of ``model``."""
    found = []
    for path, module in model.named_modules(remove_duplicate=False):
        names = set(vars(module)) | set(module._modules) | set(module._parameters) | set(module._buffers)
        found += [f"{path or '<model>'}.{n}" for n in sorted(names) if n.startswith("_prunekit")]
    return found


def plan_for(k: AdapterConformance, model: nn.Module, repair: str = "none") -> pk.PrunePlan:
    """Every kind of cut the kit's adapter supports, in one plan: branches and a block, channel groups,
    experts and stage channels (outside the removed units)."""
    ir = k.adapter.build_ir(model)
    remove = k.mixed_removal(ir)
    groups: dict[str, list[int]] = {}
    if "width" in k.capabilities:
        groups.update(k.width_removals(ir, uniform=False))
    if "experts" in k.capabilities:
        groups.update(k.expert_removals(ir, uniform=False))
    if "stages" in k.capabilities:
        groups.update(k.stage_width_plans(ir)[0])
    groups = {f: g for f, g in groups.items() if not any(f.startswith(u + ".") for u in remove)}
    return pk.PrunePlan(
        fingerprint=pk.fingerprint(model, ir), remove=remove, remove_groups=groups, repair=repair
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_save_reload_repair_and_healing_leave_no_attribute(family: str, tmp_path: Path) -> None:
    k = kit(family)
    model = k.make_model()
    assert not hidden(model)
    lsq = family in TEXT_ONLY
    plan = plan_for(k, model, repair="lsq" if lsq else "none")
    calib = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    applied = pk.apply_plan(model, plan, adapter=k.adapter, repair_windows=calib if lsq else None)
    assert not hidden(model), "apply_plan"
    assert applied.model is model and (applied.removed_blocks or applied.removed_sublayers)
    out = pk.save_pruned(model, tmp_path / "out", plan=applied.plan)
    assert not hidden(model), "save_pruned"
    loaded = pk.load_pruned(out)
    assert not hidden(loaded), "load_pruned"
    assert pk.read_plan(out) == applied.plan  # the plan comes back as a value
    if lsq:
        healed, _report = heal_lora(loaded, calib, rank=2, steps=2, batch_size=4)
        assert not hidden(healed), "heal_lora"


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_pass_leaves_no_attribute_on_the_skeleton(family: str, tmp_path: Path) -> None:
    k = kit(family)
    k.make_model().save_pretrained(tmp_path / "m")
    sm = open_streaming(tmp_path / "m")
    assert not hidden(sm.model), "open_streaming"
    ids, extra = sm.calibration_inputs(
        torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    )
    cal = stream_calibrate(sm, ids, inputs=extra, batch_size=2)
    assert cal.trial_factory is not None and cal.weights_digest is not None
    assert stream_score(sm, cal, "nri").values  # removal trials streamed through the calibration's runner
    plan = plan_pruning(
        sm.model, cal, ratio=0.2, metric="bi", planner="rank", repair="none", adapter=sm.adapter
    )
    assert plan.remove
    assert not hidden(sm.model), "streaming pass"
