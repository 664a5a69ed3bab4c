"""``prunekit study errors`` (issue 20 item 4): SQNR, magnitude and OBS pruning, the analytical bound, and
the per-block measurements against reference computations on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, words

from prunekit_core.study.errors import (
    gaussian_pruning_snr_db,
    layer_errors,
    layerwise_error,
    magnitude_prune,
    obs_prune,
    render_errors_markdown,
    sqnr_db,
    weight_pruning_snr_db,
)


def test_sqnr_of_an_exact_copy_is_inf_and_of_zeroing_is_0_db() -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(x, torch.zeros_like(x)) == 0.0
    # a 10% relative error in amplitude is 20 dB
    assert sqnr_db(x, 1.1 * x) == pytest.approx(20.0)


def test_magnitude_prune_zeroes_exactly_the_smallest_entries() -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    p = magnitude_prune(w, 0.75)
    assert int((p == 0).sum()) == 384
    kept = p != 0
    assert torch.equal(p[kept], w[kept])
    assert w[~kept].abs().max() <= w[kept].abs().min()


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_obs_error_is_at_most_magnitude_error_on_the_layerwise_objective(sparsity: float) -> None:
    x = correlated_inputs(512, 64, seed=2)
    h = x.T.double() @ x.double()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    obs = obs_prune(w, h, sparsity, blocksize=16)
    mag = magnitude_prune(w, sparsity)
    assert int((obs == 0).sum()) == int((mag == 0).sum()) == round(sparsity * w.numel())
    e_obs, e_mag = layerwise_error(w, obs, h), layerwise_error(w, mag, h)
    assert e_obs < e_mag
    # the objective is ||X w'^T - X w^T||^2: checked against the outputs themselves
    direct = float((x.double() @ (w.double() - obs.double()).T).pow(2).sum())
    assert e_obs == pytest.approx(direct, rel=1e-9)


def test_obs_with_nothing_to_prune_changes_nothing() -> None:
    x = correlated_inputs(128, 16, seed=4)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(obs_prune(w, x.T @ x, 0.0), w, atol=1e-6, rtol=0)


def test_gaussian_formula_matches_magnitude_pruning_of_gaussian_samples() -> None:
    w = torch.randn(400_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for s in (0.05, 0.5, 0.75, 0.9):
        assert weight_pruning_snr_db([w], s) == pytest.approx(gaussian_pruning_snr_db(s), abs=0.05)
    assert gaussian_pruning_snr_db(1.0) == 0.0 and gaussian_pruning_snr_db(0.0) == math.inf


def test_no_pattern_beats_the_weight_space_bound() -> None:
    """Magnitude pruning is the best mask in weight space: a whole-row removal (a layer removed, in
    miniature) or a random mask at the same sparsity never has a higher SNR."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 64, generator=g)
    bound = weight_pruning_snr_db([w], 0.125)
    row_removed = w.clone()
    row_removed[3] = 0
    assert sqnr_db(w, row_removed) <= bound
    for _ in range(20):
        mask = torch.rand(w.shape, generator=g).flatten().argsort()[:64]
        r = w.clone().flatten()
        r[mask] = 0
        assert sqnr_db(w, r.reshape(w.shape)) <= bound


@pytest.fixture(scope="module")
def measured():  # noqa: ANN201 - (model, ids, result)
    model = tiny_llama(layers=4, seed=8)
    ids = torch.randint(3, 103, (4, 16), generator=torch.Generator().manual_seed(9))
    return (
        model,
        ids,
        layer_errors(model, ids, formats=("int8", "int4_g32"), sparsities=(0.5,), max_removed=2),
    )


def test_removal_sqnr_is_the_blocks_contribution_relative_to_the_stream(measured) -> None:  # noqa: ANN001
    model, ids, res = measured
    with torch.inference_mode():
        hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    # hidden_states[i] is block i's input; the last entry has the final norm applied, so blocks 0..L-2
    for i in range(len(res.blocks) - 1):
        assert res.blocks[i].removal == pytest.approx(sqnr_db(hs[i + 1], hs[i]), abs=1e-6)
    cos = torch.nn.functional.cosine_similarity(hs[0].double(), hs[1].double(), dim=-1)
    assert res.blocks[0].block_influence == pytest.approx(float(1 - cos.mean()), abs=1e-9)


def test_weights_are_restored_and_finer_formats_err_less(measured) -> None:  # noqa: ANN001
    model, _ids, res = measured
    fresh = tiny_llama(layers=4, seed=8)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    for b in res.blocks:
        assert b.quant["int8"] > b.quant["int4_g32"] > 0
        assert b.magnitude[0.5] < b.magnitude[round(res.block_share, 4)]
        assert b.weight_snr[0.5] == pytest.approx(
            weight_pruning_snr_db(
                [m.weight for m in model.model.layers[b.index].modules() if isinstance(m, torch.nn.Linear)],
                0.5,
            )
        )
    assert res.formats["int8"][0] == pytest.approx(8 + 16 / 32, rel=0.1)  # one fp16 scale per 32-wide row


def test_shortgpt_points_remove_the_lowest_bi_blocks(measured) -> None:  # noqa: ANN001
    model, ids, res = measured
    order = sorted(res.blocks, key=lambda b: b.block_influence)
    assert [r.blocks for r in res.removals] == [sorted(b.block for b in order[:k]) for k in (1, 2)]
    first = res.removals[0]
    assert first.ratio == pytest.approx(res.block_share, abs=1e-4)
    # removing a block end to end: the model with that block skipped, stream before the final norm
    gone = order[0].index
    layers = model.model.layers
    kept = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != gone])
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        norm = model.model.norm
        model.model.norm = torch.nn.Identity()
        try:
            full = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
            model.model.layers = kept
            short = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
        finally:
            model.model.layers = layers
            model.model.norm = norm
    assert len(ref) == 5
    assert first.removal == pytest.approx(sqnr_db(full, short), abs=1e-4)
    assert first.removal_weight_snr <= first.bound_weight_snr
    md = render_errors_markdown(res)
    assert md.count("\n| text.blocks.") == 4 and "ShortGPT" in md


def test_cli_study_errors(tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    from prunekit_core.cli import main

    folder = tmp_path / "m"
    tiny_llama(layers=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(words(800, seed=1) + "\n")
    md = tmp_path / "e.md"
    args = ["study", "errors", folder, "--calib", text, "--windows", "2", "--seq-len", "16"]
    code = main([str(a) for a in [*args, "--max-removed", "1", "--markdown", md, "--json"]])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert len(data["blocks"]) == 3 and len(data["removals"]) == 1
    assert md.read_text().startswith("| block | BI | removal |")
    code = main([str(a) for a in [*args, "--format", "int5"]])
    assert code == 2 and "unknown quantization format" in capsys.readouterr().err
