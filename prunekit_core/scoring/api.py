"""The high-level Python API the CLI is built on: each function is one step of the flow."""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from ..ir.model import ModelIR
from ..registry.plugins import get_metric, select_adapter
from .calibration import Calibration, ScoringContext
from .calibration import calibrate as _calibrate
from .metrics import Scores


def inspect(model: nn.Module) -> ModelIR:
    """The pruning IR of ``model`` (towers, blocks, sublayers, channel groups, parameter counts)."""
    return select_adapter(model).build_ir(model)


def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    inputs: dict[str, torch.Tensor] | None = None,
) -> Calibration:
    """One forward pass over ``windows`` ([n, seq_len] token ids) collecting every similarity statistic.

    ``inputs``: further per-window inputs (``pixel_values`` of a vision-language model, one image per window).
    """
    return _calibrate(model, inspect(model), windows, batch_size=batch_size, progress=progress, inputs=inputs)


def score(
    model: nn.Module,
    calibration: Calibration,
    metric: str,
    *,
    span: int | None = None,
    candidates: list[str] | None = None,
) -> Scores:
    """Importance scores (higher = keep) of ``metric`` for ``model``; ``span`` for span metrics."""
    adapter = select_adapter(model)
    ctx = ScoringContext(
        model=model,
        adapter=adapter,
        ir=adapter.build_ir(model),
        calibration=calibration,
        candidates=candidates,
    )
    return get_metric(metric).score(ctx, span=span)


@overload
def score_groups(model: nn.Module, calibration: Calibration, metric: str) -> dict[str, torch.Tensor]: ...


@overload
def score_groups(
    model: nn.Module, calibration: Calibration, metric: list[str]
) -> dict[str, dict[str, torch.Tensor]]: ...


def score_groups(
    model: nn.Module, calibration: Calibration, metric: str | list[str]
) -> dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]:
    """Importance of every channel group (higher = keep) for a channel metric: family id -> ``[count]``.

    With a list of metric names, returns metric name -> that mapping; the metrics share one scoring
    context, so statistics they have in common (e.g. the routing of expert metrics) come from one pass.
    """
    from ..ir.errors import PlanError
    from .metrics import ChannelMetric

    names = [metric] if isinstance(metric, str) else list(metric)
    found = [get_metric(n) for n in names]
    ms: list[ChannelMetric] = []
    for m in found:
        if not isinstance(m, ChannelMetric):
            raise PlanError(f"metric {m.name!r} does not score channel groups; use score() for it")
        ms.append(m)
    adapter = select_adapter(model)
    ctx = ScoringContext(model=model, adapter=adapter, ir=adapter.build_ir(model), calibration=calibration)
    out = {m.name: m.score_groups(ctx) for m in ms}
    return out[names[0]] if isinstance(metric, str) else out
