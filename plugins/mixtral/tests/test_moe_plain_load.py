"""A checkpoint with per-layer expert counts: plain transformers refuses it, load_pruned loads it exactly."""

from __future__ import annotations

import json

import pytest
import torch
from moe_tiny import tiny_mixtral
from prunekit_mixtral import MoEAdapter
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from prunekit_core.io.checkpoint import PLAIN_LOAD_GUARD_KEY, load_pruned, save_pruned
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import AppliedPlan, apply_plan
from prunekit_core.testing import assert_identical, assert_kernel_close, assert_same_weights

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def prune(groups: dict[str, list[int]]) -> AppliedPlan:
    model, adapter = tiny_mixtral("eager"), MoEAdapter()
    plan = PrunePlan(fingerprint=fingerprint(model, adapter.build_ir(model)), remove=[], remove_groups=groups)
    return apply_plan(model, plan, adapter=adapter)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("loader", [AutoModelForCausalLM, MixtralForCausalLM], ids=lambda c: c.__name__)
def test_per_layer_expert_counts_refuse_plain_from_pretrained(tmp_path, loader) -> None:
    applied = prune({"text.blocks.0.moe.experts": [1], "text.blocks.2.moe.experts": [0, 3]})
    model = applied.model
    assert not applied.plan.is_uniform
    out = save_pruned(model, tmp_path / "out", plan=applied.plan)
    with pytest.raises(ValueError, match=r"prunekit_core\.load_pruned"):
        loader.from_pretrained(out)
    loaded = load_pruned(out)
    loaded.set_experts_implementation("eager")
    assert_identical(logits(loaded), logits(model))


def test_uniform_expert_counts_still_load_plainly(tmp_path) -> None:
    applied = prune({f"text.blocks.{i}.moe.experts": [1] for i in range(4)})
    model = applied.model
    assert applied.plan.is_uniform
    out = save_pruned(model, tmp_path / "out", plan=applied.plan)
    assert PLAIN_LOAD_GUARD_KEY not in json.loads((out / "config.json").read_text())
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    plain.eval().set_experts_implementation("eager")
    # plain transformers memory-maps the weights unaligned: the same weights, perhaps other kernels
    assert_same_weights(plain, model)
    assert_kernel_close(logits(plain), logits(model))
