"""Width pruning: metrics, the cost model, the width and mixed planners, refit, rounding, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import words
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit_core as pk
from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.model import ChannelGroup, GroupMember
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.planning.planner import BEST_WIDTH
from prunekit_core.planning.width import (
    FamilyCost,
    _output_energy_curve,
    allocate_global,
    allowed_cuts,
    round_step,
)
from prunekit_core.registry.plugins import get_metric
from prunekit_core.scoring.calibration import Calibration


def model_(
    *, heads: int = 4, kv: int = 2, inter: int = 64, layers: int = 4, seed: int = 0
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=8,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def windows(n: int = 8, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


# --- rounding ----------------------------------------------------------------------------------------------


def _fam(count: int, widths: tuple[int, ...]) -> ChannelGroup:
    members = tuple(GroupMember(param=f"m{i}.weight", axis=0, width=w) for i, w in enumerate(widths))
    return ChannelGroup(id="f", kind="ffn_channel", count=count, members=members, params_per_group=1)


def test_round_step_and_allowed_cuts() -> None:
    assert round_step(_fam(1536, (1, 1, 1)), 32) == 32
    assert round_step(_fam(3, (192, 64, 64, 192)), 32) == 1  # KV groups of head_dim 64
    assert round_step(_fam(3, (192, 64, 64, 192)), 128) == 2
    ks = allowed_cuts(_fam(100, (1,)), 32, allow_all=False)
    assert ks == [0, 4, 36, 68]  # kept 96, 64, 32 (and untouched)
    assert allowed_cuts(_fam(3, (64,)), 32, allow_all=True) == [0, 1, 2, 3]
    with pytest.raises(PlanError, match="round-to"):
        round_step(_fam(3, (64,)), 0)


# --- the cost model ------------------------------------------------------------------------------------


def test_output_energy_curves_match_direct_computation() -> None:
    torch.manual_seed(0)
    count, width = 6, 2
    a = torch.randn(200, count * width, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    W = torch.randn(5, 12, dtype=torch.float64)
    G = a.T @ a
    member = GroupMember(param="p.weight", axis=1, width=width)
    order = [3, 0, 5, 1, 4, 2]  # least important first
    plain = _output_energy_curve(W, G, member, count, order, repair=False)
    fitted = _output_energy_curve(W, G, member, count, order, repair=True)
    y = a @ W.T
    for k in range(count + 1):
        gone = order[:k]
        cols = [g * width + j for g in gone for j in range(width)]
        kept = [c for c in range(12) if c not in cols]
        direct = float(((a[:, cols] @ W[:, cols].T) ** 2).sum()) if cols else 0.0
        assert plain[k].item() == pytest.approx(direct, rel=1e-9, abs=1e-9)
        if kept:
            sol = torch.linalg.lstsq(a[:, kept], y).solution
            resid = float(((a[:, kept] @ sol - y) ** 2).sum())
        else:
            resid = float((y**2).sum())
        assert fitted[k].item() == pytest.approx(resid, rel=1e-6, abs=1e-6)
        assert fitted[k] <= plain[k] + 1e-9


# --- refit ------------------------------------------------------------------------------------------------


def test_refit_recovers_a_duplicated_channel_exactly() -> None:
    """A removed FFN channel that duplicates a kept one is exactly linear in it: the refit recovers it."""
    model = model_()
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[5] = mlp.gate_proj.weight[2]
        mlp.up_proj.weight[5] = mlp.up_proj.weight[2]
    ids = windows()
    before = logits(model, ids)
    fid = "text.blocks.1.mlp.channels"
    for repair, exact in (("none", False), ("lsq", True)):
        pruned = copy.deepcopy(model)
        plan = PrunePlan(
            fingerprint=fingerprint(pruned, pk.inspect(pruned)),
            remove=[],
            remove_groups={fid: [5]},
            repair=repair,
        )
        pk.apply_plan(pruned, plan, repair_windows=ids)
        assert pruned.model.layers[1].mlp.down_proj.in_features == 63
        diff = (logits(pruned, ids) - before).abs().max().item()
        assert (diff < 1e-4) == exact, f"repair={repair}: max logit change {diff}"


def test_lsq_width_plan_needs_windows() -> None:
    model = model_()
    plan = PrunePlan(
        fingerprint=fingerprint(model, pk.inspect(model)),
        remove=[],
        remove_groups={"text.blocks.0.mlp.channels": [1]},
        repair="lsq",
    )
    with pytest.raises(PlanError, match="repair_windows"):
        pk.apply_plan(model, plan)


# --- planners ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "taylor", "obs"])
def test_width_plan_meets_budget_and_rounding(metric: str) -> None:
    model = model_()
    ids = windows()
    cal = Calibration(windows=ids)
    plan = pk.plan_pruning(
        model, cal, ratio=0.2, metric=metric, granularity="width", repair="lsq", round_to=8
    )
    assert plan.granularity == "width" and plan.method == f"width:{metric}" and plan.remove == []
    assert plan.achieved_ratio >= 0.2
    fams = pk.inspect(model).channel_groups()
    for fid, groups in plan.remove_groups.items():
        fam = fams[fid][1]
        kept = fam.count - len(groups)
        assert kept >= 1 and kept % round_step(fam, 8) == 0, (fid, kept)
    ref = plan.removed_params
    pk.apply_plan(model, plan, repair_windows=ids)
    assert pk.inspect(model).block_params() == plan.block_params - ref
    same = PrunePlan.model_validate_json(plan.model_dump_json())
    assert same == plan


def test_width_scores_order_groups_sensibly() -> None:
    """A channel whose weights are all zero is the least important for every metric."""
    model = model_()
    with torch.no_grad():
        mlp = model.model.layers[2].mlp
        for t in (mlp.gate_proj.weight[7], mlp.up_proj.weight[7], mlp.down_proj.weight[:, 7]):
            t.zero_()
    ctx = pk.ScoringContext(
        model=model,
        adapter=pk.select_adapter(model),
        ir=pk.inspect(model),
        calibration=Calibration(windows=windows()),
    )
    for name in ("magnitude", "wanda", "taylor", "obs"):
        scores = get_metric(name).score_groups(ctx)["text.blocks.2.mlp.channels"]
        assert scores.shape == (64,) and int(scores.argmin()) == 7 and scores[7] == 0


def _fc(name: str, params: list[int], cost: list[float]) -> FamilyCost:
    return FamilyCost(name, name, [], list(range(len(params))), params, cost)


def test_allocator_follows_loss_per_parameter_and_finishes_cheaply() -> None:
    a = _fc("a", [0, 10, 20, 30], [0.0, 1.0, 3.0, 30.0])  # cheap at first, then steep
    b = _fc("b", [0, 10, 20, 100], [0.0, 2.0, 4.0, 4.5])  # partial cuts dear, whole removal a bargain
    # b's hull goes straight to whole removal (0.045 per parameter), but for 15 parameters a's
    # two steps (cost 3.0) finish the budget more cheaply than b whole (4.5)
    assert allocate_global([a, b], 15) == {"a": 2, "b": 0}
    assert allocate_global([a, b], 50) == {"a": 0, "b": 3}  # a cannot reach 50: b goes whole
    assert allocate_global([a, b], 5) == {"a": 1, "b": 0}
    pos = allocate_global([a, b], 105)  # b whole, then a's cheapest steps on top
    assert pos == {"a": 1, "b": 3}
    with pytest.raises(PlanError, match="cannot be met"):
        allocate_global([a], 31)


def test_mixed_plan_meets_budget_and_applies() -> None:
    model = model_()
    ids = windows()
    plan = pk.plan_pruning(
        model, Calibration(windows=ids), ratio=0.3, metric="wanda", granularity="mixed", repair="lsq"
    )
    assert plan.method == "mixed:wanda" and plan.achieved_ratio >= 0.3
    removed = plan.removed_params
    pk.apply_plan(model, plan, repair_windows=ids)
    assert pk.inspect(model).block_params() == plan.block_params - removed
    # removing a sublayer whole is only ever written as a unit, never also as groups
    assert not any(any(f.startswith(u + ".") for u in plan.remove) for f in plan.remove_groups)


def test_uniform_allocation_is_uniform_and_reloads_plainly(tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model = model_(heads=4, kv=4)  # 4 KV groups of one head: 32 % heads stays valid at 2 heads
    ids = windows()
    plan = pk.plan_pruning(
        model,
        Calibration(windows=ids),
        ratio=0.25,
        metric="wanda",
        granularity="width",
        repair="lsq",
        round_to=8,
        width_allocation="uniform",
    )
    counts = {}
    for fid, groups in plan.remove_groups.items():
        counts.setdefault(fid.rsplit(".", 1)[-1], set()).add(len(groups))
    assert all(len(v) == 1 for v in counts.values()) and len(plan.remove_groups) in (4, 8)
    assert plan.is_uniform
    pk.apply_plan(model, plan, repair_windows=ids)
    out = pk.save_pruned(model, tmp_path / "u")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), atol=0, rtol=0)


def test_config_that_transformers_rejects_falls_back_to_per_layer(tmp_path) -> None:  # noqa: ANN001
    """LlamaConfig demands hidden_size % num_attention_heads == 0: 3 of 4 heads cannot be described."""
    model = model_(heads=4, kv=4)
    ids = windows()
    groups = {f"text.blocks.{i}.attn.kv_groups": [0] for i in range(4)}
    plan = PrunePlan(fingerprint=fingerprint(model, pk.inspect(model)), remove=[], remove_groups=groups)
    applied = pk.apply_plan(model, plan)
    assert model.config.num_attention_heads == 4  # left as it was: 3 would not validate
    assert not applied.plan.is_uniform
    out = pk.save_pruned(model, tmp_path / "p", plan=applied.plan)
    assert not json.loads((out / "prunekit.json").read_text())["width_uniform"]  # read off the model
    loaded = pk.load_pruned(out)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)


def test_width_budget_too_large_is_a_clear_error() -> None:
    model = model_()
    cal = Calibration(windows=windows())
    with pytest.raises(PlanError, match="no uniform width plan removes"):
        pk.plan_pruning(model, cal, ratio=0.95, metric="magnitude", granularity="width")
    with pytest.raises(PlanError, match="cannot be met at this granularity"):
        pk.plan_pruning(
            model, cal, ratio=0.95, metric="magnitude", granularity="width", width_allocation="global"
        )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"text.blocks.0.mlp.chanels": [1]}, "did you mean 'text.blocks.0.mlp.channels'"),
        ({"text.blocks.0.mlp.channels": [64]}, "has 64 groups"),
        ({"text.blocks.0.mlp.channels": [1, 1]}, "more than once"),
        ({"text.blocks.0.attn.kv_groups": [0, 1]}, "remove the sublayer instead"),
    ],
)
def test_bad_width_plans_are_clear_errors(groups: dict, message: str) -> None:
    model = model_()
    plan = PrunePlan(fingerprint=fingerprint(model, pk.inspect(model)), remove=[], remove_groups=groups)
    with pytest.raises(PlanError, match=message):
        pk.apply_plan(model, plan)


def test_removing_and_narrowing_the_same_branch_is_refused() -> None:
    model = model_()
    plan = PrunePlan(
        fingerprint=fingerprint(model, pk.inspect(model)),
        remove=["text.blocks.0"],
        remove_groups={"text.blocks.0.mlp.channels": [1]},
    )
    with pytest.raises(PlanError, match="both removes"):
        pk.apply_plan(model, plan)


def test_cli_width_prune_end_to_end(tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    from helpers import tiny_tokenizer

    from prunekit_core.cli import main

    folder = tmp_path / "m"
    model_(inter=64).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(words(3000, seed=2) + "\n")
    out = tmp_path / "out"
    args = ["prune", folder, "--ratio", "0.2", "--calib", text, "--granularity", "width", "--round-to", "8"]
    code = main([str(a) for a in [*args, "--windows", "4", "--seq-len", "16", "--out", out, "--json"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["plan"]["method"] == f"width:{BEST_WIDTH['metric']}" and data["plan"]["repair"] == "lsq"
    assert data["achieved_ratio"] >= 0.2 and data["plan"]["remove_groups"]
    loaded = pk.load_pruned(out)
    assert pk.read_plan(out).remove_groups == data["plan"]["remove_groups"]
    assert pk.inspect(loaded).block_params() == data["plan"]["block_params"] - data["plan"]["removed_params"]


def test_cli_score_channel_metrics(tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    from helpers import tiny_tokenizer

    from prunekit_core.cli import main

    folder = tmp_path / "m"
    model_().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(words(2000, seed=3) + "\n")
    common = ["score", str(folder), "--calib", str(text), "--windows", "2", "--seq-len", "16"]
    assert main([*common, "--metric", "obs", "--metric", "magnitude", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"obs", "magnitude"}
    assert (
        len(data["obs"]["text.blocks.0.mlp.channels"]) == 64
        and len(data["obs"]["text.blocks.0.attn.kv_groups"]) == 2
    )
    assert main([*common, "--metric", "wanda"]) == 0
    assert "least important" in capsys.readouterr().out
    assert main([*common, "--metric", "wanda", "--metric", "bi"]) == 2
    assert "separate runs" in capsys.readouterr().err


def test_module_counters_are_set_saved_and_restored(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A family may declare module attributes that count its groups; surgery and reload keep them true."""
    import dataclasses

    from prunekit_llama import adapter as llama

    from prunekit_core.ir.model import ModuleCounter

    (channels,) = llama.MLP.groups

    def with_counter(branch, fid: str) -> ChannelGroup:  # noqa: ANN001
        fam = channels.build(branch, fid)
        return fam.model_copy(
            update={"counters": (ModuleCounter(module=branch.path, attr="live", per_group=1),)}
        )

    counted = dataclasses.replace(llama.MLP, groups=(dataclasses.replace(channels, build=with_counter),))
    monkeypatch.setattr(llama.LlamaFamilyAdapter, "branches", (llama.ATTENTION, counted))
    model = model_()
    for layer in model.model.layers:
        layer.mlp.live = 64  # a counter the (imagined) modeling code reads
    groups = {"text.blocks.1.mlp.channels": [0, 1, 2], "text.blocks.3.mlp.channels": [5]}
    plan = PrunePlan(
        fingerprint=fingerprint(model, pk.inspect(model)), remove=["text.blocks.0"], remove_groups=groups
    )
    pk.apply_plan(model, plan)
    # block 0 is gone: old blocks 1 and 3 are now 0 and 2
    assert model.model.layers[0].mlp.live == 61 and model.model.layers[2].mlp.live == 63
    assert model.model.layers[1].mlp.live == 64
    loaded = pk.load_pruned(pk.save_pruned(model, tmp_path / "c"))
    assert [layer.mlp.live for layer in loaded.model.layers] == [61, 64, 63]
