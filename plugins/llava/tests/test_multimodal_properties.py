"""Property-based tests (hypothesis) for the multimodal plugin: random valid plans across every tower.

A plan is drawn from the model's IR: whole blocks and branches of the vision and text towers (each tower
keeps one block whole), channel groups of the blocks that remain, and the channels of the conv stages
(GOT-OCR2's neck and projector). Every drawn plan must apply; the pruned model must run with an image and
give finite logits; it must remove exactly the parameters counted by the IR (``removed_params`` for units,
``width_removed_params`` for channel groups: the neck's two conv families cross in the second conv); and it
must save and reload with the same logits.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llava_tiny import pixel_values, tiny_llava, with_image_tokens
from prunekit_llava import LlavaAdapter
from prunekit_llava.got_ocr2 import GotOcr2Adapter
from test_got_ocr2 import inputs as got_inputs
from test_got_ocr2 import make_got
from torch import nn

from prunekit_core.adapters.base import ArchitectureAdapter
from prunekit_core.io.checkpoint import load_pruned, save_pruned
from prunekit_core.ir.model import ModelIR
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import apply_plan, removed_params, resolve_removals
from prunekit_core.surgery.width import resolve_width, width_removed_params


def _llava_inputs() -> dict[str, torch.Tensor]:
    ids = with_image_tokens(torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0)))
    return {"input_ids": ids, "pixel_values": pixel_values(2)}


def _got_inputs() -> dict[str, torch.Tensor]:
    ids, pixels = got_inputs()
    return {"input_ids": ids, "pixel_values": pixels}


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], ArchitectureAdapter], Callable[[], dict]]] = {
    "llava-clip": (lambda: tiny_llava("clip"), LlavaAdapter, _llava_inputs),
    "llava-siglip": (lambda: tiny_llava("siglip"), LlavaAdapter, _llava_inputs),
    "got-ocr2": (make_got, GotOcr2Adapter, _got_inputs),
}


@st.composite
def plans(draw: st.DrawFn, ir: ModelIR) -> tuple[list[str], dict[str, list[int]]]:
    remove: list[str] = []
    families = []
    for tower in ir.towers:
        blocks = [b for b in tower.blocks if b.removable]
        if not blocks:
            continue
        order = draw(st.permutations(blocks))
        n_gone = draw(st.integers(0, len(blocks) - 1))
        remove += [b.id for b in order[:n_gone]]
        for i, block in enumerate(order[n_gone:]):
            for sub in block.sublayers:
                if i > 0 and sub.removable and draw(st.booleans()):  # the first kept block stays whole
                    remove.append(sub.id)
                else:
                    families += sub.channel_groups
    families += [fam for _, fam in ir.stage_channel_groups().values()]
    groups: dict[str, list[int]] = {}
    for fam in families:
        if fam.router or not draw(st.booleans()):
            continue
        live_options = [n for n in range(1, fam.count) if n % fam.multiple_of == 0]
        if live_options:
            live = draw(st.sampled_from(live_options))
            groups[fam.id] = sorted(draw(st.permutations(range(fam.count)))[: fam.count - live])
    return remove, groups


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_multimodal_plan_applies_accounts_and_round_trips(family: str, data: st.DataObject) -> None:
    make, adapter_cls, make_inputs = FAMILIES[family]
    model, adapter, inputs = make(), adapter_cls(), make_inputs()
    ir = adapter.build_ir(model)
    remove, groups = data.draw(plans(ir), label="plan")
    before = _n_params(model)
    resolved = resolve_removals(ir, remove)
    cuts = resolve_width(ir, groups, removed_units=resolved.blocks | resolved.sublayers)
    expected = removed_params(ir, resolved) + width_removed_params(model, cuts)

    apply_plan(
        model,
        PrunePlan(fingerprint=fingerprint(model, ir), remove=remove, remove_groups=groups),
        adapter=adapter,
    )

    out = _logits(model, inputs)
    assert out.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out).all()
    assert before - _n_params(model) == expected
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_pruned(save_pruned(model, Path(tmp) / "ckpt"))
    torch.testing.assert_close(_logits(loaded, inputs), out, rtol=1e-5, atol=1e-5)
    assert _n_params(loaded) == _n_params(model)
