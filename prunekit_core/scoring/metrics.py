"""The base class for importance metrics, and the scores they return.

Convention: a score is an *importance*: higher means "keep". Planners remove the least important units
first. Metrics never run the model themselves; the :class:`~prunekit_core.scoring.calibration.ScoringContext` hands
them the statistics of the shared calibration pass and a removal-trial runner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from ..ir.errors import PlanError
from ..registry.plugins import registry_base

if TYPE_CHECKING:
    import torch

    from .calibration import BlockObserver, Collector, ScoringContext

Unit = Literal["block", "sublayer", "span", "channel"]
Need = Literal["activations", "trials", "gradients"]


class Scores(BaseModel):
    """Importance per unit id (higher = more important), from one metric."""

    metric: str
    unit: Unit
    values: dict[str, float]
    span: int | None = Field(None, description="for span metrics: blocks per span; ids name the first block")
    per_param: bool = Field(False, description="values are already divided by the unit's parameter count")
    block_forwards: int | None = Field(
        None, description="for trial metrics: block forward calls the scores cost (the capture pass included)"
    )

    def ranked(self) -> list[tuple[str, float]]:
        """Least important first."""
        return sorted(self.values.items(), key=lambda kv: kv[1])


@registry_base("metrics")
class ImportanceMetric(ABC):
    """Scores units of a model's IR.

    Subclasses set ``name``, ``description``, ``unit`` (what they score), ``needs`` (``activations``: the
    statistics of the one shared calibration pass; ``trials``: loss measurements with branches masked;
    ``gradients``: a backward pass) and ``reference`` (the paper). ``streaming`` is true when a streaming
    pass (one block in memory at a time, :mod:`prunekit_core.scoring.streaming`) can compute the scores: from the
    stream statistics of the calibration pass (``ctx.stats()``), from single-unit
    ``ctx.trials().loss([unit])`` calls, or block by block from the weights and statistics of each block
    while it is loaded (a :class:`ChannelMetric` whose ``score_groups`` reads only the families in
    ``ctx.ir``; any other metric through its :meth:`block_observer`).
    """

    name: str = ""
    description: str = ""
    unit: Unit = "block"
    needs: frozenset[Need] = frozenset({"activations"})
    reference: str = ""
    streaming: bool = False

    @abstractmethod
    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        """Scores for every removable unit of kind ``unit`` in ``ctx.ir``."""

    def block_observer(self) -> BlockObserver | None:
        """An observer that computes this metric's scores one block at a time during a calibration pass
        (``results()[self.name]`` are the values ``score`` returns; ``score`` reads them from
        ``ctx.calibration.observed``); ``None``: the metric does not need one."""
        return None


class ChannelMetric(ImportanceMetric):
    """Scores the groups of every channel-group family (width pruning).

    ``score_groups`` returns, per family id, a float tensor of ``family.count`` importances (higher =
    keep). Width and mixed planners order each family's groups by it.
    """

    unit: Unit = "channel"

    @abstractmethod
    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Importance of every group of every channel-group family in ``ctx.ir``."""

    def collectors(self) -> dict[str, Collector]:
        """The statistics ``score_groups`` reads through ``ctx.observed(key, collector)``, by key: a
        streaming pass turns their hooks on while each block runs (``streaming`` metrics only)."""
        return {}

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        raise PlanError(
            f"metric {self.name!r} scores channel groups, not blocks or sublayers: use --granularity width "
            "or mixed"
        )


class ExpertMetric(ChannelMetric):
    """Scores the experts of every routed family (MoE): ``score_groups`` returns only those families.

    The expert planner (``--granularity expert``) removes the least important experts of each layer by it;
    any other :class:`ChannelMetric` that scores routed families (``magnitude``, ``taylor``) works there too.
    """

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        raise PlanError(f"metric {self.name!r} scores experts: use --granularity expert")
