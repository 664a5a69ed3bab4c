"""Expert metrics (one shared calibration pass), the expert planner and the CLI's --granularity expert."""

from __future__ import annotations

import json
import math

import pytest
import torch
from moe_tiny import save_tiny_mixtral, tiny_mixtral, tiny_qwen2_moe
from prunekit_mixtral import MoEAdapter
from prunekit_mixtral.metrics import STATS_KEY, expert_stats
from transformers import AutoModelForCausalLM

from prunekit_core import load_pruned, read_plan
from prunekit_core.cli import main
from prunekit_core.ir.errors import PlanError
from prunekit_core.planning.planner import plan_pruning
from prunekit_core.registry.plugins import get_metric
from prunekit_core.scoring.calibration import Calibration, ScoringContext
from prunekit_core.surgery.apply import apply_plan

METRICS = ("expert_frequency", "expert_mass", "moe_pruner", "expert_reconstruction", "expert_random")


def windows(n=4, length=16, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def context(model):
    adapter = MoEAdapter()
    return ScoringContext(
        model=model, adapter=adapter, ir=adapter.build_ir(model), calibration=Calibration(windows())
    )


def test_one_calibration_pass_serves_every_metric() -> None:
    model = tiny_mixtral()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    ctx = context(model)
    scores = {name: get_metric(name).score_groups(ctx) for name in METRICS}
    assert len(calls) == 1, f"{len(calls)} model forwards for {len(METRICS)} metrics (batch of 4 windows)"
    assert STATS_KEY in ctx._cache
    for name, per_family in scores.items():
        assert set(per_family) == {f"text.blocks.{i}.moe.experts" for i in range(4)}, name
        assert all(t.shape == (4,) for t in per_family.values()), name


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen2_moe])
def test_frequency_and_mass_add_up(make) -> None:
    model = make()
    ctx = context(model)
    freq = get_metric("expert_frequency").score_groups(ctx)
    mass = get_metric("expert_mass").score_groups(ctx)
    top_k = model.config.num_experts_per_tok
    for fid in freq:
        # every token picks top_k experts; Mixtral's top-k weights sum to 1, Qwen2-MoE's (no renorm) to less
        assert float(freq[fid].sum()) == pytest.approx(top_k)
        total = float(mass[fid].sum())
        if make is tiny_mixtral:
            assert total == pytest.approx(1.0)
        else:
            assert 0 < total < 1


@torch.no_grad()
def test_moe_pruner_matches_a_per_token_computation() -> None:
    """MoE-Pruner's expert score recomputed token by token from captured routing, for layer 1."""
    model = tiny_qwen2_moe()
    ctx = context(model)
    got = get_metric("moe_pruner").score_groups(ctx)["text.blocks.1.moe.experts"]
    moe = model.model.layers[1].mlp
    seen = {}
    moe.experts.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0], idx=a[1], w=a[2]))
    with torch.no_grad():
        model(input_ids=windows(), use_cache=False)
    x, idx, w = seen["x"].double(), seen["idx"], seen["w"].double()
    inter = moe.experts.gate_up_proj.shape[1] // 2
    for e in range(4):
        in_sq = torch.zeros(x.shape[1], dtype=torch.float64)
        mid_sq = torch.zeros(inter, dtype=torch.float64)
        for t in range(x.shape[0]):
            for k in range(idx.shape[1]):
                if idx[t, k] == e:
                    g = w[t, k]
                    in_sq += (g * x[t]) ** 2
                    h = moe.experts.gate_up_proj[e].double() @ x[t]
                    mid_sq += (g * torch.nn.functional.silu(h[:inter]) * h[inter:]) ** 2
        want = (moe.experts.gate_up_proj[e].double().abs() * in_sq.sqrt()).sum()
        want += (moe.experts.down_proj[e].double().abs() * mid_sq.sqrt()).sum()
        assert float(got[e]) == pytest.approx(float(want), rel=1e-9)


def test_reconstruction_equals_the_pruned_block_output() -> None:
    """The reconstruction score of expert e is the relative change of the MoE block's output when e is
    really removed (surgery), on the sampled inputs."""
    model = tiny_mixtral()
    ctx = context(model)
    got = get_metric("expert_reconstruction").score_groups(ctx)["text.blocks.2.moe.experts"]
    x = expert_stats(ctx).inputs["text.blocks.2.moe.experts"]
    assert x.shape == (1, windows().numel(), 32)
    with torch.no_grad():
        y = model.model.layers[2].mlp(x).double()
    for e in range(4):
        from prunekit_core.ir.plan import PrunePlan, fingerprint

        pruned = tiny_mixtral()
        plan = PrunePlan(
            fingerprint=fingerprint(pruned, ctx.ir),
            remove=[],
            remove_groups={"text.blocks.2.moe.experts": [e]},
        )
        apply_plan(pruned, plan, adapter=MoEAdapter())
        with torch.no_grad():
            ye = pruned.model.layers[2].mlp(x).double()
        assert float(got[e]) == pytest.approx(float(((y - ye) ** 2).sum() / (y**2).sum()), rel=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_uniform_plan_removes_ratio_of_every_layer(metric) -> None:
    model = tiny_qwen2_moe()
    plan = plan_pruning(model, Calibration(windows()), ratio=0.25, granularity="expert", metric=metric)
    assert plan.granularity == "expert" and plan.method == f"expert:{metric}"
    assert {f: len(g) for f, g in plan.remove_groups.items()} == {
        f"text.blocks.{i}.moe.experts": math.ceil(0.25 * 5) for i in range(4)
    }
    assert plan.width_uniform and plan.is_uniform
    assert set(plan.scores) == {f"text.blocks.{i}.moe.experts.{e}" for i in range(4) for e in range(5)}
    scores = get_metric(metric).score_groups(context(tiny_qwen2_moe()))
    for fid, removed in plan.remove_groups.items():  # the least important go
        assert sorted(removed) == sorted(int(i) for i in torch.argsort(scores[fid], stable=True)[:2])
    apply_plan(model, plan)
    assert model.config.num_experts == 3


def test_global_plan_gives_per_layer_counts_and_keeps_top_k() -> None:
    model = tiny_mixtral()
    plan = plan_pruning(
        model,
        Calibration(windows()),
        ratio=0.5,
        granularity="expert",
        metric="expert_random",
        expert_allocation="global",
    )
    counts = [4 - len(plan.remove_groups.get(f"text.blocks.{i}.moe.experts", [])) for i in range(4)]
    assert sum(counts) == 8 and min(counts) >= 2  # half of 16 experts go, every layer keeps top_k=2
    apply_plan(model, plan)
    assert [layer.mlp.experts.num_experts for layer in model.model.layers] == counts


def test_top_k_errors_and_clamp() -> None:
    with pytest.raises(PlanError, match=r"leaves fewer than the 2.*--top-k clamp"):
        plan_pruning(
            tiny_mixtral(), Calibration(windows()), ratio=0.75, granularity="expert", metric="expert_mass"
        )
    plan = plan_pruning(
        tiny_mixtral(),
        Calibration(windows()),
        ratio=0.75,
        granularity="expert",
        metric="expert_mass",
        top_k_policy="clamp",
    )
    model = apply_plan(tiny_mixtral(), plan).model
    assert model.config.num_local_experts == 1 and model.config.num_experts_per_tok == 1


def test_metric_and_granularity_must_fit() -> None:
    with pytest.raises(PlanError, match="scores experts; use --granularity expert"):
        plan_pruning(
            tiny_mixtral(), Calibration(windows()), ratio=0.25, granularity="width", metric="moe_pruner"
        )
    with pytest.raises(PlanError, match="does not score experts"):
        plan_pruning(tiny_mixtral(), Calibration(windows()), ratio=0.25, granularity="expert", metric="bi")


def test_cli_prune_granularity_expert(tmp_path, capsys) -> None:
    folder = save_tiny_mixtral(tmp_path / "mixtral")
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(1)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (3000,), generator=gen)) + "\n")
    common = ["--calib", text, "--granularity", "expert", "--windows", "2", "--seq-len", "16", "--json"]
    code = main([str(a) for a in ["prune", folder, "--ratio", "0.25", *common, "--out", tmp_path / "u"]])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["uniform"] and out["budget"]["unit"] == "experts per MoE layer"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    assert plain.config.num_local_experts == 3
    argv = [
        "prune",
        folder,
        "--ratio",
        "0.5",
        *common,
        "--expert-allocation",
        "global",
        "--out",
        tmp_path / "g",
    ]
    argv += ["--metric", "expert_random"]
    assert main([str(a) for a in argv]) == 0
    out = json.loads(capsys.readouterr().out)
    loaded = load_pruned(tmp_path / "g")
    assert sum(layer.mlp.experts.num_experts for layer in loaded.model.layers) == 8
    assert out["plan"]["remove_groups"] == read_plan(tmp_path / "g").remove_groups


def test_width_planner_says_what_it_cannot_plan() -> None:
    """With obs (no score for channels inside fused experts) only KV groups are left to narrow: the error
    names what was not planned and how to reach it."""
    with pytest.raises(PlanError, match=r"--granularity expert; metric 'obs' does not score expert_channel"):
        plan_pruning(tiny_mixtral(), Calibration(windows()), ratio=0.1, granularity="width", round_to=8)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_width_planner_narrows_expert_channels_by_trials(allocation) -> None:
    model = tiny_mixtral()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_pruning(
        model,
        Calibration(windows()),
        ratio=0.1,
        granularity="width",
        metric="magnitude",
        round_to=8,
        width_allocation=allocation,
    )
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "trials left weights changed"
    channels = {f: g for f, g in plan.remove_groups.items() if f.endswith("expert_channels")}
    assert channels and all(len(g) % 8 == 0 for g in channels.values()), plan.remove_groups
    assert not any(f.endswith(".experts") for f in plan.remove_groups)
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    assert (
        before - sum(p.numel() for p in model.parameters()) == plan.removed_params >= 0.1 * plan.block_params
    )
    if allocation == "uniform":
        assert plan.width_uniform and len({len(g) for g in channels.values()}) == 1


def test_width_planner_narrows_shared_expert_and_dense_channels() -> None:
    model = tiny_qwen2_moe(mlp_only_layers=[1])
    plan = plan_pruning(model, Calibration(windows()), ratio=0.03, granularity="width", round_to=8)
    assert plan.remove_groups and not any(
        ".experts" in f or "expert_channels" in f for f in plan.remove_groups
    ), plan.remove_groups
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan, repair_windows=windows())
    assert before - sum(p.numel() for p in model.parameters()) == plan.removed_params


def test_score_groups_shares_one_pass_across_metrics() -> None:
    from prunekit_core.scoring.api import score_groups

    model = tiny_mixtral()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    out = score_groups(model, Calibration(windows()), ["expert_frequency", "expert_mass", "moe_pruner"])
    assert list(out) == ["expert_frequency", "expert_mass", "moe_pruner"] and len(calls) == 1
