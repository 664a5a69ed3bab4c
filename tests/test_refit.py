"""Stream refit (surgery/refit.py): exact where the answer is known, no change where nothing was lost, only
foldable writers touched, and the result decodes with its cache and reloads with plain transformers."""

from __future__ import annotations

import copy

import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from prunekit_core import PrunePlan, apply_plan, fingerprint, inspect, save_pruned
from prunekit_core.ir.model import ModelIR
from prunekit_core.ir.stream import StreamWrite
from prunekit_core.surgery.apply import branches_masked, resolve_removals
from prunekit_core.surgery.refit import refit_writers, stream_refit


def _model(seed: int = 0, layers: int = 5) -> LlamaForCausalLM:
    return tiny_llama(layers=layers, tied=False, seed=seed)


def _windows(n: int = 16, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 50, (n, seq), generator=torch.Generator().manual_seed(1))


def _plan(model, remove, repair="refit") -> PrunePlan:
    return PrunePlan(fingerprint=fingerprint(model, inspect(model)), remove=remove, repair=repair)


def _final_stream(model, windows) -> torch.Tensor:
    """The stream entering the final norm."""
    got: dict[str, torch.Tensor] = {}
    h = model.model.norm.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0]))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    h.remove()
    return got["x"]


def _with_write(ir: ModelIR, sub_id: str, write: StreamWrite) -> ModelIR:
    towers = []
    for t in ir.towers:
        blocks = []
        for b in t.blocks:
            subs = tuple(s.model_copy(update={"write": write}) if s.id == sub_id else s for s in b.sublayers)
            blocks.append(b.model_copy(update={"sublayers": subs}))
        towers.append(t.model_copy(update={"blocks": tuple(blocks)}))
    return ir.model_copy(update={"towers": tuple(towers)})


def test_writers_around_each_gap_front_to_back() -> None:
    ir = inspect(_model(layers=6))
    tower = ir.towers[0]
    removed = {"text.blocks.2.attn", "text.blocks.2.mlp"}
    ws = refit_writers(tower, removed, depth=2)
    assert [w.sub.id for w in ws] == ["text.blocks.1.mlp", "text.blocks.3.attn", "text.blocks.3.mlp"]
    assert [w.sub.id for w in refit_writers(tower, removed, depth=0)] == ["text.blocks.1.mlp"]
    assert len(refit_writers(tower, removed, depth=None)) == 1 + 2 * 3  # every writer after the gap too
    # the writer before the gap ends where the next surviving branch starts: after the gap
    first = ws[0]
    assert tower.blocks[3].sublayers[0].id == "text.blocks.3.attn"
    assert first.end == 6


def test_post_norm_and_gated_writers_are_never_refitted() -> None:
    ir = inspect(_model(layers=6))
    removed = {"text.blocks.2.attn", "text.blocks.2.mlp"}
    normed = _with_write(ir, "text.blocks.1.mlp", StreamWrite(post="norm", modules=("x",)))
    gated = _with_write(normed, "text.blocks.3.attn", StreamWrite(post="gate", modules=("g",)))
    ids = [w.sub.id for w in refit_writers(gated.towers[0], removed, depth=2)]
    assert ids == ["text.blocks.3.mlp"]


def test_nothing_lost_means_nothing_changed() -> None:
    model = _model()
    with torch.no_grad():  # block 2 contributes exactly zero
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    before = copy.deepcopy(model.state_dict())
    ir = inspect(model)
    steps = stream_refit(
        model, ir, resolve_removals(ir, ["text.blocks.2"]), _windows(), masked=branches_masked, depth=None
    )
    # every writer was looked at, none changed: the injected streams line up with the unpruned model's
    assert len(steps) == 5 and not any(s.applied for s in steps)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refit_recovers_an_exactly_linear_block() -> None:
    """A removed block whose contribution is an exact linear map of the writer's input comes back exactly
    through the writer before the gap; the writers after it have nothing left to fix."""
    model = _model(layers=4)
    torch.manual_seed(5)
    writer = model.model.layers[0].mlp.down_proj
    lin = torch.randn(writer.out_features, writer.in_features) * 0.05
    stash: dict[str, torch.Tensor] = {}
    writer.register_forward_hook(lambda mod, args, out: stash.__setitem__("a", args[0]))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()  # block 1: attention adds nothing
    model.model.layers[1].mlp.forward = lambda x: stash["a"] @ lin.T  # ... and the MLP adds A @ lin^T
    w = _windows(32)
    target = _final_stream(model, w)
    plain, fixed = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(plain, _plan(plain, ["text.blocks.1"], repair="none"))
    stash.clear()
    applied = apply_plan(fixed, _plan(fixed, ["text.blocks.1"]), repair_windows=w)
    assert applied.refit_steps[0].writer == "model.layers.0.mlp.down_proj"
    err_plain = (_final_stream(plain, w) - target).norm()
    err_fixed = (_final_stream(fixed, w) - target).norm()
    with torch.no_grad():
        dw = fixed.model.layers[0].mlp.down_proj.weight - plain.model.layers[0].mlp.down_proj.weight
    assert err_plain > 0.01 * target.norm()  # the block did contribute
    assert err_fixed < 1e-2 * err_plain, (float(err_fixed), float(err_plain))
    torch.testing.assert_close(dw, lin, atol=2e-3, rtol=2e-2)


def test_refit_divides_by_the_branch_scale() -> None:
    """A branch whose contribution is multiplied by a constant (Granite's residual_multiplier) gets the
    correction divided by it, so the stream receives exactly the fitted map."""
    model = _model(layers=4)
    torch.manual_seed(5)
    mlp0 = model.model.layers[0].mlp
    writer = mlp0.down_proj
    lin = torch.randn(writer.out_features, writer.in_features) * 0.05
    stash: dict[str, torch.Tensor] = {}
    writer.register_forward_hook(lambda mod, args, out: stash.__setitem__("a", args[0]))
    orig = mlp0.forward
    mlp0.forward = lambda x: 2.0 * orig(x)  # block 0's MLP reaches the stream times 2
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    model.model.layers[1].mlp.forward = lambda x: stash["a"] @ lin.T
    w = _windows(32)
    ir = _with_write(inspect(model), "text.blocks.0.mlp", StreamWrite(scale=2.0))
    before = writer.weight.detach().clone()
    stream_refit(model, ir, resolve_removals(ir, ["text.blocks.1"]), w, masked=branches_masked, depth=0)
    torch.testing.assert_close(writer.weight.detach() - before, lin / 2, atol=2e-3, rtol=2e-2)


def test_refit_beats_the_one_writer_fold_on_the_final_stream() -> None:
    model = _model()
    w = _windows(32)
    target = _final_stream(model, w)
    errs = {}
    for repair in ("none", "lsq", "refit", "refit_cosine"):
        m = copy.deepcopy(model)
        apply_plan(m, _plan(m, ["text.blocks.2"], repair=repair), repair_windows=w)
        errs[repair] = float((_final_stream(m, w) - target).norm())
    # lsq keeps its fold only where it lowers the held-out loss (on random tokens it may be undone)
    assert errs["refit"] < errs["lsq"] <= errs["none"], errs
    assert errs["refit_cosine"] < errs["none"], errs


def test_refitted_model_decodes_with_its_cache_and_reloads_with_plain_transformers(tmp_path) -> None:
    model = _model()
    w = _windows(16)
    applied = apply_plan(model, _plan(model, ["text.blocks.1", "text.blocks.3.mlp"]), repair_windows=w)
    assert any(s.applied for s in applied.refit_steps)
    prompt = w[:2, :6]
    with torch.no_grad():
        full = model(input_ids=w[:2], use_cache=False).logits
        out = model(input_ids=prompt, use_cache=True)
        step_logits = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(6, w.shape[1]):
            out = model(input_ids=w[:2, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(step_logits[:-1], 1), full[:, 5:-1], atol=1e-5, rtol=1e-4)
    # shapes unchanged where the plan is uniform: here a sublayer removal makes it non-uniform, so save a
    # block-only refit for the plain reload
    m2 = _model(seed=1)
    apply_plan(m2, _plan(m2, ["text.blocks.1", "text.blocks.2"]), repair_windows=w)
    out_dir = save_pruned(m2, tmp_path / "m")
    plain, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(plain(w).logits, m2(w).logits, atol=1e-6, rtol=1e-5)


def test_a_gap_before_the_first_writer_is_fitted_on_the_pruned_stream() -> None:
    """Removing block 0 leaves no writer before the gap: the pruned stream starts at the gap, not at the
    first writer (which would inject the unpruned stream, the removed block's output still in it)."""
    model = _model()
    w = _windows(32)
    target = _final_stream(model, w)
    errs = {}
    for repair in ("none", "refit"):
        m = copy.deepcopy(model)
        apply_plan(m, _plan(m, ["text.blocks.0"], repair=repair), repair_windows=w)
        errs[repair] = float((_final_stream(m, w) - target).norm())
    assert errs["refit"] < errs["none"], errs
