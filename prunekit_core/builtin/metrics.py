"""Built-in importance metrics, registered through the same hook a third-party plugin uses.

Similarity metrics (``bi``, ``angular``, ``sublayer_drop``) read the statistics of the one shared
calibration pass. Trial metrics (``nri``, ``sleb``) measure calibration loss with units masked, through the
shared :class:`~prunekit_core.scoring.TrialRunner`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import PlanError
from ..hookspecs import hookimpl
from ..metrics import ChannelMetric, ImportanceMetric, Scores
from ..scoring import BlockObserver, Collector, ScoringContext
from ..width import width_families
from ..width_scoring import WIDTH_STATS, linear_members, out_member, width_collector


class BlockInfluence(ImportanceMetric):
    name = "bi"
    description = "ShortGPT Block Influence: 1 - mean cos(x_in, x_out) of each block over all tokens"
    unit = "block"
    streaming = True
    reference = "ShortGPT, arXiv 2403.03853"

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        values = {b: 1.0 - c for stats in ctx.all_stats() for b, c in stats.block_cos.items()}
        return Scores(metric=self.name, unit="block", values=values)


class AngularDistance(ImportanceMetric):
    name = "angular"
    description = (
        "Gromov et al.: arccos(cos(x_l, x_l+n))/pi on the last token, averaged; per span of n blocks"
    )
    unit = "span"
    streaming = True
    reference = "The Unreasonable Ineffectiveness of the Deeper Layers, arXiv 2403.17887"

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        n = span or 1
        values: dict[str, float] = {}
        for stats in ctx.all_stats():
            last = stats.boundary_last  # [windows, blocks + 1, hidden]
            blocks = [b.id for b in ctx.ir.tower(stats.tower).blocks]
            if n < 1 or n > len(blocks):
                raise PlanError(f"span of {n} blocks is impossible with {len(blocks)} blocks ({stats.tower})")
            for start in range(len(blocks) - n + 1):
                cos = torch.nn.functional.cosine_similarity(last[:, start], last[:, start + n], dim=-1)
                values[blocks[start]] = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
        return Scores(metric=self.name, unit="span", values=values, span=n)


class SublayerDrop(ImportanceMetric):
    name = "sublayer_drop"
    description = "'What Matters in Transformers': S = 1 - cos(X, X + f(LN(X))) per attention/MLP sublayer"
    unit = "sublayer"
    streaming = True
    reference = "What Matters in Transformers? arXiv 2406.15786"

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        values = {s: 1.0 - c for stats in ctx.all_stats() for s, c in stats.sub_cos.items()}
        return Scores(metric=self.name, unit="sublayer", values=values)


class RepairedBlockInfluence(ImportanceMetric):
    name = "bi_lsq"
    description = (
        "share of the stream's energy a block's removal loses after the least-squares fold into the previous "
        "block's output projection (pair with --repair lsq)"
    )
    unit = "block"
    reference = (
        "prunekit; repair in the spirit of LLM-Streamline (arXiv 2403.19135), folded into existing weights"
    )

    streaming = True  # block by block: BlockRepairObserver

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        from ..repair import block_repair_residuals

        values = ctx.calibration.observed.get(self.name)  # computed by a streaming pass
        if values is None:
            values = block_repair_residuals(
                ctx.model, ctx.ir, ctx.calibration.windows, inputs=ctx.calibration.inputs
            )
        return Scores(metric=self.name, unit="block", values=dict(values))

    def block_observer(self) -> BlockObserver:
        from ..repair import BlockRepairObserver

        return BlockRepairObserver(self.name)


def _trial_candidates(ctx: ScoringContext, default_unit: str) -> list[str]:
    if ctx.candidates is not None:
        return list(ctx.candidates)
    if default_unit == "block":
        return [b.id for b in ctx.ir.blocks() if b.removable]
    return [s.id for s in ctx.ir.sublayers() if s.removable]


class NRI(ImportanceMetric):
    name = "nri"
    description = (
        "relative perplexity increase when the unit alone is removed, per parameter (removal trials)"
    )
    unit = "sublayer"
    streaming = True  # single-unit trials: StreamingTrialRunner computes them block by block
    needs = frozenset({"trials"})
    reference = "Rethinking the Impact of Heterogeneous Sublayers (OpenReview qG1S5eXMzx)"

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        before = ctx._trials.block_forwards if ctx._trials is not None else 0
        runner = ctx.trials()
        units = ctx.ir.units()
        base = runner.current_loss
        values = {}
        for uid in _trial_candidates(ctx, self.unit):
            rel = math.exp(runner.loss([uid]) - base) - 1.0  # ppl ratio - 1
            values[uid] = rel / units[uid].params
        return Scores(
            metric=self.name,
            unit=self.unit,
            values=values,
            per_param=True,
            block_forwards=runner.block_forwards - before,
        )


class SLEB(ImportanceMetric):
    name = "sleb"
    description = (
        "SLEB: calibration loss after removing the unit alone (removal trials); lower = remove first"
    )
    unit = "block"
    streaming = True  # single-unit trials: StreamingTrialRunner computes them block by block
    needs = frozenset({"trials"})
    reference = "SLEB, arXiv 2402.09025"

    def score(self, ctx: ScoringContext, *, span: int | None = None) -> Scores:
        before = ctx._trials.block_forwards if ctx._trials is not None else 0
        runner = ctx.trials()
        values = {uid: runner.loss([uid]) for uid in _trial_candidates(ctx, self.unit)}
        return Scores(
            metric=self.name, unit=self.unit, values=values, block_forwards=runner.block_forwards - before
        )


class Magnitude(ChannelMetric):
    name = "magnitude"
    description = "width: L2 norm of each channel group's weights (every coupled slice)"
    reference = "Li et al., Pruning Filters for Efficient ConvNets, arXiv 1608.08710; Torch-Pruning's default"
    streaming = True  # the weights of the families in ctx.ir: one block at a time

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        from ..width_scoring import magnitude_scores

        # stage families too (conv necks, projectors): the weights alone order their channels
        return {
            fid: magnitude_scores(ctx.model, fam) for fid, (_, fam) in ctx.ir.all_channel_groups().items()
        }


class Wanda(ChannelMetric):
    """Families whose members are all ``nn.Linear``-shaped (inputs observable); not fused 3-D experts."""

    name = "wanda"
    description = "width: sum of |W_ij| * ||X_j|| over each channel group's weights (calibration inputs)"
    reference = "Wanda, arXiv 2306.11695 (structured: Wanda-sp / FLAP)"
    needs = frozenset({"activations"})
    streaming = True  # the block's weights and input statistics, while it is loaded

    def collectors(self) -> dict[str, Collector]:
        return {WIDTH_STATS: width_collector}

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        from ..width_scoring import wanda_scores

        stats = ctx.width_stats()
        return {
            fid: wanda_scores(ctx.model, fam, stats)
            for fid, (_, fam) in width_families(ctx.ir).items()
            if linear_members(ctx.model, fam)
        }


class Taylor(ChannelMetric):
    name = "taylor"
    description = "width: |sum of w * dL/dw| over each channel group (first order, calibration gradients)"
    reference = "LLM-Pruner, arXiv 2305.11627; Molchanov et al., arXiv 1906.10771"
    needs = frozenset({"gradients"})

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        from ..width_scoring import taylor_scores

        grads = ctx.taylor_grads()
        return {
            fid: taylor_scores(ctx.model, fam, grads) for fid, (_, fam) in ctx.ir.channel_groups().items()
        }


class OBS(ChannelMetric):
    """Families that include their sublayer's output projection (``out_proj``) as a member."""

    name = "obs"
    description = (
        "width: output error a group's removal leaves after refitting the kept channels, "
        "tr(W_S ((G^-1)_SS)^-1 W_S^T) (optimal brain surgeon at the branch output)"
    )
    reference = "Optimal Brain Surgeon (Hassibi & Stork 1993); structured form as in ZipLM, arXiv 2302.04089"
    needs = frozenset({"activations"})
    streaming = True  # the block's weights and input Grams, while it is loaded

    def collectors(self) -> dict[str, Collector]:
        return {WIDTH_STATS: width_collector}

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        from ..width_scoring import obs_scores

        stats = ctx.width_stats()
        return {
            fid: obs_scores(ctx.model, sub, fam, stats)
            for fid, (sub, fam) in width_families(ctx.ir).items()
            if out_member(sub, fam) is not None
        }


BUILTIN_METRICS = (
    BlockInfluence,
    RepairedBlockInfluence,
    AngularDistance,
    SublayerDrop,
    NRI,
    SLEB,
    Magnitude,
    Wanda,
    Taylor,
    OBS,
)


@hookimpl
def prunekit_register_metrics(register: Callable[[Any], Any]) -> None:
    for cls in BUILTIN_METRICS:
        register(cls())
