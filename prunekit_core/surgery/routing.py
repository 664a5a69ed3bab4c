"""Masking routed groups (MoE experts) without surgery: their router logits forced to -inf.

Removing expert ``e`` by slicing is meant to equal the unpruned model whose router never picks ``e``: its
logit is ``-inf``, so the softmax spreads ``e``'s probability over the other experts and top-k never
selects it. :func:`router_rows_masked` produces that model from the IR alone (a family's ``router``
parameter), whatever the router does after computing its logits (softmax, top-k, renormalisation): the
router weight is temporarily replaced by a tensor whose ``F.linear`` output has the masked columns at
``-inf``. The conformance kit checks expert surgery against it, and removal-trial metrics use it to
measure a model without some experts without copying any weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import get_module
from ..ir.errors import PlanError

_LINEAR = (F.linear, torch._C._nn.linear)


class MaskedRows(torch.Tensor):
    """A router weight whose rows ``rows`` produce ``-inf`` logits under ``F.linear``.

    Any other use of the tensor sees the plain weight; a router that computes its logits another way gets
    no masking, which :func:`router_rows_masked` detects and reports.
    """

    rows: list[int]
    calls: dict[str, int]

    @staticmethod
    def __new__(cls, data: torch.Tensor, rows: Sequence[int]) -> MaskedRows:
        t = torch.Tensor._make_subclass(cls, data.detach(), False)
        t.rows = list(rows)
        t.calls = {"used": 0, "masked": 0}
        return t

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        masked = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, MaskedRows)), None)

        def plain(a: Any) -> Any:
            return a.as_subclass(torch.Tensor) if isinstance(a, MaskedRows) else a

        with torch._C.DisableTorchFunctionSubclass():
            out = func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})
        if masked is not None:
            masked.calls["used"] += 1
            if func in _LINEAR:
                out = out.clone()
                out[..., masked.rows] = float("-inf")
                masked.calls["masked"] += 1
        return out


@contextmanager
def router_rows_masked(model: nn.Module, masks: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Within the block, router weight ``param`` (dotted path) gives ``-inf`` logits for rows ``masks[param]``.

    Raises :class:`PlanError` on exit if a masked router ran but never computed its logits with
    ``F.linear`` (the masking would have done nothing).
    """
    saved: list[tuple[nn.Module, str, nn.Parameter, MaskedRows]] = []
    try:
        for param, rows in masks.items():
            if not rows:
                continue
            module_path, _, leaf = param.rpartition(".")
            module = get_module(model, module_path)
            weight = module._parameters[leaf]
            if weight is None:
                raise PlanError(f"{param} is not a parameter")
            stand_in = MaskedRows(weight, rows)
            del module._parameters[leaf]
            object.__setattr__(module, leaf, stand_in)
            saved.append((module, leaf, weight, stand_in))
        yield
        silent = [
            f"{type(m).__name__}.{leaf}"
            for m, leaf, _, s in saved
            if s.calls["used"] and not s.calls["masked"]
        ]
        if silent:
            raise PlanError(f"routers {silent} did not compute logits with F.linear; cannot mask them")
    finally:
        for module, leaf, weight, _ in reversed(saved):
            object.__delattr__(module, leaf)
            module._parameters[leaf] = weight
