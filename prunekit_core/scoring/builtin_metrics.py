"""Built-in importance metrics, registered through the same hook a third-party plugin uses.

Similarity metrics (``bi``, ``angular``, ``sublayer_drop``) read the statistics of the one shared
calibration pass. Trial metrics (``nri``, ``sleb``) measure calibration loss with units masked, through the
shared :class:`~prunekit_core.scoring.calibration.TrialRunner`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapters.base import first_tensor, get_module, module_attr, module_tensor
from ..ir.errors import CalibrationError, PlanError
from ..ir.model import ChannelGroup, GroupMember, ModelIR, Sublayer
from ..registry.hookspecs import hookimpl
from ..surgery.repair import (
    WIDTH_STATS,
    NormalEquations,
    WidthStats,
    out_member,
    out_proj_path,
    solve_ridge,
    width_collector,
)
from ..surgery.width import group_slices, split_param, width_families
from .calibration import BlockObserver, BlockView, Collector, ScoringContext
from .metrics import ChannelMetric, ImportanceMetric, Scores

# ---------------------------------------------------------------------------------------------------------
# Channel-group scores (the width metrics below)


def reduce_member(member: GroupMember, count: int, values: torch.Tensor) -> torch.Tensor:
    """Sum an element-wise score tensor (shaped like the member's parameter) per group: ``[count]``."""
    v = values.movedim(member.axis, 0)
    v = v[member.offset : member.offset + count * member.width]
    return v.reshape(count, -1).sum(1)


def magnitude_scores(model: nn.Module, fam: ChannelGroup) -> torch.Tensor:
    total = torch.zeros(fam.count, dtype=torch.float64)
    for member, t in group_slices(model, fam):
        total += reduce_member(member, fam.count, t.detach().double() ** 2)
    return total.sqrt()


def _input_norm(member: GroupMember, tensor: torch.Tensor, stats: WidthStats) -> torch.Tensor:
    module = split_param(member.param)[0]
    if module not in stats.sumsq:
        raise PlanError(f"no calibration statistics for {module}; collect_width_stats did not see it run")
    norm = stats.sumsq[module].sqrt()
    if tensor.dim() == 1:  # a bias: no input
        return torch.ones_like(tensor, dtype=torch.float64)
    shape = [1] * tensor.dim()
    shape[1] = -1
    return norm.reshape(shape)


def linear_members(model: nn.Module, fam: ChannelGroup) -> bool:
    """Whether every member is a 1-D or 2-D tensor (``nn.Linear``-like: its inputs are observable)."""
    return all(t.dim() <= 2 for _m, t in group_slices(model, fam))


def wanda_scores(model: nn.Module, fam: ChannelGroup, stats: WidthStats) -> torch.Tensor:
    total = torch.zeros(fam.count, dtype=torch.float64)
    for member, t in group_slices(model, fam):
        w = t.detach().double().abs()
        total += reduce_member(member, fam.count, w * _input_norm(member, t, stats))
    return total


def taylor_scores(model: nn.Module, fam: ChannelGroup, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(fam.count, dtype=torch.float64)
    for member, t in group_slices(model, fam):
        total += reduce_member(member, fam.count, t.detach().double() * grads[member.param])
    return total.abs()


def obs_scores(model: nn.Module, sub: Sublayer, fam: ChannelGroup, stats: WidthStats) -> torch.Tensor:
    """Optimal-brain-surgeon score of each group at the branch output, assuming the refit.

    Removing the input columns ``S`` of the output projection ``W`` and refitting the kept columns by least
    squares raises the output error by ``tr(W_S ((G^-1)_SS)^-1 W_S^T)`` (``G`` the Gram of the projection's
    inputs): the group's contribution that the other channels cannot take over.
    """
    member = out_member(sub, fam)
    if member is None or sub.out_proj not in stats.gram:
        raise PlanError(f"{fam.id}: the obs metric needs the sublayer's out_proj among the family's members")
    out_proj = out_proj_path(sub)
    W = module_tensor(get_module(model, out_proj), "weight").detach().double()
    G = stats.gram[out_proj] + stats.gram_hold.get(out_proj, 0)
    G = G + 1e-6 * G.diagonal().mean().clamp_min(1e-12) * torch.eye(G.shape[0], dtype=G.dtype)
    L, info = torch.linalg.cholesky_ex(G)  # G is a Gram plus a ridge: Cholesky, half the work of an LU
    Ginv = torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.inv(G)
    w, off = member.width, member.offset
    # every group at once (a Python loop over 1536 FFN channels x 30 layers was a large part of planning)
    idx = off + torch.arange(fam.count).unsqueeze(1) * w + torch.arange(w)  # [count, w]
    blocks = torch.linalg.inv(Ginv[idx.unsqueeze(2), idx.unsqueeze(1)])  # [count, w, w]
    Ws = W[:, idx].permute(1, 0, 2)  # [count, out, w]
    out: torch.Tensor = torch.einsum("cov,cvu,cou->c", Ws, blocks, Ws)
    return out


# ---------------------------------------------------------------------------------------------------------
# Repaired block influence (bi_lsq): a block's loss after the least-squares fold


@torch.inference_mode()
def block_repair_residuals(
    model: nn.Module,
    ir: ModelIR,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    inputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """For every block: the share of the stream's energy its removal would lose *after* the LSQ fold.

    One forward pass over ``windows`` accumulates, per block, ``A^T A`` and ``A^T D`` where ``A`` are the
    inputs of the last ``out_proj`` of the previous block and ``D`` the block's contribution to the stream.
    The ridge strength is chosen on held-out windows as in :func:`~prunekit_core.surgery.repair.lsq_repair`. The value is
    ``E||D - A dW^T||^2 / E||x_out||^2``, comparable to Block Influence (which is about half the same
    ratio without the fold, for small angles). A block with no writer before it keeps its unrepaired
    ratio. ``inputs`` are further per-window inputs (images). The stream is read at block boundaries
    (each block's input, the last block's output), so a block whose branches read an undeclared norm
    (GPT-J's shared ``ln_1``) is measured on the stream, not on normed states. Memory: two ``in x in``
    float64 matrices per block (about 1.6 GB for a 30-block model with a 1536-wide FFN); a streaming pass
    (:class:`BlockRepairObserver`) keeps one block's.
    """
    out: dict[str, float] = {}
    for tower in ir.towers:
        blocks = list(tower.blocks)
        if not any(b.removable for b in blocks):
            continue  # nothing a plan may remove here (e.g. a tower outside the plan's scope)
        if not all(b.sublayers for b in blocks):
            raise CalibrationError(
                f"tower {tower.name} has blocks without branches; cannot score repairs (bi_lsq). "
                "Use another metric (bi, angular)"
            )
        writers: list[nn.Module | None] = [None]
        for b in blocks[:-1]:
            w = next((s.out_proj for s in reversed(b.sublayers) if s.out_proj), None)
            writers.append(get_module(model, w) if w else None)
        held_mask = torch.arange(windows.shape[0]) % 4 == 3
        acc = [
            {
                part: NormalEquations.zeros(module_attr(w, "in_features"), module_attr(w, "out_features"))
                for part in ("fit", "hold")
            }
            if w is not None
            else None
            for w in writers
        ]
        dd_all = torch.zeros(len(blocks), dtype=torch.float64)
        xx_all = torch.zeros(len(blocks), dtype=torch.float64)
        cur: dict[int, torch.Tensor] = {}
        feats: dict[int, torch.Tensor] = {}

        def on_point(
            i: int, cur: dict[int, torch.Tensor] = cur
        ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
            def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                cur[i] = first_tensor(args, kwargs)

            return fn

        def on_writer(
            i: int, feats: dict[int, torch.Tensor] = feats
        ) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
                feats[i] = args[0]

            return fn

        def on_end(
            _m: nn.Module,
            _args: tuple[Any, ...],
            out: Any,
            cur: dict[int, torch.Tensor] = cur,
            end: int = len(blocks),
        ) -> None:
            cur[end] = out[0] if isinstance(out, tuple) else out

        # the stream at block boundaries: every block's input, and the last block's output
        handles = [
            get_module(model, b.module).register_forward_pre_hook(on_point(i), with_kwargs=True)
            for i, b in enumerate(blocks)
        ]
        handles.append(get_module(model, blocks[-1].module).register_forward_hook(on_end))
        handles += [w.register_forward_pre_hook(on_writer(i)) for i, w in enumerate(writers) if w is not None]
        try:
            for part, mask in (("fit", ~held_mask), ("hold", held_mask)):
                sub = windows[mask]
                extra = {k: v[mask] for k, v in (inputs or {}).items()}
                for start in range(0, sub.shape[0], batch_size):
                    cur.clear()
                    feats.clear()
                    batch = {k: v[start : start + batch_size] for k, v in extra.items()}
                    model(input_ids=sub[start : start + batch_size], use_cache=False, **batch)
                    if 0 not in cur:
                        raise CalibrationError(
                            f"tower {tower.name} did not run on the calibration windows; give its inputs "
                            "(e.g. images: calibrate with the adapter's calibration_inputs)"
                        )
                    for i in range(len(blocks)):
                        x_in, x_out = cur[i].double(), cur[i + 1].double()
                        d = (x_out - x_in).reshape(-1, x_in.shape[-1])
                        dd_all[i] += (d * d).sum()
                        xx_all[i] += (x_out * x_out).sum()
                        normals = acc[i]
                        if normals is not None:
                            normals[part].add(feats[i], d)
        finally:
            for h in handles:
                h.remove()
        for i, b in enumerate(blocks):
            resid = dd_all[i]
            normals = acc[i]
            if normals is not None:
                _, gain, dw = solve_ridge(normals["fit"], normals["hold"])
                if gain > 0:
                    resid = (normals["fit"] + normals["hold"]).residual(dw)
            out[b.id] = float(resid / xx_all[i].clamp_min(1e-30))
    return out


def _writer(block: Any) -> str | None:
    """The last output projection of a block: the one a fold into that block writes through."""
    return next((s.out_proj for s in reversed(block.sublayers) if s.out_proj), None)


class BlockRepairObserver(BlockObserver):
    """:func:`block_repair_residuals` block by block (a streaming pass, one block loaded at a time).

    While block ``i-1`` runs, the inputs of its last output projection (the writer) are kept, batch by
    batch, in the model's dtype; while block ``i`` runs, its contribution ``D`` meets them in the normal
    equations, and block ``i``'s value is computed before it is unloaded. Memory: the writer's inputs over
    the calibration windows (the residual stream's size times its width ratio, e.g. about 2.7x for a
    Llama FFN) plus one block's two ``in x in`` matrices; no weights are kept. The sums run in another
    order than in memory (all windows batch by batch, not fit windows then held-out ones), so values agree
    to float64 rounding, not bitwise.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[str, float] = {}
        self._feats: list[torch.Tensor] = []  # the previous block's writer inputs, per batch

    @contextmanager
    def observe(self, view: BlockView) -> Iterator[None]:
        block = view.block
        if not block.sublayers:
            raise CalibrationError(
                f"tower {view.tower.name} has blocks without branches; cannot score repairs (bi_lsq). "
                "Use another metric (bi, angular)"
            )
        writer_path = _writer(block)
        held_mask = torch.arange(view.windows.shape[0]) % 4 == 3
        if view.index == 0:  # a new tower (a vision encoder came first): nothing carries over
            self._feats = []
        prev = self._feats
        acc = None
        if prev:
            d_in = prev[0].shape[-1]
            acc = {part: NormalEquations.zeros(d_in, view.tower.width.size) for part in ("fit", "hold")}
        dd = torch.zeros((), dtype=torch.float64)
        xx = torch.zeros((), dtype=torch.float64)
        feats: list[torch.Tensor] = []
        state: dict[str, Any] = {"x": None, "batch": 0, "row": 0}

        def on_start(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state["x"] = first_tensor(args, kwargs)

        def on_writer(_m: nn.Module, args: tuple[Any, ...]) -> None:
            feats.append(args[0])

        def on_end(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            nonlocal dd, xx
            x0 = state["x"].double()
            x1 = (out[0] if isinstance(out, tuple) else out).double()
            if x0.dim() < 3:  # rows must be windows ([batch, seq, hidden]; SAM: [batch, h, w, hidden])
                raise CalibrationError(
                    "bi_lsq streams [batch, seq, hidden] block inputs; got a flattened stream"
                )
            d = x1 - x0
            dd = dd + (d * d).sum()
            xx = xx + (x1 * x1).sum()
            held = held_mask[state["row"] : state["row"] + d.shape[0]]
            state["row"] += d.shape[0]
            if acc is not None:
                a = prev[state["batch"]]
                for part, rows in (("fit", ~held), ("hold", held)):
                    if rows.any():
                        acc[part].add(a[rows], d[rows])
            state["batch"] += 1

        handles = [
            get_module(view.model, block.module).register_forward_pre_hook(on_start, with_kwargs=True),
            get_module(view.model, block.module).register_forward_hook(on_end),
        ]
        if writer_path is not None:
            handles.append(get_module(view.model, writer_path).register_forward_pre_hook(on_writer))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        resid = dd
        if acc is not None:
            _, gain, dw = solve_ridge(acc["fit"], acc["hold"])
            if gain > 0:
                resid = (acc["fit"] + acc["hold"]).residual(dw)
        self.values[block.id] = float(resid / xx.clamp_min(1e-30))
        self._feats = feats  # the next block folds into this block's writer

    def results(self) -> dict[str, Any]:
        return {self.name: dict(self.values)}


# ---------------------------------------------------------------------------------------------------------
# The metrics


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
        values = ctx.calibration.observed.get(self.name)  # computed by a streaming pass
        if values is None:
            values = block_repair_residuals(
                ctx.model, ctx.ir, ctx.calibration.windows, inputs=ctx.calibration.inputs
            )
        return Scores(metric=self.name, unit="block", values=dict(values))

    def block_observer(self) -> BlockObserver:
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
