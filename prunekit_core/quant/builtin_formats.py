"""Built-in quantization formats, registered through the same hook a third-party plugin uses.

* OCP MX v1.0 (blocks of 32 along a row, one E8M0 scale each): MXFP8 E4M3/E5M2, MXFP6 E3M2/E2M3 and
  MXFP4 E2M1 through torchao's ``MXTensor`` (FLOOR scale, the spec's rule); MXINT8, which torchao lacks,
  here.
* Integer round-to-nearest with one fp16 scale per group of a row (torchao's affine primitives): INT8
  per row, ``int<B>_g<N>`` for B in 2..8 (the low end: ``int3_g<N>``, ``int2_g<N>``);
  ``int<B>a_g<N>`` adds a zero point of B bits per group (INT2 is better asymmetric: its symmetric grid is
  {-2, -1, 0, 1}, so the largest positive weight clips to half the largest negative).
* Ternary absmean (BitNet b1.58, weight-only simulation): elements in {-1, 0, 1} times one fp16 scale (the
  mean absolute value) per tensor (``ternary``) or per group of a row (``ternary_g<N>``); five ternary
  digits are packed into one byte (3^5 = 243 <= 256), so an element costs 1.6 bits.
* FP6-LLM: E3M2 elements with one fp16 scale per row (row max / 28); torchao's kernel for it is gone, its
  element rounding (``custom_fp_utils``) remains and is used here.
* llama.cpp's GGUF types (``gguf_f16``, ``gguf_q8_0``, ``gguf_q4_0``, ...): counted and quantized exactly as
  ``prunekit export --format gguf`` stores them (:mod:`prunekit_core.quant.ggml`).

Rows whose length is not a multiple of the block (or group) size are padded with zeros to the next
multiple: padding cannot change a block's max, and the padded elements are counted in :meth:`bits`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from prunekit_core.quant.base import QuantFormat
from prunekit_core.quant.ggml import dequantize, quantize, tensor_nbytes, tensor_type
from prunekit_core.registry.hookspecs import hookimpl

MX_BLOCK = 32
#: the GGUF types registered as ``gguf_<type>`` formats (f32 is the unquantized base, not a format)
GGUF_FORMAT_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
SCALE_BITS_E8M0 = 8
SCALE_BITS_FP16 = 16


def _padded(n: int, k: int) -> int:
    return -(-n // k) * k


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 1:
        raise ValueError(f"cannot quantize a 0-d tensor (shape {shape})")
    return math.prod(shape[:-1]), shape[-1]


def _pad_last(w: torch.Tensor, k: int) -> torch.Tensor:
    pad = _padded(w.shape[-1], k) - w.shape[-1]
    return F.pad(w, (0, pad)) if pad else w


class MXFormat(QuantFormat):
    """An OCP MX v1.0 format: 32-element blocks along the last dim, an E8M0 scale per block.

    A block holding a NaN or an infinity comes back all NaN (its scale is NaN, per the spec); an all-zero
    block comes back zero; elements round to nearest even and saturate to the element's max normal.
    """

    block = MX_BLOCK

    def __init__(self, name: str, elem: Any, elem_bits: int, description: str) -> None:
        self.name = name
        self.elem = elem
        self.elem_bits = elem_bits
        self.description = description

    def bits(self, shape: tuple[int, ...]) -> int:
        rows, n = _rows(shape)
        blocks = _padded(n, self.block) // self.block
        return rows * blocks * (self.block * self.elem_bits + SCALE_BITS_E8M0)

    def _qdq(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize float32 ``x`` whose last dim is a multiple of 32."""
        from torchao.prototype.mx_formats.mx_tensor import MXTensor, ScaleCalculationMode

        mx = MXTensor.to_mx(x.contiguous(), self.elem, self.block, scaling_mode=ScaleCalculationMode.FLOOR)
        out: torch.Tensor = mx.dequantize(torch.float32)
        return out

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        n = weight.shape[-1]
        x = _pad_last(weight.detach().to(torch.float32), self.block)
        blocks = x.reshape(*x.shape[:-1], -1, self.block)
        # the spec: a block with a NaN or an Inf gets a NaN scale, so every element of it is NaN
        bad = (~torch.isfinite(blocks)).any(dim=-1, keepdim=True)
        y = self._qdq(torch.where(bad, torch.zeros_like(blocks), blocks).reshape(x.shape))
        y = torch.where(bad, torch.full_like(blocks, float("nan")), y.reshape(blocks.shape))
        out: torch.Tensor = y.reshape(x.shape)[..., :n].to(weight.dtype)
        return out


class MXInt8Format(MXFormat):
    """MXINT8: 8-bit two's complement elements with an implicit scale of 2^-6 (k/64, |k| <= 127), emax 0."""

    def __init__(self) -> None:
        super().__init__(
            "mxint8", None, 8, "OCP MX INT8: 32-element blocks, E8M0 scale, int8 elements k/64 (8.25 bits)"
        )

    def _qdq(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], -1, self.block)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        # X = 2^(floor(log2 amax) - emax), emax = 0; frexp gives amax = m * 2^e with m in [0.5, 1)
        _, e = torch.frexp(amax)
        exp = torch.where(amax > 0, e - 1, torch.full_like(e, -127)).clamp(-127, 127)
        scale = torch.ldexp(torch.ones_like(amax), exp)
        # torch.round is round-half-to-even; saturate symmetrically at +-127/64
        k = torch.round(blocks / scale * 64).clamp(-127, 127)
        return (k / 64 * scale).reshape(x.shape)


class IntFormat(QuantFormat):
    """Round-to-nearest integers with one fp16 scale (and, if asymmetric, one zero point) per group.

    ``group=None`` means one group per row. Uses torchao's affine quantization primitives.
    """

    def __init__(self, *, bits: int, group: int | None, symmetric: bool = True) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"integer formats have 2 to 8 bits, not {bits}")
        if group is not None and group < 1:
            raise ValueError(f"group size must be >= 1, not {group}")
        self.elem_bits = bits
        self.group = group
        self.symmetric = symmetric
        a = "" if symmetric else "a"
        self.name = f"int{bits}{a}" + (f"_g{group}" if group else "")
        zp = "" if symmetric else " and an int zero point"
        where = f"per group of {group}" if group else "per row"
        self.description = f"INT{bits} round-to-nearest, one fp16 scale{zp} {where}"
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def _group(self, n: int) -> int:
        return self.group or n

    def variant(self, name: str) -> IntFormat | None:
        """``int<B>_g<N>`` and ``int<B>a_g<N>`` for B in 2..8 and any group size ``N`` >= 1."""
        m = re.fullmatch(r"int([2-8])(a?)_g(\d+)", name)
        if m and int(m.group(3)) > 0:
            return IntFormat(bits=int(m.group(1)), group=int(m.group(3)), symmetric=not m.group(2))
        return None

    def bits(self, shape: tuple[int, ...]) -> int:
        rows, n = _rows(shape)
        g = self._group(n)
        groups = _padded(n, g) // g
        per_group = g * self.elem_bits + SCALE_BITS_FP16 + (0 if self.symmetric else self.elem_bits)
        return rows * groups * per_group

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
            dequantize_affine,
            quantize_affine,
        )

        n = weight.shape[-1]
        g = self._group(n)
        x = _pad_last(weight.detach().to(torch.float32), g)
        x2 = x.reshape(-1, x.shape[-1])
        block = (1, g)
        mapping = MappingType.SYMMETRIC if self.symmetric else MappingType.ASYMMETRIC
        scale, zp = choose_qparams_affine(
            x2,
            mapping,
            block,
            torch.int8,
            quant_min=self.qmin,
            quant_max=self.qmax,
            scale_dtype=torch.float16,
            zero_point_dtype=torch.int32,
        )
        q = quantize_affine(x2, block, scale, zp, torch.int8, self.qmin, self.qmax)
        y = dequantize_affine(
            q, block, scale, zp, torch.int8, self.qmin, self.qmax, output_dtype=torch.float32
        )
        out: torch.Tensor = y.reshape(x.shape)[..., :n].to(weight.dtype)
        return out


class FP6LLMFormat(QuantFormat):
    """FP6-LLM: E3M2 elements (no MX block), one fp16 scale per row = row max / 28."""

    name = "fp6_llm"
    description = "FP6-LLM: E3M2 elements, one fp16 scale per row (row absmax / 28), 6 bits + 16 per row"
    elem_max = 28.0

    def bits(self, shape: tuple[int, ...]) -> int:
        rows, n = _rows(shape)
        return rows * (n * 6 + SCALE_BITS_FP16)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32

        x = weight.detach().to(torch.float32)
        amax = x.abs().amax(dim=-1, keepdim=True)
        # the stored scale is fp16: quantize against the rounded scale, as a kernel would dequantize
        scale = (amax / self.elem_max).to(torch.float16).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = _f32_to_floatx_unpacked((x / scale).contiguous(), 3, 2)
        y = _floatx_unpacked_to_f32(codes, 3, 2) * scale
        y = torch.where(torch.isnan(x), x, y)
        return y.to(weight.dtype)


TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256: five ternary digits in one byte


class TernaryFormat(QuantFormat):
    """Ternary absmean, as BitNet b1.58 quantizes its weights (arXiv 2402.17764, eq. 1-3), weight-only.

    ``scale = mean(|W|)`` over the tensor (``group=None``) or over each group of ``group`` elements of a row;
    an element is stored as ``clamp(round(W / scale), -1, 1)`` and read back as that times the scale. The
    scale is stored in fp16 and the rounding uses the stored value. Elements are packed five to a byte
    (base 3): a tensor costs ``ceil(numel / 5) * 8 + 16`` bits, a grouped one
    ``rows * (ceil(padded_row / 5) * 8 + groups * 16)`` (each row packed on its own, so a row starts on a
    byte). BitNet trains with this quantizer in the loop; applied after training (here) it is a lower
    bound of what the format can do, not the quality of a BitNet model.
    """

    def __init__(self, group: int | None = None) -> None:
        if group is not None and group < 1:
            raise ValueError(f"group size must be >= 1, not {group}")
        self.group = group
        self.name = "ternary" + (f"_g{group}" if group else "")
        where = f"per group of {group}" if group else "per tensor"
        self.description = f"Ternary absmean (BitNet b1.58): {{-1,0,1}} x one fp16 scale {where}, 1.6 bits"

    def variant(self, name: str) -> TernaryFormat | None:
        """``ternary_g<N>`` for any group size ``N`` >= 1."""
        m = re.fullmatch(r"ternary_g(\d+)", name)
        if m and int(m.group(1)) > 0:
            return TernaryFormat(int(m.group(1)))
        return None

    def bits(self, shape: tuple[int, ...]) -> int:
        rows, n = _rows(shape)
        if self.group is None:
            return -(-(rows * n) // TRITS_PER_BYTE) * 8 + SCALE_BITS_FP16
        padded = _padded(n, self.group)
        return rows * (-(-padded // TRITS_PER_BYTE) * 8 + padded // self.group * SCALE_BITS_FP16)

    def codes_and_scale(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ternary codes (same shape as ``weight``, values in {-1, 0, 1}) and the scale they multiply
        (a 0-d tensor, or ``[..., groups, 1]`` for a grouped format)."""
        x = weight.detach().to(torch.float32)
        if self.group is None:
            blocks = x.reshape(1, -1)
        else:
            blocks = _pad_last(x, self.group).reshape(*x.shape[:-1], -1, self.group)
        # the mean over the real elements only: padding is zeros, so divide by the count of real ones
        counts = torch.ones_like(x)
        if self.group is not None:
            counts = _pad_last(counts, self.group).reshape(blocks.shape)
        else:
            counts = counts.reshape(1, -1)
        absmean = blocks.abs().sum(-1, keepdim=True) / counts.sum(-1, keepdim=True).clamp_min(1)
        scale = absmean.to(torch.float16).to(torch.float32)  # what is stored
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(blocks / safe), -1, 1)
        if self.group is None:
            return codes.reshape(x.shape), scale.reshape(())
        n = x.shape[-1]
        return codes.reshape(*x.shape[:-1], -1)[..., :n], scale

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        codes, scale = self.codes_and_scale(weight)
        if self.group is None:
            y = codes * scale
        else:
            n = weight.shape[-1]
            c = _pad_last(codes, self.group).reshape(scale.shape[:-1] + (self.group,))
            y = (c * scale).reshape(*weight.shape[:-1], -1)[..., :n]
        return y.to(weight.dtype)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    """Cluster labels (0..k-1, ordered by center) of a 1-D k-means on ``values``; quantile init, Lloyd steps."""
    v = values.detach().to(torch.float32).flatten()
    centers = torch.quantile(v[:1_000_000], torch.linspace(0.5 / k, 1 - 0.5 / k, k))
    labels = torch.zeros_like(v, dtype=torch.long)
    for _ in range(iters):
        # boundaries halfway between sorted centers: the nearest-center rule without a [n, k] distance matrix
        centers = centers.sort().values
        labels = torch.bucketize(v, (centers[1:] + centers[:-1]) / 2)
        new = torch.stack([v[labels == c].mean() if (labels == c).any() else centers[c] for c in range(k)])
        if torch.allclose(new, centers):
            break
        centers = new
    return labels.reshape(values.shape)


class SplitQuantFormat(QuantFormat):
    """SplitQuant (arXiv 2501.12428): k-means splits a weight into ``k`` clusters of values (low, middle,
    high); each cluster becomes its own layer, zero elsewhere, quantized separately with ``base``, and the
    outputs sum. A cluster's scale fits only its own values, so resolution improves around the center.

    ``encoding="dense"`` counts what the paper deploys, ``k`` full layers (``k * base.bits``).
    ``encoding="indexed"`` counts one element per weight plus a cluster index (ceil(log2 k) bits) and ``k``
    scale sets, a packing no kernel reads today.
    """

    def __init__(self, base: IntFormat, k: int = 3, encoding: str = "dense") -> None:
        if k < 2:
            raise ValueError(f"SplitQuant needs k >= 2 clusters, not {k}")
        if encoding not in ("dense", "indexed"):
            raise ValueError(f"encoding is dense or indexed, not {encoding!r}")
        self.base, self.k, self.encoding = base, k, encoding
        suffix = "" if encoding == "dense" else "_idx"
        self.name = f"splitquant{k}_{base.name}{suffix}"
        self.description = f"SplitQuant, {k} k-means clusters each in {base.name}, {encoding} encoding"

    def bits(self, shape: tuple[int, ...]) -> int:
        one = self.base.bits(shape)
        if self.encoding == "dense":
            return self.k * one
        rows, n = _rows(shape)
        elements = rows * _padded(n, self.base._group(n)) * self.base.elem_bits
        overhead = one - elements  # scales and zero points of one layer
        return elements + self.k * overhead + rows * n * math.ceil(math.log2(self.k))

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().to(torch.float32)
        labels = kmeans_1d(w, self.k)
        out = torch.zeros_like(w)
        for c in range(self.k):
            mask = labels == c
            part = self.base.fake_quantize(torch.where(mask, w, torch.zeros_like(w)))
            out = torch.where(mask, part, out)
        return out.to(weight.dtype)


class GGUFFormat(QuantFormat):
    """A llama.cpp GGUF weight type (``gguf_q8_0``, ``gguf_q4_0``, ...), counted as ``prunekit export
    --format gguf --type TYPE`` writes it: by :func:`prunekit_core.quant.ggml.tensor_type`'s rule (a matrix
    whose rows are not a whole number of 32-element blocks is stored f16) and the ``gguf`` package's block
    sizes, and quantized with the ``gguf`` package's quantizers (llama.cpp's own reference code, in numpy).

    For the accountant's total to equal the file's tensor bytes, count every part in the format and the
    rest (norms) at 32 bits: ``size_report(model, fmt, scope=QuantScope(True, True, True), base_bits=32)``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"gguf_{kind}"
        self.description = f"llama.cpp GGUF {kind.upper()} (rows not a multiple of the block: f16)"

    def bits(self, shape: tuple[int, ...]) -> int:
        stored = tensor_type(self.kind, shape)
        return 8 * tensor_nbytes(stored, shape)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        stored = tensor_type(self.kind, tuple(weight.shape))
        arr = weight.detach().to(torch.float32).cpu().numpy()
        back = dequantize(quantize(arr, stored), stored).reshape(arr.shape)
        return torch.from_numpy(back).to(weight.dtype)


def builtin_formats() -> list[QuantFormat]:
    # torchao's names for its FP6 element types (mx_formats.constants); spelled here so that registering
    # the formats does not import torchao (which is slow and noisy): only quantizing does
    DTYPE_FP6_E3M2, DTYPE_FP6_E2M3 = "fp6_e3m2", "fp6_e2m3"  # noqa: N806
    return [
        MXFormat(
            "mxfp8_e4m3", torch.float8_e4m3fn, 8, "OCP MXFP8 E4M3: 32-element blocks, E8M0 scale (8.25 bits)"
        ),
        MXFormat(
            "mxfp8_e5m2", torch.float8_e5m2, 8, "OCP MXFP8 E5M2: 32-element blocks, E8M0 scale (8.25 bits)"
        ),
        MXFormat(
            "mxfp6_e3m2", DTYPE_FP6_E3M2, 6, "OCP MXFP6 E3M2: 32-element blocks, E8M0 scale (6.25 bits)"
        ),
        MXFormat(
            "mxfp6_e2m3", DTYPE_FP6_E2M3, 6, "OCP MXFP6 E2M3: 32-element blocks, E8M0 scale (6.25 bits)"
        ),
        MXFormat(
            "mxfp4", torch.float4_e2m1fn_x2, 4, "OCP MXFP4 E2M1: 32-element blocks, E8M0 scale (4.25 bits)"
        ),
        MXInt8Format(),
        IntFormat(bits=8, group=None),
        IntFormat(bits=8, group=128),
        IntFormat(bits=4, group=32),
        IntFormat(bits=4, group=64),
        IntFormat(bits=4, group=128),
        IntFormat(bits=4, group=128, symmetric=False),
        IntFormat(bits=6, group=128),
        IntFormat(bits=5, group=128),
        IntFormat(bits=3, group=32),
        IntFormat(bits=3, group=64),
        IntFormat(bits=3, group=128),
        IntFormat(bits=2, group=32),
        IntFormat(bits=2, group=64),
        IntFormat(bits=2, group=32, symmetric=False),
        IntFormat(bits=2, group=64, symmetric=False),
        TernaryFormat(),
        TernaryFormat(group=64),
        FP6LLMFormat(),
        SplitQuantFormat(IntFormat(bits=4, group=128), k=3),
        SplitQuantFormat(IntFormat(bits=4, group=128), k=3, encoding="indexed"),
        *(GGUFFormat(kind) for kind in GGUF_FORMAT_TYPES),
    ]


@hookimpl
def prunekit_register_quant_formats(register: Callable[[QuantFormat], Any]) -> None:
    for fmt in builtin_formats():
        register(fmt)
