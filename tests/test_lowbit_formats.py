"""The low-end formats (INT3, INT2, ternary absmean): error bounds, hand-computed bits, the mixed accountant."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

import prunekit_core as pk
from prunekit_core.ir.errors import PrunekitError
from prunekit_core.quant.base import (
    QuantScope,
    get_quant_format,
    quantize_model,
    quantize_model_mixed,
    size_report,
    size_report_mixed,
)
from prunekit_core.quant.builtin_formats import IntFormat

LOW = [
    "int3_g32",
    "int3_g64",
    "int3_g128",
    "int2_g32",
    "int2_g64",
    "int2a_g32",
    "int2a_g64",
    "ternary",
    "ternary_g64",
]


def test_low_end_formats_are_registered_and_variants_build():
    assert set(LOW) <= set(pk.list_quant_formats())
    assert get_quant_format("int3_g16").bits((1, 16)) == 16 * 3 + 16
    assert get_quant_format("int2a_g8").bits((1, 16)) == 2 * (8 * 2 + 16 + 2)
    assert get_quant_format("ternary_g8").name == "ternary_g8"
    with pytest.raises(ValueError, match="2 to 8 bits"):
        IntFormat(bits=1, group=32)


def test_bits_hand_computed():
    # a 40-wide row pads to 64: two groups of 32, each 32 elements + an fp16 scale (+ a zero point)
    assert get_quant_format("int3_g32").bits((3, 40)) == 3 * 2 * (32 * 3 + 16)  # 672
    assert get_quant_format("int2_g32").bits((3, 40)) == 3 * 2 * (32 * 2 + 16)  # 480
    assert get_quant_format("int2a_g32").bits((3, 40)) == 3 * 2 * (32 * 2 + 16 + 2)  # 492
    assert get_quant_format("int3_g128").bits((576, 1536)) == 576 * 12 * (128 * 3 + 16)
    # ternary: five trits per byte over the whole tensor, one fp16 scale
    assert get_quant_format("ternary").bits((3, 40)) == 120 // 5 * 8 + 16  # 208
    assert get_quant_format("ternary").bits((3, 41)) == 25 * 8 + 16  # 123 trits need 25 bytes
    # grouped: each row padded to 64, packed on its own (ceil(64 / 5) = 13 bytes), one scale per group
    assert get_quant_format("ternary_g64").bits((3, 40)) == 3 * (13 * 8 + 16)  # 360
    assert get_quant_format("ternary_g32").bits((2, 64)) == 2 * (13 * 8 + 2 * 16)


@pytest.mark.parametrize("bits,name", [(3, "int3_g32"), (2, "int2_g32")])
def test_symmetric_low_int_error_bound(bits, name):
    torch.manual_seed(bits)
    x = torch.randn(4, 96)
    y = get_quant_format(name).fake_quantize(x)
    levels = 2**bits - 1  # torchao maps the group's amax to half the code range
    for g in range(3):
        xs, ys = x[:, g * 32 : (g + 1) * 32], y[:, g * 32 : (g + 1) * 32]
        scale = (xs.abs().amax(-1, keepdim=True) / (levels / 2)).half().float()
        # the clipped top code is 3 (INT3) or 1 (INT2) steps: fp16 rounding of the scale adds a little
        assert ((ys - xs).abs() <= scale / 2 * (1 + 1e-2) + 1e-6).all()
        codes = ys / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def test_asymmetric_int2_error_bound_and_levels():
    torch.manual_seed(5)
    x = torch.randn(4, 64) + 0.7  # not centred: the zero point matters
    y = get_quant_format("int2a_g32").fake_quantize(x)
    for g in range(2):
        xs, ys = x[:, g * 32 : (g + 1) * 32], y[:, g * 32 : (g + 1) * 32]
        step = (xs.amax(-1) - xs.amin(-1)) / 3
        assert ((ys - xs).abs().amax(-1) <= step * (1 + 1e-2)).all()  # within one grid step
        for row in ys:
            assert row.unique().numel() <= 4  # 2 bits: four levels per group


def test_ternary_values_are_scale_times_minus_one_zero_one():
    torch.manual_seed(3)
    x = torch.randn(8, 40)
    f = get_quant_format("ternary")
    y = f.fake_quantize(x)
    scale = x.abs().mean().half().float()  # absmean over the tensor, as stored
    assert set((y / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(y / scale, (y / scale).round(), atol=1e-5)
    # the rule: round(W / scale) clamped to [-1, 1]
    assert torch.equal(y, torch.clamp(torch.round(x / scale), -1, 1) * scale)
    codes, s = f.codes_and_scale(x)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0} and s.item() == scale.item()


def test_grouped_ternary_scale_per_group_ignores_padding():
    x = torch.zeros(1, 40)
    x[0, :32] = 2.0
    x[0, 32:] = torch.tensor([0.5, -0.5, 0.1, 0.0, 0.5, -0.5, 0.1, 0.0])
    y = get_quant_format("ternary_g32").fake_quantize(x)
    assert torch.equal(y[0, :32], torch.full((32,), 2.0))
    # second group: 8 real elements, mean |w| = 2.2 / 8 = 0.275 (the 24 padding zeros are not counted)
    s = torch.tensor(0.275).half().float()
    assert torch.allclose(y[0, 32:], torch.clamp(torch.round(x[0, 32:] / s), -1, 1) * s)


def test_low_end_formats_quantize_embeddings_and_head():
    model = tiny_llama(layers=2, tied=False)
    emb = model.get_input_embeddings().weight.detach().clone()
    scope = QuantScope(blocks=True, embeddings=True, head=True)
    for name in ("int3_g32", "ternary"):
        rep = size_report(model, get_quant_format(name), scope=scope)
        assert set(rep.quantized) == {"blocks", "embeddings", "head"}
        assert rep.bits["embeddings"] == get_quant_format(name).bits((128, 32))
        assert rep.bits["head"] == get_quant_format(name).bits((128, 32))
    quantize_model(model, get_quant_format("ternary"), scope=scope)
    w = model.get_input_embeddings().weight
    s = emb.abs().mean().half().float()
    assert torch.equal(w, torch.clamp(torch.round(emb / s), -1, 1) * s)


def test_mixed_accountant_hand_computed():
    model = tiny_llama(layers=2)  # hidden 32, ffn 64, vocab 128, tied; 2 norms per block + final norm
    total = sum(p.numel() for p in model.parameters())
    q = "model.layers.0.self_attn.q_proj.weight"  # 32 x 32
    down = "model.layers.1.mlp.down_proj.weight"  # 32 x 64
    emb = "model.embed_tokens.weight"  # 128 x 32
    formats = {
        q: get_quant_format("int3_g32"),
        down: get_quant_format("ternary"),
        emb: get_quant_format("int2a_g32"),
    }
    rep = size_report_mixed(model, formats)
    expect = (
        (total - 32 * 32 - 32 * 64 - 128 * 32) * 16
        + 32 * (32 * 3 + 16)
        + (32 * 64 // 5 + 1) * 8
        + 16  # 2048 trits: 410 bytes
        + 128 * (32 * 2 + 16 + 2)
    )
    assert rep.total_bits == expect
    assert rep.tensor_formats == {q: "int3_g32", down: "ternary", emb: "int2a_g32"}
    assert set(rep.quantized) == {"blocks", "embeddings"}
    before = model.get_parameter(q).detach().clone()
    assert quantize_model_mixed(model, formats).total_bits == expect
    assert torch.equal(model.get_parameter(q), get_quant_format("int3_g32").fake_quantize(before))
    with pytest.raises(PrunekitError, match="does not have"):
        size_report_mixed(model, {"model.nope.weight": get_quant_format("int8")})
    with pytest.raises(PrunekitError, match="not 2-D"):
        size_report_mixed(model, {"model.norm.weight": get_quant_format("int8")})
