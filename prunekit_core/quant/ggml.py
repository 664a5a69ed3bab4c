"""GGML tensor types as llama.cpp stores them: which type a tensor gets in a GGUF file, and its exact bytes.

One rule, shared by the GGUF export (:mod:`prunekit_core.io.gguf_export`) and the size accountant's
``gguf_*`` formats (:mod:`prunekit_core.quant.builtin_formats`), so that the bits the accountant counts are
the bytes the exported file holds (tests/test_gguf_export.py compares them). It is llama.cpp's converter's
rule: 1-D tensors (norms) and a MoE router stay f32; other tensors take the file's type, or f16 when their
rows are not a whole number of the type's blocks. Block sizes and bytes per block come from the ``gguf``
package (``GGML_QUANT_SIZES``), the quantizers from ``gguf.quants``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["GGML_TYPES", "dequantize", "quantize", "tensor_nbytes", "tensor_type"]

#: the GGUF weight types prunekit writes (``--type``): float types and the block types ``gguf`` quantizes
GGML_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def qtype(kind: str) -> Any:
    """The ``gguf.GGMLQuantizationType`` called ``kind`` (``q8_0`` -> ``Q8_0``)."""
    import gguf

    if kind not in GGML_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGML_TYPES)}")
    return gguf.GGMLQuantizationType[kind.upper()]


def tensor_type(kind: str, shape: tuple[int, ...], *, router: bool = False) -> str:
    """The type a tensor of ``shape`` is stored in when the file's type is ``kind``: 1-D tensors and the
    MoE router at f32; others at ``kind``, or f16 when their rows are not a whole number of blocks."""
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype(kind)]
    if len(shape) < 2 or router or kind == "f32":
        return "f32"
    return "f16" if shape[-1] % block else kind


def tensor_nbytes(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` stored as type ``kind`` (its rows a whole number of blocks)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype(kind)]
    rows = math.prod(shape[:-1])
    return rows * (shape[-1] // block) * size


def quantize(arr: np.ndarray, kind: str) -> np.ndarray:
    """``arr`` (float32) encoded as type ``kind``: what ``GGUFWriter.add_tensor`` takes."""
    import gguf

    if kind == "f32":
        return arr.astype(np.float32)
    if kind == "f16":
        return arr.astype(np.float16)
    out: np.ndarray = gguf.quants.quantize(arr.astype(np.float32), qtype(kind))
    return out


def dequantize(data: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values that :func:`quantize`'s output stands for (what llama.cpp computes with)."""
    import gguf

    if kind in ("f32", "f16"):
        return data.astype(np.float32)
    out: np.ndarray = gguf.quants.dequantize(data, qtype(kind))
    return out.astype(np.float32)
