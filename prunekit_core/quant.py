"""The base class quantization-format plugins implement (formats themselves arrive with later plugins)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class QuantFormat(ABC):
    """A weight format: exact bit accounting plus a quantize-dequantize function.

    Subclasses set ``name`` (unique, lower-case, e.g. ``"mxfp4"``) and ``description``.
    """

    name: str = ""
    description: str = ""

    @abstractmethod
    def bits(self, shape: tuple[int, ...]) -> int:
        """Exact storage bits for a weight of ``shape``: elements, scales, zero points, padding."""

    @abstractmethod
    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` quantized and dequantized back to its dtype (same shape)."""
