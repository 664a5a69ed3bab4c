"""MoE specifics: match scores, hand-computed IR numbers, expert surgery against an explicit router reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from moe_tiny import IMPLEMENTATIONS, tiny_mixtral, tiny_qwen2_moe
from prunekit_llama import LlamaFamilyAdapter
from prunekit_mixtral import MoEAdapter
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.model import GroupMember
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import apply_plan
from prunekit_core.surgery.routing import router_rows_masked

H, I_MIX, E_MIX = 32, 48, 4
ROUTED_MIX = 2 * I_MIX * H + H * I_MIX + H  # gate/up rows, down, router row of one expert


def applied(model, remove=(), groups=None, **plan_fields):
    adapter = MoEAdapter()
    plan = PrunePlan(
        fingerprint=fingerprint(model, adapter.build_ir(model)),
        remove=list(remove),
        remove_groups=groups or {},
        **plan_fields,
    )
    return apply_plan(model, plan, adapter=adapter)


def prune(model, remove=(), groups=None, **plan_fields):
    return applied(model, remove, groups, **plan_fields).model


class RenamedMixtral(MixtralForCausalLM):
    """The Mixtral layout under another class name."""


def ids(n=2, length=12, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# --- match -------------------------------------------------------------------------------------------


def test_match_scores() -> None:
    adapter = MoEAdapter()
    assert adapter.match(tiny_mixtral()) == 100 and adapter.match(tiny_qwen2_moe()) == 100
    renamed = RenamedMixtral(tiny_mixtral().config).eval()
    assert adapter.match(renamed) == 10
    assert LlamaFamilyAdapter().match(renamed) is None  # fused experts are no dense MLP
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    )
    assert adapter.match(llama) is None


# --- IR ----------------------------------------------------------------------------------------------


def test_mixtral_ir() -> None:
    model = tiny_mixtral()
    ir = MoEAdapter().build_ir(model)
    subs = {s.id: s for s in ir.sublayers()}
    moe = subs["text.blocks.0.moe"]
    p = "model.layers.0.mlp"
    assert (moe.kind, moe.module, moe.norm, moe.output) == (
        "moe",
        p,
        "model.layers.0.post_attention_layernorm",
        "tensor",
    )
    assert moe.params == E_MIX * ROUTED_MIX + H  # experts, router, pre-norm
    experts, channels = moe.channel_groups
    assert (experts.id, experts.kind, experts.count, experts.params_per_group) == (
        "text.blocks.0.moe.experts",
        "expert",
        E_MIX,
        ROUTED_MIX,
    )
    assert experts.members == (
        GroupMember(param=f"{p}.experts.gate_up_proj", axis=0, width=1),
        GroupMember(param=f"{p}.experts.down_proj", axis=0, width=1),
        GroupMember(param=f"{p}.gate.weight", axis=0, width=1),
    )
    assert experts.router == f"{p}.gate.weight" and experts.config_fields == {"num_local_experts": 1}
    assert experts.top_k.value == 2 and experts.top_k.config_field == "num_experts_per_tok"
    assert set(experts.top_k.counters) == {f"{p}.gate.top_k", f"{p}.top_k"}
    assert (channels.kind, channels.count, channels.params_per_group) == (
        "expert_channel",
        I_MIX,
        3 * E_MIX * H,
    )
    assert [(m.axis, m.offset) for m in channels.members] == [(1, 0), (1, I_MIX), (2, 0)]
    assert channels.config_fields == {"intermediate_size": 1} and channels.multiple_of == 8
    assert [e.id for e in moe.experts] == [f"text.blocks.0.moe.experts.{e}" for e in range(E_MIX)]
    assert [e.router_row for e in moe.experts] == list(range(E_MIX))
    assert not any(e.shared for e in moe.experts)


def test_qwen2_moe_ir_shared_expert_and_dense_layer() -> None:
    model = tiny_qwen2_moe(mlp_only_layers=[1])
    ir = MoEAdapter().build_ir(model)
    subs = {s.id: s for s in ir.sublayers()}
    assert subs["text.blocks.1.mlp"].kind == "mlp"
    assert [g.id for g in subs["text.blocks.1.mlp"].channel_groups] == ["text.blocks.1.mlp.channels"]
    moe = subs["text.blocks.0.moe"]
    fams = {g.id: g for g in moe.channel_groups}
    assert fams["text.blocks.0.moe.experts"].config_fields == {"num_experts": 1}
    assert fams["text.blocks.0.moe.expert_channels"].config_fields == {"moe_intermediate_size": 1}
    shared = fams["text.blocks.0.moe.shared_expert.channels"]
    assert (shared.kind, shared.count, shared.config_fields) == (
        "ffn_channel",
        40,
        {"shared_expert_intermediate_size": 1},
    )
    (shared_unit,) = [e for e in moe.experts if e.shared]
    assert shared_unit.id == "text.blocks.0.moe.shared_expert" and shared_unit.router_row is None
    assert shared_unit.params == 3 * 40 * H + H  # gated MLP + its sigmoid gate
    assert sum(not e.shared for e in moe.experts) == 5


# --- expert removal against an explicit router reference -------------------------------------------


def _reference_router(router, removed: list[int]):
    """The router's forward, written out, with the removed experts' logits at -inf."""

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden_states, router.weight)
        logits[:, removed] = float("-inf")
        probs = F.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    return forward


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "make", [tiny_mixtral, tiny_qwen2_moe, lambda impl: tiny_qwen2_moe(impl, norm_topk_prob=True)]
)
@pytest.mark.parametrize("expert", [0, 2])
def test_removing_expert_equals_router_logit_at_minus_inf(make, implementation, expert) -> None:
    model = make(implementation)
    x = ids()
    reference = copy.deepcopy(model)
    for layer in (0, 2):
        router = reference.model.layers[layer].mlp.gate
        router.forward = _reference_router(router, [expert])
    with torch.no_grad():
        want = reference(input_ids=x).logits
        before = model(input_ids=x).logits
        with router_rows_masked(model, {f"model.layers.{i}.mlp.gate.weight": [expert] for i in (0, 2)}):
            masked = model(input_ids=x).logits
    assert (want - before).abs().max() > 1e-2, "the reference does not change the model"
    torch.testing.assert_close(masked, want, atol=1e-5, rtol=0)  # the core's masking agrees
    groups = {f"text.blocks.{i}.moe.experts": [expert] for i in (0, 2)}
    pruned = prune(model, groups=groups)
    with torch.no_grad():
        got = pruned(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    e = pruned.model.layers[0].mlp
    n = e.gate.weight.shape[0]
    assert (
        n
        == e.experts.num_experts
        == e.gate.num_experts
        == e.experts.gate_up_proj.shape[0]
        == e.experts.down_proj.shape[0]
    )
    assert pruned.model.layers[1].mlp.experts.num_experts == n + 1  # untouched layer
    assert pruned.config.get_text_config().to_dict()[MoEAdapter().expert_count_field(pruned.config)] == n + 1


def test_uniform_expert_removal_updates_every_count() -> None:
    run = applied(tiny_mixtral(), groups={f"text.blocks.{i}.moe.experts": [1] for i in range(4)})
    model = run.model
    assert model.config.num_local_experts == model.config.num_experts == 3 == model.num_experts
    for layer in model.model.layers:
        assert layer.mlp.experts.num_experts == layer.mlp.gate.num_experts == 3
        assert layer.mlp.top_k == layer.mlp.gate.top_k == 2
    assert model.config.num_experts_per_tok == model.num_experts_per_tok == 2
    assert run.plan.is_uniform


def test_clamped_top_k_uniform_sets_config() -> None:
    groups = {f"text.blocks.{i}.moe.experts": [0, 1, 2] for i in range(4)}
    run = applied(tiny_mixtral(), groups=groups, top_k_policy="clamp")
    model = run.model
    assert model.config.num_local_experts == 1 and model.config.num_experts_per_tok == 1
    assert all(layer.mlp.gate.top_k == layer.mlp.top_k == 1 for layer in model.model.layers)
    assert run.plan.width_uniform


def test_errors_name_the_problem() -> None:
    model = tiny_qwen2_moe()
    with pytest.raises(
        PlanError, match="all 5 groups of text.blocks.0.moe.experts.*no expert.*remove the sublayer"
    ):
        prune(model, groups={"text.blocks.0.moe.experts": [0, 1, 2, 3, 4]})
    with pytest.raises(PlanError, match=r"leaves 1 of 5 experts.*top_k=2.*--top-k clamp"):
        prune(model, groups={"text.blocks.0.moe.experts": [0, 1, 2, 3]})
    with pytest.raises(PlanError, match="multiple of 8"):
        prune(model, groups={"text.blocks.0.moe.expert_channels": [0, 1, 2]})
    with pytest.raises(PlanError, match=r"is an expert.*'text.blocks.0.moe.experts': \[3\]"):
        prune(model, remove=["text.blocks.0.moe.experts.3"])
    with pytest.raises(PlanError, match="shared expert"):
        prune(model, remove=["text.blocks.0.moe.shared_expert"])
    with pytest.raises(PlanError, match="has 5 groups"):
        prune(model, groups={"text.blocks.0.moe.experts": [5]})


def test_block_and_moe_removal_reuse_core_mechanism() -> None:
    """Removing a whole MoE sublayer or a block needs nothing MoE-specific: the branch stand-in and the
    block deletion of the core."""
    from prunekit_core.surgery.apply import RemovedBranch

    model = prune(tiny_qwen2_moe(), remove=["text.blocks.0.moe", "text.blocks.2"])
    assert isinstance(model.model.layers[0].mlp, RemovedBranch) and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_per_layer_clamped_top_k_survives_save_and_load(tmp_path) -> None:
    from prunekit_core.io.checkpoint import load_pruned, save_pruned

    groups = {"text.blocks.0.moe.experts": [0, 1, 2, 3], "text.blocks.2.moe.experts": [3]}
    run = applied(tiny_qwen2_moe(), remove=["text.blocks.1.moe"], groups=groups, top_k_policy="clamp")
    model = run.model
    assert model.config.num_experts_per_tok == 2 and model.config.num_experts == 5  # the largest
    assert model.model.layers[0].mlp.gate.top_k == 1 and model.model.layers[2].mlp.gate.top_k == 2
    assert not run.plan.is_uniform
    loaded = load_pruned(save_pruned(model, tmp_path / "out", plan=run.plan))
    loaded.set_experts_implementation("grouped_mm")
    assert [getattr(layer.mlp, "gate", None) and layer.mlp.gate.top_k for layer in loaded.model.layers] == [
        1,
        None,
        2,
        2,
    ]
    assert [layer.mlp.experts.num_experts for i, layer in enumerate(loaded.model.layers) if i != 1] == [
        1,
        4,
        5,
    ]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=0, rtol=0)
