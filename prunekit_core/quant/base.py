"""Weight quantization formats, weight-only fake quantization of a model, and an exact size accountant.

What callers may rely on:

* A :class:`QuantFormat` knows its exact storage cost in bits for a weight shape (:meth:`QuantFormat.bits`:
  elements, scales, zero points and the padding of a last partial block or group) and fake-quantizes a
  weight (quantize, then dequantize back to the weight's dtype, same shape).
* :func:`quantize_model` fake-quantizes, in place, the 2-D weights of the chosen parts of a model (decoder
  blocks by default; embeddings and head only when asked) and returns a :class:`SizeReport`.
* :func:`size_report_mixed` and :func:`quantize_model_mixed` do the same for a format per tensor (by
  parameter name), the accounting of a mixed-precision model (``prunekit compress``).
* :func:`size_report` counts bits without touching weights. Unquantized tensors count at ``base_bits``
  (16: a bf16/fp16 checkpoint). ``bits_per_param`` divides by the *reference* parameter count (the
  unpruned model's, when given), so removed structure lowers it exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.base import hf_model
from ..ir.errors import PrunekitError
from ..registry.plugins import registry_base

__all__ = [
    "QuantFormat",
    "QuantScope",
    "SizeReport",
    "UnknownQuantFormatError",
    "get_quant_format",
    "model_parts",
    "quantize_model",
    "quantize_model_mixed",
    "size_report",
    "size_report_mixed",
]


class UnknownQuantFormatError(PrunekitError):
    """A quantization format name that no plugin registers."""

    def __init__(self, name: str, known: list[str]) -> None:
        import difflib

        near = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        super().__init__(
            f"unknown quantization format {name!r}.{hint} Known formats: {', '.join(known)} "
            "(integer formats take any group size: int4_g<N>, int8_g<N>; see `prunekit plugins`)."
        )


@registry_base("formats")
class QuantFormat(ABC):
    """A weight format: exact bit accounting plus a quantize-dequantize function.

    Subclasses set ``name`` (unique, lower-case, e.g. ``"mxfp4"``) and ``description``. Both methods act
    on the last dimension of a weight (a row of an ``nn.Linear`` weight is one output channel's inputs).
    """

    name: str = ""
    description: str = ""

    @abstractmethod
    def bits(self, shape: tuple[int, ...]) -> int:
        """Exact storage bits for a weight of ``shape``: elements, scales, zero points, padding."""

    @abstractmethod
    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` quantized and dequantized back to its dtype (same shape)."""

    def variant(self, name: str) -> QuantFormat | None:
        """Another member of this format's family called ``name``, or ``None`` (the default).

        :func:`get_quant_format` asks the registered formats for a name nobody registers, so a family
        with a parameter (the built-in integer formats: ``int4_g<N>`` for any group size ``N``) need not
        register each member.
        """
        return None


def get_quant_format(name: str) -> QuantFormat:
    """The registered format called ``name``, or the member of a registered format's family that
    :meth:`QuantFormat.variant` builds for it (``int4_g<N>``/``int8_g<N>``: any group size).

    Raises :class:`UnknownQuantFormatError` (with near-miss hints) for anything else.
    """
    from ..registry.plugins import quant_formats

    table = quant_formats()
    if name in table:
        return table[name]
    for fmt in table.values():
        made = fmt.variant(name)
        if made is not None:
            return made
    raise UnknownQuantFormatError(name, sorted(table))


# --- which weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantScope:
    """Which parts of a model are quantized. Decoder-block linear weights always; the rest on request.

    ``embeddings`` and ``head`` are separate switches because they dominate small models (SmolLM2-135M:
    28M of 135M parameters in the tied embedding). A tied head is the embedding: it is quantized and
    counted once, with the embeddings.
    """

    blocks: bool = True
    embeddings: bool = False
    head: bool = False


def _parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every distinct parameter, in one of: ``embeddings``, ``head``, ``blocks`` (2-D), ``other``."""
    seen: set[int] = set()
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {
        "embeddings": [],
        "head": [],
        "blocks": [],
        "other": [],
    }
    emb = hf_model(model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = hf_model(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    special: dict[int, str] = {}
    if emb is not None:
        for p in emb.parameters():
            special[id(p)] = "embeddings"
    if head is not None:
        for p in head.parameters():
            special.setdefault(id(p), "head")
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in special:
            parts[special[id(p)]].append((name, p))
        elif p.dim() == 2:
            parts["blocks"].append((name, p))
        else:
            parts["other"].append((name, p))
    return parts


def model_parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every distinct parameter of ``model`` by part: ``embeddings``, ``head`` (empty when tied to the
    embeddings), ``blocks`` (every other 2-D weight) and ``other`` (norms, biases), as the accountant splits
    them."""
    return _parts(model)


def _selected(scope: QuantScope, part: str) -> bool:
    return {"blocks": scope.blocks, "embeddings": scope.embeddings, "head": scope.head}.get(part, False)


# --- the accountant -----------------------------------------------------------------------------------


@dataclass
class SizeReport:
    """Exact bits of a model under a format, split into parts.

    ``bits[part]`` and ``params[part]`` for ``blocks`` (2-D weights outside embeddings/head), ``embeddings``,
    ``head`` (0 when tied) and ``other`` (norms, biases: always at ``base_bits``). ``quantized`` names the
    parts stored in ``format``.
    """

    format: str
    base_bits: int
    #: per-tensor formats of a mixed report (parameter name -> format name); empty for one format
    tensor_formats: dict[str, str] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    reference_params: int = 0

    @property
    def total_bits(self) -> int:
        return sum(self.bits.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def bits_per_param(self) -> float:
        """Total bits over the reference (unpruned) parameter count."""
        return self.total_bits / max(self.reference_params or self.total_params, 1)

    def part_bits_per_param(self, part: str) -> float:
        return self.bits[part] / max(self.params[part], 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            total_bits=self.total_bits,
            total_params=self.total_params,
            bits_per_param=self.bits_per_param,
        )
        return d


def size_report(
    model: nn.Module,
    fmt: QuantFormat | None,
    *,
    scope: QuantScope = QuantScope(),
    base_bits: int = 16,
    reference_params: int | None = None,
) -> SizeReport:
    """Bits of ``model`` if its ``scope`` weights were stored in ``fmt`` (``None``: nothing quantized)."""
    rep = SizeReport(format=fmt.name if fmt else "none", base_bits=base_bits)
    for part, tensors in _parts(model).items():
        q = fmt is not None and _selected(scope, part)
        rep.params[part] = sum(p.numel() for _, p in tensors)
        rep.bits[part] = sum(
            fmt.bits(tuple(p.shape)) if fmt is not None and q and p.dim() == 2 else p.numel() * base_bits
            for _, p in tensors
        )
        if q and tensors:
            rep.quantized.append(part)
    rep.reference_params = reference_params or rep.total_params
    return rep


def quantize_model(
    model: nn.Module,
    fmt: QuantFormat,
    *,
    scope: QuantScope = QuantScope(),
    base_bits: int = 16,
    reference_params: int | None = None,
) -> SizeReport:
    """Fake-quantize (in place) the 2-D weights ``scope`` selects; return the exact size report."""
    rep = size_report(model, fmt, scope=scope, base_bits=base_bits, reference_params=reference_params)
    with torch.no_grad():
        for part, tensors in _parts(model).items():
            if not _selected(scope, part):
                continue
            for _, p in _two_d(tensors):
                p.copy_(fmt.fake_quantize(p.detach()))
    return rep


def _two_d(tensors: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in tensors if p.dim() == 2]


# --- a format per tensor ------------------------------------------------------------------------------


def _check_assignment(model: nn.Module, formats: dict[str, QuantFormat]) -> dict[str, str]:
    """Parameter name -> part, for the 2-D parameters ``formats`` names; raises on names it cannot use."""
    where: dict[str, str] = {}
    known: dict[str, nn.Parameter] = {}
    for part, tensors in _parts(model).items():
        for name, p in tensors:
            where[name] = part
            known[name] = p
    bad = [n for n in formats if n not in known]
    if bad:
        raise PrunekitError(
            f"the format assignment names parameters the model does not have: {bad[:5]}; name parameters "
            "as model.named_parameters() does (a tied head is its embedding's name)"
        )
    flat = [n for n in formats if known[n].dim() != 2]
    if flat:
        raise PrunekitError(
            f"only 2-D weights are quantized; {flat[:5]} are not 2-D: leave them out of the assignment"
        )
    return where


def size_report_mixed(
    model: nn.Module,
    formats: dict[str, QuantFormat],
    *,
    base_bits: int = 16,
    reference_params: int | None = None,
) -> SizeReport:
    """Exact bits of ``model`` with each named 2-D parameter in its own format (``formats``: parameter name
    -> format); every other parameter counts ``base_bits`` per element. Parts holding at least one
    quantized tensor are listed in ``quantized``."""
    where = _check_assignment(model, formats)
    rep = SizeReport(
        format="mixed", base_bits=base_bits, tensor_formats={n: f.name for n, f in sorted(formats.items())}
    )
    for part, tensors in _parts(model).items():
        rep.params[part] = sum(p.numel() for _, p in tensors)
        rep.bits[part] = sum(
            formats[n].bits(tuple(p.shape)) if n in formats else p.numel() * base_bits for n, p in tensors
        )
        if any(where[n] == part for n in formats) and tensors:
            rep.quantized.append(part)
    rep.reference_params = reference_params or rep.total_params
    return rep


def quantize_model_mixed(
    model: nn.Module,
    formats: dict[str, QuantFormat],
    *,
    base_bits: int = 16,
    reference_params: int | None = None,
) -> SizeReport:
    """Fake-quantize (in place) each parameter ``formats`` names in its format; return the exact size."""
    rep = size_report_mixed(model, formats, base_bits=base_bits, reference_params=reference_params)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, fmt in formats.items():
            p = params[name]
            p.copy_(fmt.fake_quantize(p.detach()))
    return rep
