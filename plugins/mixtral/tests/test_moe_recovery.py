"""LoRA healing reaches MoE models through the IR: attention, router and shared-expert linears adapt, fused
expert tensors stay frozen, and the merged model equals the adapter model."""

from __future__ import annotations

import pytest
import torch
from moe_tiny import tiny_mixtral, tiny_qwen2_moe

import prunekit_core as pk
from prunekit_core.study.recovery import heal_lora, lora_targets


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe])
def test_lora_heals_moe_and_merges(build) -> None:  # noqa: ANN001
    model = build("eager")
    ir = pk.inspect(model)
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, ir), remove=[ir.blocks()[-1].id])
    pk.apply_plan(model, plan)
    fused = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 3}
    assert fused, "the tiny MoE has fused expert tensors"
    targets = lora_targets(model, pk.inspect(model))
    assert any(t.endswith("q_proj") for t in targets)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 8), generator=gen).repeat(1, 3)
    with torch.no_grad():
        before = float(model(input_ids=ids, labels=ids).loss)
    healed, report = heal_lora(model, ids, rank=4, steps=25, lr=1e-2, seed=0)
    with torch.no_grad():
        after = float(healed(input_ids=ids, labels=ids).loss)
    assert after < before, (before, after)
    assert report.merge_max_abs_diff < 1e-4
    for name, value in fused.items():
        assert torch.equal(dict(healed.named_parameters())[name], value), f"{name} changed"
