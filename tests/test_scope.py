"""Plan scope over towers (``ModelIR.restricted``) and the per-tower budget, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit_core as pk
from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.plan import fingerprint
from prunekit_core.planning.planner import budget_by_tower, budget_notes


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_restricted_keeps_ids_and_fingerprint_and_closes_other_towers():
    model = _model()
    ir = pk.inspect(model)
    assert ir.restricted(None) is ir and ir.restricted([]) is ir
    same = ir.restricted(["text"])
    assert same.scope == ("text",) and same.block_params() == ir.block_params()
    assert same.structure_signature() == ir.structure_signature()
    # a two-tower IR: the second tower is a copy of the first under another name
    other = ir.tower("text").model_copy(update={"name": "vision"})
    two = ir.model_copy(update={"towers": (other, ir.tower("text"))})
    only_text = two.restricted(["text"])
    assert only_text.block_params() == ir.block_params()
    assert not any(b.removable for b in only_text.tower("vision").blocks)
    assert not any(s.channel_groups for b in only_text.tower("vision").blocks for s in b.sublayers)
    assert all(b.removable for b in only_text.tower("text").blocks)
    assert only_text.structure_signature() == two.structure_signature()  # the plan's fingerprint holds


def test_restricted_refuses_unknown_or_empty_towers():
    ir = pk.inspect(_model())
    with pytest.raises(PlanError, match=r"unknown tower\(s\) \['vision'\]; this model has \['text'\]"):
        ir.restricted(["vision"])
    empty = ir.tower("text").model_copy(update={"name": "projector", "blocks": ()})
    two = ir.model_copy(update={"towers": (ir.tower("text"), empty)})
    with pytest.raises(PlanError, match="have no blocks to prune"):
        two.restricted(["projector"])


def test_budget_by_tower_counts_blocks_sublayers_and_groups():
    model = _model()
    ir = pk.inspect(model)
    plan = pk.PrunePlan(
        fingerprint=fingerprint(model, ir),
        remove=["text.blocks.1", "text.blocks.2.attn"],
        remove_groups={"text.blocks.3.mlp.channels": [0, 1]},
    )
    units = ir.units()
    fam = ir.channel_groups()["text.blocks.3.mlp.channels"][1]
    want = units["text.blocks.1"].params + units["text.blocks.2.attn"].params + 2 * fam.params_per_group
    assert budget_by_tower(ir, plan) == {"text": (want, ir.block_params())}
    assert budget_notes(ir, plan) == []  # one tower: nothing to split
