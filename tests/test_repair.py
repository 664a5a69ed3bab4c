"""Least-squares repair: it must help where it can, do nothing where nothing was lost, and keep shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import sampled_windows, tiny_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from prunekit_core import PlanError, PrunePlan, apply_plan, fingerprint, inspect, load_pruned, save_pruned
from prunekit_core.surgery.apply import branches_masked, resolve_removals
from prunekit_core.surgery.repair import lsq_repair


def _model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(layers=4, tied=False, seed=seed)


def _windows(n: int = 8, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 50, (n, seq), generator=torch.Generator().manual_seed(1))


def _plan(model, remove, repair="lsq") -> PrunePlan:
    return PrunePlan(fingerprint=fingerprint(model, inspect(model)), remove=remove, repair=repair)


def _stream_after(model, windows, block: int) -> torch.Tensor:
    out = model(input_ids=windows, output_hidden_states=True)
    return out.hidden_states[block]


def test_repair_reduces_reconstruction_error() -> None:
    ref = _model()
    w = sampled_windows(ref, 32, 32)  # the unpruned model's own text: the fold has a held-out loss to win
    target = _stream_after(ref, w, 3).detach()  # stream after block 2 in the unpruned model
    plain, fixed = copy.deepcopy(ref), copy.deepcopy(ref)
    apply_plan(plain, _plan(plain, ["text.blocks.2"], repair="none"))
    applied = apply_plan(fixed, _plan(fixed, ["text.blocks.2"]), repair_windows=w)
    assert [st.status for st in applied.repair_steps] == ["folded"], applied.plan.notes
    with torch.no_grad():
        err_plain = (_stream_after(plain, w, 2) - target).pow(2).sum()
        err_fixed = (_stream_after(fixed, w, 2) - target).pow(2).sum()
    # a random block is mostly unpredictable from its writer's input: the fold (fitted on 3/4 of the windows,
    # its ridge on a part of those) explains about 8% of it here
    assert err_fixed < 0.95 * err_plain
    # only the writer (block 1's down_proj) changed
    changed = [n for n, p in fixed.state_dict().items() if not torch.equal(p, plain.state_dict()[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_nothing_lost_means_nothing_changed() -> None:
    model = _model()
    with torch.no_grad():  # block 2 contributes exactly zero
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    before = copy.deepcopy(model.model.layers[1].mlp.down_proj.weight)
    ir = inspect(model)
    steps = lsq_repair(
        model, ir, resolve_removals(ir, ["text.blocks.2"]), _windows(8), masked=branches_masked
    )
    assert len(steps) == 1 and steps[0].writer == "model.layers.1.mlp.down_proj"
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)


def test_sublayer_run_uses_attention_writer_and_first_run_is_skipped() -> None:
    model = _model()
    ir = inspect(model)
    removals = resolve_removals(ir, ["text.blocks.0.attn", "text.blocks.2.mlp"])
    steps = lsq_repair(model, ir, removals, _windows(8), masked=branches_masked)
    # block 0's attention has no surviving writer before it (declined); block 2's MLP folds into its attention
    assert [(s.status, s.writer) for s in steps][0] == ("declined", "")
    assert "no surviving branch with an output projection before it" in steps[0].note
    assert [s.writer for s in steps[1:]] == ["model.layers.2.self_attn.o_proj"]


def test_repair_plan_needs_windows_and_leaves_model_untouched() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match="repair_windows"):
        apply_plan(model, _plan(model, ["text.blocks.1"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(model.model.layers) == 4


def test_repaired_uniform_plan_reloads_with_plain_transformers(tmp_path) -> None:
    model = _model()
    w = _windows(8)
    apply_plan(model, _plan(model, ["text.blocks.1", "text.blocks.2"]), repair_windows=w)
    out = save_pruned(model, tmp_path / "m")
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.allclose(plain(w).logits, model(w).logits, atol=1e-6)
        assert torch.allclose(load_pruned(out)(w).logits, model(w).logits, atol=1e-6)


def test_repaired_block_influence_ranks_a_silent_block_first_and_never_exceeds_unrepaired_loss() -> None:
    from prunekit_core.scoring.builtin_metrics import block_repair_residuals

    model = _model()
    with torch.no_grad():  # block 2 contributes exactly zero
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    w = _windows(8)
    ir = inspect(model)
    repaired = block_repair_residuals(model, ir, w)
    assert repaired["text.blocks.2"] == 0.0
    assert min(repaired, key=repaired.get) == "text.blocks.2"
    # the unrepaired share of each block, from the hidden states: the fold can only lower it
    with torch.no_grad():
        hs = model(input_ids=w, output_hidden_states=True).hidden_states
    for i in range(3):  # hidden_states[4] is after the final norm
        d, x = hs[i + 1].double() - hs[i].double(), hs[i + 1].double()
        plain = float((d * d).sum() / (x * x).sum())
        assert repaired[f"text.blocks.{i}"] <= plain + 1e-9
    assert repaired["text.blocks.0"] == pytest.approx(
        float(((hs[1].double() - hs[0].double()) ** 2).sum() / (hs[1].double() ** 2).sum()), rel=1e-9
    )  # no writer before block 0: nothing to fold into


def test_bi_lsq_metric_is_registered_and_plans_blocks() -> None:
    import prunekit_core as pk

    model = _model()
    cal = pk.calibrate(model, _windows(8))
    scores = pk.score(model, cal, "bi_lsq")
    assert scores.unit == "block" and set(scores.values) == {f"text.blocks.{i}" for i in range(4)}
    plan = pk.plan_pruning(model, cal, ratio=0.2, metric="bi_lsq", granularity="block", planner="rank")
    assert plan.remove == [min(scores.values, key=scores.values.get)]


def test_repair_recovers_an_exactly_linear_block() -> None:
    """A removed block whose contribution is an exact linear map of the writer's input comes back exactly
    (up to the smallest ridge on the grid)."""
    model = _model()
    torch.manual_seed(5)
    writer = model.model.layers[0].mlp.down_proj
    lin = torch.randn(writer.out_features, writer.in_features) * 0.05
    stash: dict[str, torch.Tensor] = {}
    writer.register_forward_hook(lambda mod, args, out: stash.__setitem__("a", args[0]))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()  # block 1: attention adds nothing
    model.model.layers[1].mlp.forward = lambda x: stash["a"] @ lin.T  # ... and the MLP adds A @ lin^T
    w = _windows(32)
    with torch.no_grad():
        target = _stream_after(model, w, 2)  # stream after block 1
    plain, fixed = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(plain, _plan(plain, ["text.blocks.1"], repair="none"))
    stash.clear()
    apply_plan(fixed, _plan(fixed, ["text.blocks.1"]), repair_windows=w)
    with torch.no_grad():
        err_plain = (_stream_after(plain, w, 1) - target).norm()
        err_fixed = (_stream_after(fixed, w, 1) - target).norm()
        dw = fixed.model.layers[0].mlp.down_proj.weight - plain.model.layers[0].mlp.down_proj.weight
    assert err_plain > 0.01 * target.norm()  # the block did contribute
    assert err_fixed < 1e-2 * err_plain, (float(err_fixed), float(err_plain))
    torch.testing.assert_close(dw, lin, atol=2e-3, rtol=2e-2)
