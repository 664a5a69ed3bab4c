"""``prunekit compress``: the best mix of block removal and per-layer weight formats under one size budget.

What callers may rely on:

* The budget is counted by the exact size accountant (:func:`~prunekit_core.quant.base.size_report_mixed`):
  every parameter of the model, scales, zero points and padding included; what is not quantized counts
  ``base_bits`` (16) per element. ``--target-bits`` divides by the unpruned model's parameter count. The
  saved model's accounted size is at most the budget; :func:`compress` checks it before saving.
* A budget below the smallest the search space can reach raises :class:`CompressBudgetError` naming that
  smallest size (bytes and bits per parameter) before anything is measured.
* The objective is the mean next-token loss on **held-out calibration windows**: windows of the calibration
  text (``c4``) that come after the calibration windows (which only feed the local quantization errors).
  The evaluation text is read only after the search, to report perplexity; it cannot change a choice.
* What is chosen: which blocks to remove, and one format for each remaining tensor family (one per
  sublayer of each block: attention, MLP, ...; the embeddings; an untied head).
* How (``docs/compress.md``): per-unit sensitivities first, measured as held-out loss increases (removing
  each block alone; quantizing each family alone at a reference format, scaled to the other formats by the
  family's local output error on calibration activations, or measured at every format with
  ``sensitivity="measured"``). An additive model of them is solved as a multiple-choice knapsack
  (Lagrangian relaxation, then a greedy fill of the slack). Then an EvoPress-style search corrects for
  interactions: each step moves one unit down a level (or removes a block) and spends the freed bits on
  other units, measures the real held-out loss of the result, and keeps it when the loss drops.
* The result is saved with :func:`~prunekit_core.io.checkpoint.save_pruned` (weights fake-quantized:
  dequantized values in the model's dtype) plus ``compress.json``, the record of every choice, the budget,
  the achieved size and the losses. :func:`load_compressed` loads it back and checks that the accounted
  size of the loaded model under the recorded formats equals the recorded one.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.errors import PrunekitError

__all__ = [
    "COMPRESS_FILE",
    "DEFAULT_FORMATS",
    "Choice",
    "CompressBudgetError",
    "CompressResult",
    "Compressor",
    "compress",
    "load_compressed",
    "parse_size",
]

COMPRESS_FILE = "compress.json"
RECORD_FORMAT = "prunekit-compress"
RECORD_VERSION = 1

#: The format ladder the search picks from by default: 8.03 to 2.56 bits per element (scales counted).
DEFAULT_FORMATS = (
    "int8",
    "int6_g128",
    "int5_g128",
    "int4_g64",
    "int4_g32",
    "int3_g64",
    "int3_g32",
    "int2a_g32",
)

Sensitivity = Literal["scaled", "measured"]


class CompressBudgetError(PrunekitError):
    """A size budget the search space cannot meet (or that is given wrongly)."""


# --- budgets ------------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``60MB`` (10^6), ``57.2MiB`` (2^20), ``500kB`` or ``123456`` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise CompressBudgetError(
            f"cannot read the size {text!r}: write a number and a unit, e.g. 60MB, 57.5MiB, 800KB, 1.2GB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def budget_bits(
    *, target_size: str | int | None, target_bits: float | None, reference_params: int
) -> tuple[int, str]:
    """The budget in bits and how it was given; exactly one of ``target_size`` and ``target_bits``."""
    if (target_size is None) == (target_bits is None):
        raise CompressBudgetError(
            "give exactly one budget: --target-size (e.g. 60MB) or --target-bits (e.g. 4.5)"
        )
    if target_size is not None:
        size = target_size if isinstance(target_size, int) else parse_size(target_size)
        if size <= 0:
            raise CompressBudgetError(f"--target-size must be positive, not {target_size!r}")
        return size * 8, f"{target_size} ({size} bytes)"
    assert target_bits is not None
    if not target_bits > 0:
        raise CompressBudgetError(f"--target-bits must be positive, not {target_bits}")
    return int(math.floor(target_bits * reference_params)), f"{target_bits} bits per parameter"


# --- the search space ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Tensors that share one format: a sublayer of a block, the embeddings, an untied head."""

    key: str
    block: int | None  # index of its block in run order; None for the embeddings and the head
    params: tuple[str, ...]
    bits: dict[str, int]  # format name ("none": unquantized) -> exact bits of all its tensors


@dataclass(frozen=True)
class Choice:
    """One point of the search space: removed blocks and a format per family (by family key)."""

    removed: frozenset[int]
    formats: tuple[tuple[str, str], ...]  # (family key, format name), in family order

    def fmt(self) -> dict[str, str]:
        return dict(self.formats)

    def with_formats(self, changes: dict[str, str]) -> Choice:
        return Choice(self.removed, tuple((k, changes.get(k, f)) for k, f in self.formats))


@dataclass
class Space:
    """Families, blocks and the exact bits of every part, computed once from the model."""

    families: list[Family]
    block_paths: list[str]  # module path of each block, in run order
    removable: list[bool]
    removal_bits: list[int]  # bits that disappear with each block (its sublayers, norms: base bits)
    block_family_keys: list[list[str]]
    fixed_bits: int  # every bit that no family and no removal changes
    base_bits: int
    reference_params: int
    formats: list[str]  # candidate formats, fewest bits last is not assumed: see ladder()

    def family(self, key: str) -> Family:
        return self._by_key[key]

    def __post_init__(self) -> None:
        self._by_key = {f.key: f for f in self.families}

    def total_bits(self, choice: Choice) -> int:
        fmts = choice.fmt()
        total = self.fixed_bits
        for i in range(len(self.block_paths)):
            if i not in choice.removed:
                total += self.removal_bits[i]
        for f in self.families:
            if f.block is None or f.block not in choice.removed:
                total += f.bits[fmts[f.key]]
        return total

    def ladder(self, key: str) -> list[str]:
        """The family's candidate formats, most bits first."""
        f = self.family(key)
        return sorted(self.formats, key=lambda q: -f.bits[q])


def _tensor_names(model: nn.Module, prefix: str) -> list[str]:
    return [
        n
        for n, _ in model.named_parameters(remove_duplicate=False)
        if n == prefix or n.startswith(prefix + ".")
    ]


def build_space(
    model: nn.Module, formats: Sequence[str], *, base_bits: int = 16, max_removed: int | None = None
) -> tuple[Space, int]:
    """The search space of ``model`` and the largest number of blocks a choice may remove."""
    from ..quant.base import get_quant_format, model_parts
    from ..registry.plugins import select_adapter

    fmts = {q: (None if q == "none" else get_quant_format(q)) for q in formats}
    ir = select_adapter(model).build_ir(model)
    params = dict(model.named_parameters())  # distinct tensors (a tied head is its embedding)
    parts = model_parts(model)

    def bits_of(names: Sequence[str]) -> dict[str, int]:
        out = {}
        for q, fmt in fmts.items():
            out[q] = sum(
                fmt.bits(tuple(params[n].shape)) if fmt is not None else params[n].numel() * base_bits
                for n in names
            )
        out["none"] = sum(params[n].numel() * base_bits for n in names)
        return out

    families: list[Family] = []
    block_paths, removable, removal_bits, block_keys = [], [], [], []
    in_family: set[str] = set()
    in_removal: set[str] = set()
    blocks = ir.blocks()
    for i, block in enumerate(blocks):
        block_paths.append(block.module)
        removable.append(block.removable)
        keys = []
        gone: set[str] = set()
        for s in block.sublayers:
            names = [n for path in (s.module, *s.parts) for n in _tensor_names(model, path) if n in params]
            gone |= set(names)
            if s.norm:
                gone |= {n for n in _tensor_names(model, s.norm) if n in params}
            two_d = [n for n in names if params[n].dim() == 2 and n not in in_family]
            if two_d:
                families.append(Family(s.id, i, tuple(two_d), bits_of(two_d)))
                in_family |= set(two_d)
                keys.append(s.id)
        block_keys.append(keys)
        rest = sorted(gone - in_family)
        removal_bits.append(sum(params[n].numel() * base_bits for n in rest))
        in_removal |= gone
    for part in ("embeddings", "head"):
        names = [n for n, p in parts[part] if p.dim() == 2 and n in params]
        if names:
            families.append(Family(part, None, tuple(names), bits_of(names)))
            in_family |= set(names)
    fixed = sum(
        p.numel() * base_bits for n, p in params.items() if n not in in_family and n not in in_removal
    )
    reference = sum(p.numel() for p in params.values())
    space = Space(
        families=families,
        block_paths=block_paths,
        removable=removable,
        removal_bits=removal_bits,
        block_family_keys=block_keys,
        fixed_bits=fixed,
        base_bits=base_bits,
        reference_params=reference,
        formats=list(formats),
    )
    n_removable = sum(removable)
    limit = n_removable // 2 if max_removed is None else min(max_removed, n_removable)
    return space, limit


def smallest_choice(space: Space, max_removed: int) -> Choice:
    """The choice with the fewest bits: every family in its smallest format, the largest blocks removed."""
    fmts = tuple((f.key, min(space.formats, key=f.bits.__getitem__)) for f in space.families)
    kept = Choice(frozenset(), fmts)

    def block_bits(i: int) -> int:
        d = kept.fmt()
        return space.removal_bits[i] + sum(space.family(k).bits[d[k]] for k in space.block_family_keys[i])

    order = sorted((i for i, r in enumerate(space.removable) if r), key=lambda i: -block_bits(i))
    return Choice(frozenset(order[:max_removed]), fmts)


# --- held-out loss, with cached block inputs ------------------------------------------------------------


class _Pass(nn.Module):
    """Stands in for a block that is skipped (removed, or before the first changed block, whose input is
    injected from the cache). Returns its input, or ``inject`` when set, in the block's output type."""

    def __init__(self, tuple_out: bool, inject: torch.Tensor | None = None) -> None:
        super().__init__()
        self.tuple_out = tuple_out
        self.inject = inject

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from ..adapters.base import first_tensor

        x = self.inject if self.inject is not None else first_tensor(args, kwargs)
        return (x,) if self.tuple_out else x


class HeldOutLoss:
    """Mean next-token loss of ``model`` on ``windows`` under a :class:`Choice`, simulated in place.

    The model's weights are fake-quantized per the choice (originals kept), removed blocks are skipped.
    The inputs of every block under the *anchor* choice are cached, so a choice that differs from the
    anchor first at block ``k`` runs blocks ``k..`` only (blocks before ``k`` are skipped and block ``k``
    gets its cached input). A removed block is skipped exactly: a block whose branches add zero to the
    residual stream passes its input through.
    """

    def __init__(self, model: nn.Module, space: Space, windows: torch.Tensor) -> None:
        from ..adapters.base import get_module
        from ..quant.base import get_quant_format

        self.model, self.space, self.windows = model, space, windows
        self.blocks = [get_module(model, p) for p in space.block_paths]
        params = dict(model.named_parameters())
        self.params = {n: params[n] for f in space.families for n in f.params}
        self.orig = {n: p.detach().clone() for n, p in self.params.items()}
        self.current = dict.fromkeys(self.params, "none")
        self.fmts = {q: get_quant_format(q) for q in space.formats if q != "none"}
        self.tuple_out = False
        self.anchor: Choice | None = None
        self.anchor_loss = math.nan
        self.cache: dict[int, torch.Tensor] = {}
        self.forwards = 0
        self.block_runs = 0

    # weights
    def _set(self, key: str, q: str) -> None:
        with torch.no_grad():
            for n in self.space.family(key).params:
                if self.current[n] != q:
                    w = self.orig[n] if q == "none" else self.fmts[q].fake_quantize(self.orig[n])
                    self.params[n].copy_(w)
                    self.current[n] = q

    def restore(self) -> None:
        for f in self.space.families:
            self._set(f.key, "none")

    def _first_change(self, choice: Choice) -> int:
        if self.anchor is None:
            return 0
        a, c = self.anchor.fmt(), choice.fmt()
        if any(a[f.key] != c[f.key] for f in self.space.families if f.block is None):
            return 0
        for i in range(len(self.blocks)):
            if (i in self.anchor.removed) != (i in choice.removed):
                return i
            if any(a[k] != c[k] for k in self.space.block_family_keys[i]):
                return i
        return len(self.blocks)

    def loss(self, choice: Choice, *, anchor: bool = False) -> float:
        """Held-out loss of ``choice``; with ``anchor``, ``choice`` becomes the anchor (its inputs cached)."""
        from ..adapters.base import set_module

        start = self._first_change(choice)
        if start == len(self.blocks) and self.anchor is not None:  # the anchor's blocks and formats
            if anchor:
                self.anchor = choice
            return self.anchor_loss
        if start > 0 and start not in self.cache:  # no cached input there (every later block removed)
            start = 0
        fmts = choice.fmt()
        for f in self.space.families:
            if f.block is None or (f.block >= start and f.block not in choice.removed):
                self._set(f.key, fmts[f.key])
        record: dict[int, torch.Tensor] = {}
        hooks = []
        swapped: list[tuple[int, nn.Module]] = []
        try:
            for i, block in enumerate(self.blocks):
                if i < start or i in choice.removed:
                    inject = self.cache[start] if (start > 0 and i == start - 1) else None
                    set_module(self.model, self.space.block_paths[i], _Pass(self.tuple_out, inject))
                    swapped.append((i, block))
                if i >= start:
                    hooks.append(block.register_forward_pre_hook(_recorder(record, i), with_kwargs=True))
            if start > 0 and (start - 1) not in [i for i, _ in swapped]:
                raise AssertionError("the block before the first changed one must be skipped")
            with torch.inference_mode():
                logits = self.model(input_ids=self.windows).logits
                ids = self.windows
                value = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
                ).item()
        finally:
            for h in hooks:
                h.remove()
            for i, block in swapped:
                set_module(self.model, self.space.block_paths[i], block)
        self.forwards += 1
        self.block_runs += sum(1 for i in range(start, len(self.blocks)) if i not in choice.removed)
        if anchor:
            # a removed block records no input: its input is the next kept block's (or the final norm's)
            keep = {i: self.cache[i] for i in range(start) if i in self.cache}
            self.anchor, self.anchor_loss, self.cache = choice, value, keep | record
            self._fill_removed(choice)
        return value

    def _fill_removed(self, choice: Choice) -> None:
        # the input of a removed block i is the input of the next block that ran (a skipped block passes
        # its input on); walk backwards so chains of removed blocks get it too
        nxt: torch.Tensor | None = None
        for i in range(len(self.blocks) - 1, -1, -1):
            if i in self.cache and i not in choice.removed:
                nxt = self.cache[i]
            elif i in choice.removed and nxt is not None:
                self.cache[i] = nxt

    def detect_output(self) -> None:
        """Whether blocks return a tuple (older transformers) or a tensor; read from one real forward."""
        seen: list[bool] = []

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            seen.append(isinstance(out, tuple))

        h = self.blocks[0].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                self.model(input_ids=self.windows[:1, :2])
        finally:
            h.remove()
        self.tuple_out = bool(seen and seen[0])


def _recorder(store: dict[int, torch.Tensor], i: int) -> Callable[..., None]:
    from ..adapters.base import first_tensor

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        store[i] = first_tensor(args, kwargs).detach().clone()

    return hook


# --- sensitivities ------------------------------------------------------------------------------------


@dataclass
class Sensitivities:
    """Held-out loss increases of single changes from the unquantized, unpruned model."""

    base_loss: float
    removal: dict[int, float] = field(default_factory=dict)
    quant: dict[str, dict[str, float]] = field(default_factory=dict)
    measured: dict[str, list[str]] = field(default_factory=dict)  # family -> formats measured directly
    local_error: dict[str, dict[str, float]] = field(default_factory=dict)
    reference: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_loss": self.base_loss,
            "reference_format": self.reference,
            "removal": {str(k): v for k, v in self.removal.items()},
            "quant": self.quant,
            "measured": self.measured,
        }


def local_errors(
    model: nn.Module, space: Space, calib: torch.Tensor, *, max_rows: int = 512
) -> dict[str, dict[str, float]]:
    """Per family and format, the summed squared output error ``||X (W - Q(W))^T||^2`` of its linear
    layers on the calibration windows' activations (``max_rows`` token rows sampled per layer).

    Families with a tensor that is not an ``nn.Linear`` weight (embeddings) are left out."""
    from ..adapters.base import get_module
    from ..quant.base import get_quant_format

    params = dict(model.named_parameters())
    linears: dict[str, nn.Linear] = {}
    for f in space.families:
        for n in f.params:
            mod = get_module(model, n.rpartition(".")[0])
            if isinstance(mod, nn.Linear) and n.endswith(".weight"):
                linears[n] = mod
    inputs: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def grab(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if x.shape[0] > max_rows:
                x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
            inputs[name] = x

        return hook

    hooks = [m.register_forward_pre_hook(grab(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            model(input_ids=calib)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, float]] = {}
    fmts = {q: get_quant_format(q) for q in space.formats if q != "none"}
    for f in space.families:
        if not all(n in inputs for n in f.params):
            continue
        errs = {"none": 0.0}
        for q, fmt in fmts.items():
            total = 0.0
            for n in f.params:
                w = params[n].detach().float()
                d = w - fmt.fake_quantize(w).float()
                total += float((inputs[n] @ d.T).pow(2).sum())
            errs[q] = total
        out[f.key] = errs
    return out


def measure_sensitivities(
    runner: HeldOutLoss,
    *,
    max_removed: int,
    sensitivity: Sensitivity,
    reference: str,
    local: dict[str, dict[str, float]],
    on_step: Callable[[str], None] = lambda _m: None,
) -> Sensitivities:
    space = runner.space
    base = Choice(frozenset(), tuple((f.key, "none") for f in space.families))
    sens = Sensitivities(base_loss=runner.loss(base, anchor=True), reference=reference)
    on_step(f"held-out loss of the unquantized model: {sens.base_loss:.4f}")
    if max_removed > 0:
        for i, ok in enumerate(space.removable):
            if ok:
                sens.removal[i] = runner.loss(Choice(frozenset({i}), base.formats)) - sens.base_loss
        on_step(f"removal trials: {len(sens.removal)} blocks")
    quantized = [q for q in space.formats if q != "none"]
    for f in space.families:
        scaled = sensitivity == "scaled" and f.key in local and reference in quantized
        todo = [reference] if scaled else quantized
        got = {"none": 0.0}
        for q in todo:
            got[q] = runner.loss(base.with_formats({f.key: q})) - sens.base_loss
        if scaled:
            # a measured drop of the loss (negative) is noise of the few held-out tokens, not a gain: the
            # reference itself is clamped too, else it would beat every format with more bits (bench/budget.py
            # at 8 bits chose int4_g64, the reference, for a third of the families and left 0.7 bits unused)
            ref_err = local[f.key][reference]
            ref_delta = max(got[reference], 1e-9)
            for q in quantized:
                got[q] = ref_delta * (local[f.key][q] / ref_err if ref_err > 0 else 1.0)
        sens.quant[f.key] = got
        sens.measured[f.key] = todo
    on_step(
        f"quantization trials: {sum(len(v) for v in sens.measured.values())} on {len(space.families)} families"
    )
    runner.restore()
    return sens


# --- the search ---------------------------------------------------------------------------------------


def _additive(space: Space, sens: Sensitivities, choice: Choice) -> float:
    fmts = choice.fmt()
    total = sum(sens.removal.get(i, math.inf) for i in choice.removed)
    for f in space.families:
        if f.block is None or f.block not in choice.removed:
            total += sens.quant[f.key][fmts[f.key]]
    return total


def _lagrangian(space: Space, sens: Sensitivities, lam: float, max_removed: int) -> Choice:
    best: dict[str, str] = {}
    cost: dict[str, float] = {}
    for f in space.families:
        delta = sens.quant[f.key]
        q = min(space.formats, key=lambda q: (delta[q] + lam * f.bits[q], f.bits[q]))  # noqa: B023  # used at once
        best[f.key], cost[f.key] = q, delta[q] + lam * f.bits[q]
    gains = []
    for i, keys in enumerate(space.block_family_keys):
        if i in sens.removal:
            kept = sum(cost[k] for k in keys) + lam * space.removal_bits[i]
            if kept > sens.removal[i]:
                gains.append((kept - sens.removal[i], i))
    removed = frozenset(i for _, i in sorted(gains, reverse=True)[:max_removed])
    return Choice(removed, tuple((f.key, best[f.key]) for f in space.families))


def _moves_up(space: Space, choice: Choice) -> list[Choice]:
    """Every choice one step richer: one family one format up its ladder, or one removed block restored."""
    out = []
    fmts = choice.fmt()
    for f in space.families:
        if f.block is not None and f.block in choice.removed:
            continue
        ladder = space.ladder(f.key)
        j = ladder.index(fmts[f.key])
        if j > 0:
            out.append(choice.with_formats({f.key: ladder[j - 1]}))
    for i in choice.removed:
        out.append(Choice(choice.removed - {i}, choice.formats))
    return out


def _moves_down(space: Space, choice: Choice, max_removed: int) -> list[Choice]:
    out = []
    fmts = choice.fmt()
    for f in space.families:
        if f.block is not None and f.block in choice.removed:
            continue
        ladder = space.ladder(f.key)
        j = ladder.index(fmts[f.key])
        if j + 1 < len(ladder):
            out.append(choice.with_formats({f.key: ladder[j + 1]}))
    if len(choice.removed) < max_removed:
        for i, ok in enumerate(space.removable):
            if ok and i not in choice.removed:
                out.append(Choice(choice.removed | {i}, choice.formats))
    return out


def fill(
    space: Space, sens: Sensitivities, choice: Choice, budget: int, *, exclude: Choice | None = None
) -> Choice:
    """Greedy: take the upgrade with the largest estimated loss drop per bit while it fits the budget."""
    while True:
        bits, est = space.total_bits(choice), _additive(space, sens, choice)
        best: tuple[float, Choice] | None = None
        for up in _moves_up(space, choice):
            if exclude is not None and up == exclude:
                continue
            b = space.total_bits(up)
            if b > budget:
                continue
            gain = (est - _additive(space, sens, up)) / max(b - bits, 1)
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, up)
        if best is None:
            return choice
        choice = best[1]


def squeeze(space: Space, sens: Sensitivities, choice: Choice, budget: int, max_removed: int) -> Choice:
    """Greedy: take the downgrade with the smallest estimated loss increase per bit until it fits."""
    while space.total_bits(choice) > budget:
        bits, est = space.total_bits(choice), _additive(space, sens, choice)
        options = []
        for down in _moves_down(space, choice, max_removed):
            saved = bits - space.total_bits(down)
            if saved > 0:
                options.append(((_additive(space, sens, down) - est) / saved, down))
        if not options:
            break
        choice = min(options, key=lambda o: o[0])[1]
    return choice


def additive_solution(space: Space, sens: Sensitivities, budget: int, max_removed: int) -> Choice:
    """The additive model's best choice under ``budget``: bisect the Lagrange multiplier, then fill."""
    lo, hi = 0.0, 1e-6
    while space.total_bits(_lagrangian(space, sens, hi, max_removed)) > budget and hi < 1e6:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if space.total_bits(_lagrangian(space, sens, mid, max_removed)) > budget:
            lo = mid
        else:
            hi = mid
    choice = _lagrangian(space, sens, hi, max_removed)
    if space.total_bits(choice) > budget:
        choice = squeeze(space, sens, choice, budget, max_removed)
    return fill(space, sens, choice, budget)


def evolve(
    runner: HeldOutLoss,
    sens: Sensitivities,
    start: Choice,
    budget: int,
    *,
    steps: int,
    max_removed: int,
    seed: int = 0,
    on_step: Callable[[str], None] = lambda _m: None,
) -> tuple[Choice, float, list[dict[str, Any]]]:
    """Correct the additive model for interactions with measured held-out losses (EvoPress-style).

    Each step takes the current best, moves one random unit down (a family one format down, or a block
    removed), spends the freed bits with :func:`fill` (never on undoing that move), and keeps the result if
    its measured held-out loss is lower. Every candidate stays within ``budget``.
    """
    space = runner.space
    rng = random.Random(seed)
    best, best_loss = start, runner.loss(start, anchor=True)
    log: list[dict[str, Any]] = [{"step": 0, "loss": best_loss, "accepted": True, "move": "additive model"}]
    on_step(f"additive solution: held-out loss {best_loss:.4f}")
    for step in range(1, steps + 1):
        downs = _moves_down(space, best, max_removed)
        if not downs:
            break
        down = rng.choice(downs)
        cand = fill(space, sens, down, budget, exclude=best)
        if cand == best or space.total_bits(cand) > budget:
            log.append({"step": step, "loss": None, "accepted": False, "move": _describe(best, down)})
            continue
        value = runner.loss(cand)
        ok = value < best_loss
        log.append({"step": step, "loss": value, "accepted": ok, "move": _describe(best, down)})
        if ok:
            best, best_loss = cand, runner.loss(cand, anchor=True)
        on_step(
            f"search step {step}/{steps}: loss {value:.4f} ({'kept' if ok else 'dropped'}; best {best_loss:.4f})"
        )
    return best, best_loss, log


def _describe(a: Choice, b: Choice) -> str:
    fa, fb = a.fmt(), b.fmt()
    parts = [f"{k}: {fa[k]} -> {fb[k]}" for k in fa if fa[k] != fb[k]]
    parts += [f"remove block {i}" for i in sorted(b.removed - a.removed)]
    parts += [f"restore block {i}" for i in sorted(a.removed - b.removed)]
    return "; ".join(parts)


# --- the whole command --------------------------------------------------------------------------------


@dataclass
class CompressResult:
    """What :func:`compress` did: the compressed model (fake-quantized), its record and where it went."""

    model: nn.Module
    record: dict[str, Any]
    out: Path | None = None


class Compressor:
    """The measured parts of a compression run on one model, reusable across budgets (bench/budget.py).

    Loads nothing itself: ``model`` (left unchanged between calls), ``calib`` (calibration windows, for
    local errors) and ``heldout`` (the objective's windows, from the same text, not overlapping ``calib``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        calib: torch.Tensor,
        heldout: torch.Tensor,
        formats: Sequence[str] = DEFAULT_FORMATS,
        base_bits: int = 16,
        max_removed: int | None = None,
        sensitivity: Sensitivity = "scaled",
        reference: str | None = None,
        on_step: Callable[[str], None] = lambda _m: None,
    ) -> None:
        from ..quant.base import get_quant_format

        formats = list(dict.fromkeys(formats))
        if not formats:
            raise CompressBudgetError("--formats is empty: name at least one format, e.g. int4_g32")
        for q in formats:
            if q != "none":
                get_quant_format(q)  # an unknown name fails here, with near-miss hints
        self.model, self.calib, self.heldout = model, calib, heldout
        self.formats, self.base_bits, self.on_step = formats, base_bits, on_step
        self.space, self.max_removed = build_space(
            model, formats, base_bits=base_bits, max_removed=max_removed
        )
        self.sensitivity: Sensitivity = sensitivity
        self.reference = reference
        self.sens: Sensitivities | None = None
        self.runner: HeldOutLoss | None = None
        self.timings: dict[str, float] = {}

    def smallest(self) -> int:
        return self.space.total_bits(smallest_choice(self.space, self.max_removed))

    def check_budget(self, budget: int) -> None:
        low = self.smallest()
        if budget < low:
            ref = self.space.reference_params
            raise CompressBudgetError(
                f"a budget of {budget / 8:,.0f} bytes ({budget / ref:.3f} bits per parameter) cannot be met: the "
                f"smallest this search reaches is {math.ceil(low / 8):,} bytes ({low / ref:.3f} bits per "
                f"parameter: every family in its smallest format of {', '.join(self.formats)}, "
                f"{self.max_removed} blocks removed). Raise the budget to at least "
                f"{math.ceil(low / 8):,} bytes, add a smaller format to --formats (e.g. int2a_g64, "
                "ternary_g64), or allow more removals with --max-removed"
            )

    def _reference_for(self, budget: int) -> str:
        if self.reference is not None:
            return self.reference
        quantized = [q for q in self.formats if q != "none"]
        if not quantized:
            return "none"
        target = budget / self.space.reference_params
        probe = max(self.space.families, key=lambda f: f.bits["none"])
        per = {q: probe.bits[q] / (probe.bits["none"] / self.base_bits) for q in quantized}
        return min(quantized, key=lambda q: abs(per[q] - target))

    def measure(self, budget: int) -> Sensitivities:
        """Sensitivities (once per run; the reference format is chosen from the first budget)."""
        if self.sens is None:
            t0 = time.perf_counter()
            self.runner = HeldOutLoss(self.model, self.space, self.heldout)
            self.runner.detect_output()
            reference = self._reference_for(budget)
            local = local_errors(self.model, self.space, self.calib) if self.sensitivity == "scaled" else {}
            self.sens = measure_sensitivities(
                self.runner,
                max_removed=self.max_removed,
                sensitivity=self.sensitivity,
                reference=reference,
                local=local,
                on_step=self.on_step,
            )
            self.timings["sensitivities"] = time.perf_counter() - t0
        return self.sens

    def search(self, budget: int, *, steps: int = 16, seed: int = 0) -> tuple[Choice, dict[str, Any]]:
        """The choice for ``budget`` and the search record (losses, steps)."""
        self.check_budget(budget)
        sens = self.measure(budget)
        assert self.runner is not None
        t0 = time.perf_counter()
        start = additive_solution(self.space, sens, budget, self.max_removed)
        estimate = sens.base_loss + _additive(self.space, sens, start)
        best, loss, log = evolve(
            self.runner,
            sens,
            start,
            budget,
            steps=steps,
            max_removed=self.max_removed,
            seed=seed,
            on_step=self.on_step,
        )
        self.runner.restore()
        self.timings["search"] = time.perf_counter() - t0
        return best, {
            "additive_estimate": estimate,
            "additive_loss": log[0]["loss"],
            "heldout_loss": loss,
            "steps": log,
            "forwards": self.runner.forwards,
            "block_runs": self.runner.block_runs,
        }

    def materialize(self, choice: Choice) -> tuple[nn.Module, Any, Any]:
        """A copy of the model with the choice applied (blocks removed, weights fake-quantized): the model,
        the plan as applied and the size report. The report's bits equal :meth:`Space.total_bits`."""
        from ..ir.plan import PrunePlan, fingerprint
        from ..quant.base import get_quant_format, quantize_model_mixed
        from ..registry.plugins import select_adapter
        from ..surgery.apply import apply_plan

        work = copy.deepcopy(self.model)
        adapter = select_adapter(work)
        ir = adapter.build_ir(work)
        blocks = ir.blocks()
        remove = [blocks[i].id for i in sorted(choice.removed)]
        plan = PrunePlan(
            fingerprint=fingerprint(work, ir),
            remove=remove,
            method="compress",
            granularity="block",
            removed_params=sum(blocks[i].params for i in choice.removed),
            block_params=ir.block_params(),
            notes=["prunekit compress: blocks removed here; per-tensor formats in compress.json"],
        )
        before = dict(work.named_parameters())
        applied = apply_plan(work, plan, adapter=adapter)
        # removing whole blocks renumbers the ones after them (model.layers.5 becomes model.layers.4): find
        # each kept tensor under its new name by identity (surgery keeps the surviving tensors)
        renamed = {id(p): n for n, p in applied.model.named_parameters()}
        fmts = choice.fmt()
        assignment = {}
        for f in self.space.families:
            if (f.block is None or f.block not in choice.removed) and fmts[f.key] != "none":
                for n in f.params:
                    if id(before[n]) not in renamed:
                        raise PrunekitError(f"internal error: surgery replaced the kept tensor {n}")
                    assignment[renamed[id(before[n])]] = get_quant_format(fmts[f.key])
        rep = quantize_model_mixed(
            applied.model, assignment, base_bits=self.base_bits, reference_params=self.space.reference_params
        )
        expected = self.space.total_bits(choice)
        if rep.total_bits != expected:
            raise PrunekitError(
                f"internal error: the search counted {expected} bits, the accountant {rep.total_bits}; "
                "please report this with the model"
            )
        return applied.model, applied.plan, rep


def compress(
    model: str | nn.Module,
    *,
    target_size: str | int | None = None,
    target_bits: float | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    tokenizer: Any = None,
    calib: str = "c4",
    calib_windows: int = 8,
    heldout_windows: int = 4,
    seq_len: int = 256,
    eval: str | None = "wiki",
    eval_windows: int = 16,
    eval_seq_len: int = 1024,
    steps: int = 16,
    max_removed: int | None = None,
    sensitivity: Sensitivity = "scaled",
    reference: str | None = None,
    base_bits: int = 16,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    on_step: Callable[[str], None] = lambda _m: None,
) -> CompressResult:
    """Compress ``model`` (a spec or a loaded model with ``tokenizer``) under one size budget; see the module
    docstring. ``calib`` gives ``calib_windows + heldout_windows`` windows of ``seq_len`` tokens: the first
    ``calib_windows`` feed the local errors, the rest are the held-out objective. ``eval`` (read after the
    search; ``None``: no perplexity) is cut into ``eval_windows`` x ``eval_seq_len``."""
    from ..io.checkpoint import check_target, save_pruned
    from ..io.loading import load_model
    from ..io.text import load_windows
    from .evaluate import perplexity

    t0 = time.perf_counter()
    if out is not None:
        check_target(Path(out).absolute(), overwrite)
    spec = model if isinstance(model, str) else None
    if isinstance(model, str):
        model, tokenizer, _ = load_model(model, dtype=torch.float32)
    assert isinstance(model, nn.Module)
    if tokenizer is None:
        raise PrunekitError("compress(model=<nn.Module>) needs tokenizer= to cut the calibration text")
    reference_params = sum(p.numel() for p in dict(model.named_parameters()).values())
    budget, budget_text = budget_bits(
        target_size=target_size, target_bits=target_bits, reference_params=reference_params
    )
    comp = Compressor(
        model,
        calib=torch.empty(0, dtype=torch.long),
        heldout=torch.empty(0, dtype=torch.long),
        formats=formats,
        base_bits=base_bits,
        max_removed=max_removed,
        sensitivity=sensitivity,
        reference=reference,
        on_step=on_step,
    )
    comp.check_budget(budget)  # before any text is read or any forward runs
    windows = load_windows(tokenizer, calib, seq_len=seq_len, num_windows=calib_windows + heldout_windows).ids
    if windows.shape[0] < calib_windows + heldout_windows:
        raise PrunekitError(
            f"{calib} gives {windows.shape[0]} windows of {seq_len} tokens; compress needs "
            f"{calib_windows + heldout_windows} (--calib-windows + --heldout-windows): lower them or --seq-len"
        )
    comp.calib, comp.heldout = windows[:calib_windows], windows[calib_windows:]
    choice, search = comp.search(budget, steps=steps, seed=seed)
    work, plan, rep = comp.materialize(choice)
    ppl = None
    if eval is not None:
        ew = load_windows(tokenizer, eval, seq_len=eval_seq_len, num_windows=eval_windows).ids
        res = perplexity(work, ew)
        ppl = {
            "text": eval,
            "windows": int(ew.shape[0]),
            "seq_len": int(ew.shape[1]),
            "perplexity": res.perplexity,
        }
    fmts = choice.fmt()
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "model": spec,
        "budget": {
            "given": budget_text,
            "bits": budget,
            "bytes": budget / 8,
            "bits_per_param": budget / reference_params,
        },
        "achieved": {
            "bits": rep.total_bits,
            "bytes": math.ceil(rep.total_bits / 8),
            "bits_per_param": rep.bits_per_param,
            "size": rep.to_dict(),
        },
        "smallest_bits": comp.smallest(),
        "removed_blocks": [comp.space.block_paths[i] for i in sorted(choice.removed)],
        "removed_units": list(plan.remove),
        "families": {
            f.key: {
                "format": "removed" if f.block is not None and f.block in choice.removed else fmts[f.key],
                "tensors": list(f.params),
                "bits": 0 if f.block is not None and f.block in choice.removed else f.bits[fmts[f.key]],
            }
            for f in comp.space.families
        },
        "tensor_formats": rep.tensor_formats,
        "base_bits": base_bits,
        "formats": list(comp.formats),
        "objective": {
            "text": calib,
            "seq_len": seq_len,
            "calibration_windows": [0, calib_windows],
            "heldout_windows": [calib_windows, calib_windows + heldout_windows],
            "sensitivity": sensitivity,
            **search,
        },
        "sensitivities": comp.sens.to_dict() if comp.sens else {},
        "max_removed": comp.max_removed,
        "seed": seed,
        "evaluation": ppl,
        "timings": comp.timings | {"total": time.perf_counter() - t0},
    }
    saved = None
    if out is not None:
        saved = save_pruned(
            work,
            out,
            tokenizer=tokenizer,
            plan=plan,
            overwrite=overwrite,
            extra_files={COMPRESS_FILE: json.dumps(record, indent=2) + "\n"},
        )
    return CompressResult(model=work, record=record, out=saved)


def load_compressed(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a folder written by :func:`compress`: the model and its record.

    Raises :class:`~prunekit_core.ir.errors.CheckpointError` when the folder is not a compress output or the
    loaded model's accounted size under the recorded formats differs from the recorded one."""
    from ..io.checkpoint import load_pruned
    from ..ir.errors import CheckpointError
    from ..quant.base import get_quant_format, size_report_mixed

    p = Path(path)
    rec_file = p / COMPRESS_FILE
    if not rec_file.is_file():
        raise CheckpointError(f"{p} has no {COMPRESS_FILE}: it was not written by `prunekit compress`")
    record = json.loads(rec_file.read_text())
    model = load_pruned(p)
    assignment = {n: get_quant_format(q) for n, q in record["tensor_formats"].items()}
    rep = size_report_mixed(
        model,
        assignment,
        base_bits=record["base_bits"],
        reference_params=record["achieved"]["size"]["reference_params"],
    )
    if rep.total_bits != record["achieved"]["bits"]:
        raise CheckpointError(
            f"{p}: the loaded model counts {rep.total_bits} bits under its recorded formats, the record says "
            f"{record['achieved']['bits']}; the folder was changed after it was written: run compress again"
        )
    return model, record
