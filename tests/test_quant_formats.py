"""Every built-in format against the OCP MX v1.0 rules and hand-computed bit counts."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama

import prunekit_core as pk
from prunekit_core.quant.base import (
    QuantScope,
    UnknownQuantFormatError,
    get_quant_format,
    quantize_model,
    size_report,
)

MX = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8"]
# element max normal and emax of each MX element type (OCP MX v1.0, table of element formats)
ELEM = {
    "mxfp8_e4m3": (448.0, 8),
    "mxfp8_e5m2": (57344.0, 15),
    "mxfp6_e3m2": (28.0, 4),
    "mxfp6_e2m3": (7.5, 2),
    "mxfp4": (6.0, 2),
    "mxint8": (127 / 64, 0),
}


def fmt(name: str) -> pk.QuantFormat:
    return get_quant_format(name)


def block(*values: float) -> torch.Tensor:
    """One 32-element block: ``values`` then zeros."""
    x = torch.zeros(1, 32)
    x[0, : len(values)] = torch.tensor(values)
    return x


def test_every_builtin_format_is_registered():
    assert set(MX + ["int8", "int8_g128", "int4_g32", "int4_g128", "fp6_llm"]) <= set(pk.list_quant_formats())


@pytest.mark.parametrize("name", MX)
def test_mx_scale_is_floor_log2_amax_minus_emax(name):
    max_normal, emax = ELEM[name]
    amax = 2.0**5 * 1.7  # floor(log2) = 5
    scale = 2.0 ** (5 - emax)
    y = fmt(name).fake_quantize(block(amax, scale))
    # an element equal to the scale is 1.0 in the element type: exactly representable in every format
    assert y[0, 1].item() == scale
    # the max element is amax / scale in [2^emax, 2^(emax+1)), at most max_normal after rounding
    assert abs(y[0, 0].item() - amax) <= amax * 0.25
    assert y[0, 0].item() / scale <= max_normal


@pytest.mark.parametrize(
    "values,expected",
    [
        # FP4 E2M1 grid 0, .5, 1, 1.5, 2, 3, 4, 6; amax 5 -> scale 2^(2-2) = 1. Ties go to the even mantissa.
        ((5.0, 2.5, 0.25, 0.75, 1.25, 3.5), (4.0, 2.0, 0.0, 1.0, 1.0, 4.0)),
        ((-5.0, -2.5, 1.75), (-4.0, -2.0, 2.0)),
    ],
)
def test_mxfp4_rounds_to_nearest_even(values, expected):
    y = fmt("mxfp4").fake_quantize(block(*values))
    assert y[0, : len(expected)].tolist() == list(expected)


def test_mxint8_rounds_to_nearest_even():
    # amax 1.5 -> scale 2^0; elements are k/64: 0.5/64 ties to 0, 1.5/64 to 2/64, 2.5/64 to 2/64
    y = fmt("mxint8").fake_quantize(block(1.5, 0.5 / 64, 1.5 / 64, 2.5 / 64, -3.5 / 64))
    assert y[0, :5].tolist() == [1.5, 0.0, 2 / 64, 2 / 64, -4 / 64]


@pytest.mark.parametrize("name", MX)
def test_mx_saturates_to_max_normal(name):
    max_normal, emax = ELEM[name]
    # amax just below the next power of two: floor(log2) = emax, scale 1, amax / scale > max_normal
    amax = 2.0 ** (emax + 1) * 0.999
    assert amax > max_normal
    y = fmt(name).fake_quantize(block(amax, -amax))
    assert y[0, 0].item() == pytest.approx(max_normal, rel=1e-6)
    assert y[0, 1].item() == pytest.approx(-max_normal, rel=1e-6)


@pytest.mark.parametrize("name", MX + ["int8", "int4_g32", "int4a_g128", "fp6_llm"])
def test_all_zero_rows_and_blocks_stay_zero(name):
    x = torch.zeros(3, 64)
    x[1, 40] = 1.0  # a second block with data must not disturb the zero blocks
    y = fmt(name).fake_quantize(x)
    assert torch.isfinite(y).all()
    assert y[0].abs().sum() == 0 and y[2].abs().sum() == 0 and y[1, :32].abs().sum() == 0


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_mx_block_with_nan_or_inf_is_all_nan_and_only_that_block(name, bad):
    x = torch.ones(1, 64)
    x[0, 3] = bad
    y = fmt(name).fake_quantize(x)
    assert torch.isnan(y[0, :32]).all()
    assert torch.equal(y[0, 32:], torch.ones(32))


@pytest.mark.parametrize("name", MX + ["int4_g32", "int8", "fp6_llm"])
def test_rows_not_a_multiple_of_32_equal_zero_padded_rows(name):
    torch.manual_seed(0)
    x = torch.randn(3, 40)
    padded = torch.cat([x, torch.zeros(3, 24)], dim=1)
    f = fmt(name)
    assert torch.equal(f.fake_quantize(x), f.fake_quantize(padded)[:, :40])


@pytest.mark.parametrize("name", MX + ["int4_g32", "int4_g128", "int8", "fp6_llm"])
def test_fake_quantize_keeps_shape_dtype_and_is_idempotent(name):
    torch.manual_seed(1)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    f = fmt(name)
    y = f.fake_quantize(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not name.startswith("int"):
        # torchao's symmetric integers map amax to 7.5 (range -8..7), so a second pass may grow the scale
        assert torch.equal(f.fake_quantize(y), y)


def test_int4_group_scale_and_error_bound():
    torch.manual_seed(2)
    x = torch.randn(2, 64)
    x[0, 40] = 50.0  # an outlier in the second group must not touch the first group
    y = fmt("int4_g32").fake_quantize(x)
    first = x[0, :32]
    scale = (first.abs().max() / 7.5).half().float()
    err = (y[0, :32] - first).abs().max()
    assert err <= scale / 2 * (1 + 1e-3)
    assert err < 0.3  # a g128 (one group) scale would be 50 / 7.5: error up to 3.3
    q = y[0, :32] / scale
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.abs().max() <= 8


def test_fp6_llm_row_scale():
    x = torch.tensor([[28.0 * 0.5, 0.25, -7.0], [1.0, 0.0, 0.0]])
    y = fmt("fp6_llm").fake_quantize(x)
    # row 0: scale = 14 / 28 = 0.5; 0.25 / 0.5 = 0.5 and -14 are E3M2 values; row 1: scale 1/28
    assert y[0].tolist() == [14.0, 0.25, -7.0]
    assert y[1, 0].item() == pytest.approx(1.0, rel=1e-3)


def test_bits_hand_computed():
    shape = (576, 1536)
    assert fmt("mxfp4").bits(shape) == 576 * 48 * (32 * 4 + 8)
    assert fmt("mxfp8_e4m3").bits(shape) == 576 * 48 * (32 * 8 + 8)
    assert fmt("mxfp6_e2m3").bits(shape) == 576 * 48 * (32 * 6 + 8)
    assert fmt("mxint8").bits(shape) == 576 * 1536 * 8.25
    assert fmt("int4_g128").bits(shape) == 576 * 12 * (128 * 4 + 16)
    assert fmt("int4a_g128").bits(shape) == 576 * 12 * (128 * 4 + 16 + 4)
    assert fmt("int8").bits(shape) == 576 * (1536 * 8 + 16)
    assert fmt("fp6_llm").bits(shape) == 576 * (1536 * 6 + 16)
    # a 40-wide row pads to 64: two MX blocks, and for g32 two groups
    assert fmt("mxfp4").bits((3, 40)) == 3 * 2 * (32 * 4 + 8)
    assert fmt("int4_g32").bits((3, 40)) == 3 * 2 * (32 * 4 + 16)


def test_size_report_hand_computed_on_tiny_llama():
    model = tiny_llama(layers=2)  # hidden 32, ffn 64, 2 heads of 16, 1 kv head, vocab 128, tied
    per_block_2d = 32 * 32 + 16 * 32 * 2 + 32 * 32 + 3 * 32 * 64  # q, k, v, o, gate/up/down
    rep = size_report(model, fmt("mxfp4"), reference_params=None)
    assert rep.params["blocks"] == 2 * per_block_2d
    assert rep.params["embeddings"] == 128 * 32 and rep.params["head"] == 0  # tied: counted once
    assert rep.params["other"] == 2 * 2 * 32 + 32  # two norms per block + final norm
    # q: 32 rows of 32; k, v: 16 rows of 32; o: 32 rows of 32; gate, up: 64 rows of 32; down: 32 rows of 64
    blocks_bits = 2 * ((32 + 16 + 16 + 32 + 64 + 64) * 1 * 136 + 32 * 2 * 136)
    assert rep.bits["blocks"] == blocks_bits
    assert rep.bits["embeddings"] == 128 * 32 * 16 and rep.bits["other"] == rep.params["other"] * 16
    assert rep.quantized == ["blocks"]
    assert rep.bits_per_param == pytest.approx(rep.total_bits / rep.total_params)
    both = size_report(model, fmt("mxfp4"), scope=QuantScope(embeddings=True))
    assert both.bits["embeddings"] == 128 * 1 * 136


def test_removed_structure_lowers_bits_per_param_against_the_reference():
    model = tiny_llama(layers=2)
    ref = size_report(model, None)
    assert ref.bits_per_param == 16
    del model.model.layers[1]
    rep = size_report(model, None, reference_params=ref.total_params)
    removed = ref.total_params - rep.total_params
    assert rep.bits_per_param == pytest.approx(16 * (1 - removed / ref.total_params))


def test_quantize_model_changes_only_the_scope():
    model = tiny_llama(layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = quantize_model(model, fmt("int4_g32"))
    after = dict(model.named_parameters())
    assert not torch.equal(
        after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"]
    )
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert rep.format == "int4_g32" and math.isclose(rep.part_bits_per_param("blocks"), 4.5)


def test_unknown_format_names_near_misses():
    with pytest.raises(UnknownQuantFormatError, match="mxfp4"):
        get_quant_format("mxfp_4")
    assert get_quant_format("int4_g16").bits((1, 32)) == 2 * (16 * 4 + 16)


def test_splitquant_clusters_improve_resolution_and_cost_is_counted():
    torch.manual_seed(3)
    x = torch.randn(8, 256) * 0.02
    x[:, ::64] = 0.5  # outliers stretch a plain group's scale
    plain = fmt("int4_g128")
    split = fmt("splitquant3_int4_g128")
    err_plain = (plain.fake_quantize(x) - x).abs().mean()
    err_split = (split.fake_quantize(x) - x).abs().mean()
    assert err_split < err_plain / 2
    shape = (8, 256)
    assert split.bits(shape) == 3 * plain.bits(shape)  # three dense layers, as the paper deploys them
    # indexed: one 4-bit element and a 2-bit cluster index per weight, three fp16 scales per group
    assert fmt("splitquant3_int4_g128_idx").bits(shape) == 8 * 256 * (4 + 2) + 8 * 2 * 3 * 16
    assert torch.equal(split.fake_quantize(torch.zeros(2, 128)), torch.zeros(2, 128))


def test_kmeans_1d_separates_obvious_clusters():
    from prunekit_core.quant.builtin_formats import kmeans_1d

    v = torch.tensor([-5.0, -5.1, -4.9, 0.0, 0.1, -0.1, 5.0, 5.2, 4.8])
    assert kmeans_1d(v, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
