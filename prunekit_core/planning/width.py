"""Width planning: a loss-per-parameter cost model over channel groups, and the planners.

One calibration pass (:func:`~prunekit_core.surgery.repair.collect_width_stats`) records, for every module a
channel-group member sits in, the squared norm of each input feature, and for every sublayer's output
projection the full input Gram matrix ``A^T A``. From these:

- **metrics** (:mod:`prunekit_core.scoring.builtin_metrics`) order the groups of a family (least important first):
  ``magnitude`` (L2 norm of the group's weights), ``wanda`` (sum of ``|W_ij| * ||X_j||`` over the group's
  weights, Wanda's score aggregated per group) and ``taylor`` (``|sum w * dL/dw|`` over the group, first
  order, gradients on calibration data);
- the **cost model** turns "remove the k least important groups of this family" into an estimated loss
  increase. The branch's output error is exact and analytic: ``||W_S a_S||^2`` without repair, and with
  repair (the output projection refit on the kept channels by least squares) the residual of projecting
  ``W a`` on the kept inputs, read off one Cholesky factor of the Gram for every k at once. One removal
  trial per sublayer measures the loss increase of removing the whole branch; the sublayer's estimated
  loss for a partial cut is that measurement scaled by the fraction of the branch's output energy the cut
  loses (the second-order picture: loss grows with the squared size of the perturbation);
- the **planner** takes, over every family, the lower convex hull of (parameters removed, estimated loss)
  and removes hull segments in order of loss per parameter until the budget is met (the last step picks
  the cheapest single move that finishes the budget). ``mixed`` lets a family go all the way, which
  removes its sublayer (both sublayers of a block: the block) with its measured loss; ``width`` keeps at
  least one group everywhere.

Group counts that remain are multiples of a rounding step: the smallest number of groups whose slice along
the narrowest member is a multiple of ``round_to`` (FFN channels: ``round_to`` channels; KV groups of
head_dim 64 with ``round_to`` 32: any number of groups).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..adapters.base import get_module, module_tensor
from ..ir.errors import PlanError
from ..ir.model import ChannelGroup, GroupMember, ModelIR, Sublayer
from ..scoring.calibration import BlockScorer
from ..surgery.repair import (
    REFIT_RIDGE_GRID,
    WIDTH_STATS,
    WidthStats,
    out_member,
    out_proj_path,
    refit_columns,
    width_collector,
)
from ..surgery.width import group_slices, member_index, removed_positions, width_families

if TYPE_CHECKING:
    from ..scoring.metrics import ImportanceMetric

log = logging.getLogger(__name__)

Allocation = Literal["global", "uniform"]


# ---------------------------------------------------------------------------------------------------------
# Cost model


def _nearest(ks: list[int], target: float) -> int:
    """The first of ``ks`` closest to ``target``."""
    return min(ks, key=lambda k: abs(k - target))


def round_step(fam: ChannelGroup, round_to: int) -> int:
    """Groups per rounding step: kept groups * narrowest member width is a multiple of ``round_to``."""
    if round_to < 1:
        raise PlanError(f"--round-to must be a positive number of channels, got {round_to}")
    width = min(m.width for m in fam.members)
    return math.lcm(round_to // math.gcd(round_to, width), fam.multiple_of)


def allowed_cuts(fam: ChannelGroup, round_to: int, *, allow_all: bool) -> list[int]:
    """Numbers of groups that may be removed: the kept count is a multiple of the rounding step."""
    step = round_step(fam, round_to)
    ks = [k for k in range(fam.count) if (fam.count - k) % step == 0 and fam.count - k >= step]
    if 0 not in ks:
        ks.insert(0, 0)  # leaving a family untouched is always allowed
    if allow_all:
        ks.append(fam.count)
    return ks


@dataclass
class FamilyCost:
    """Estimated loss increase of removing the ``k`` least important groups, for each allowed ``k``."""

    family: str
    sublayer: str
    order: list[int]  # group indices, least important first
    ks: list[int]
    params: list[int]
    cost: list[float]
    count: int = -1  # groups in the family: removing all of them removes the branch (-1: never whole)


def _output_energy_curve(
    W: torch.Tensor, G: torch.Tensor, member: GroupMember, count: int, order: list[int], repair: bool
) -> torch.Tensor:
    """Branch-output error after removing the first k groups of ``order``, for k = 0..count."""
    w = member.width
    desc = list(reversed(order))  # most important first: kept sets are prefixes
    feat = torch.cat([torch.arange(member.offset + g * w, member.offset + (g + 1) * w) for g in desc])
    Wp = W[:, feat]
    Gp = G[feat][:, feat]
    total = float((Wp @ Gp * Wp).sum())
    if repair:
        jitter = 1e-8 * Gp.diagonal().mean().clamp_min(1e-12)
        L = torch.linalg.cholesky(Gp + jitter * torch.eye(len(feat), dtype=Gp.dtype))
        energy = ((Wp @ L) ** 2).sum(0)  # explained energy per feature in the prefix order
        explained = torch.cat([torch.zeros(1, dtype=energy.dtype), energy.cumsum(0)])
        kept_feats = torch.tensor([(count - k) * w for k in range(count + 1)])
        return (total - explained[kept_feats]).clamp_min(0)
    M = (Wp.T @ Wp) * Gp  # [f, f]; err(S) = sum of M over S x S
    B = M.reshape(count, w, count, w).sum((1, 3))  # group blocks, most important first
    # removing k groups removes the last k of `desc`: the bottom-right k x k corner
    rev = B.flip(0).flip(1)
    corner = rev.cumsum(0).cumsum(1).diagonal()
    return torch.cat([torch.zeros(1, dtype=corner.dtype), corner]).clamp_min(0)


def curve_key(metric: str, repair: bool) -> str:
    """Where a streaming pass leaves the width cost model's output-energy curves (``Calibration.observed``)."""
    return f"prunekit.width_curves:{metric}:{'lsq' if repair else 'none'}"


class WidthCurveObserver(BlockScorer):
    """The width planner's per-block inputs, one block at a time (a streaming pass): the channel metric's
    group scores, and for every family cut off its sublayer's output projection the branch-output error
    curve of removing its least important groups (:func:`_output_energy_curve`, from the block's weights
    and input Gram). What the planner keeps of a block is ``count + 1`` numbers per family, not its Grams
    or weights; :func:`plan_width` reads them instead of computing them from the model."""

    def __init__(self, metric: ImportanceMetric, *, repair: bool) -> None:
        from ..scoring.metrics import ChannelMetric

        if not isinstance(metric, ChannelMetric):
            raise PlanError(
                f"metric {metric.name!r} does not score channel groups; the width curves need one"
            )
        super().__init__([metric])
        self.collectors = {**self.collectors, WIDTH_STATS: width_collector}
        self.key = curve_key(metric.name, repair)
        self.repair = repair
        self.curves: dict[str, torch.Tensor] = {}

    def _score(self, ctx: Any) -> None:
        before = set(self.scores[self.metrics[0].name])
        super()._score(ctx)
        scores = self.scores[self.metrics[0].name]
        fams = width_families(ctx.ir)
        for fid in set(scores) - before:
            if fid not in fams or (member := out_member(*fams[fid])) is None:
                continue
            sub, fam = fams[fid]
            order = [int(i) for i in torch.argsort(scores[fid], stable=True)]
            out_proj = out_proj_path(sub)
            W = module_tensor(get_module(ctx.model, out_proj), "weight").detach().double()
            stats = ctx.width_stats()
            G = stats.gram[out_proj] + stats.gram_hold.get(out_proj, 0)
            self.curves[fid] = _output_energy_curve(W, G, member, fam.count, order, self.repair)

    def results(self) -> dict[str, Any]:
        return {**super().results(), self.key: dict(self.curves)}


@torch.no_grad()
def _probe(
    ctx: Any,
    runner: Any,
    orders: dict[str, list[int]],
    stats: WidthStats,
    *,
    repair: bool,
    round_to: int,
    fractions: tuple[float, ...],
) -> dict[str, dict[int, float]]:
    """Measured loss increase of cutting each family at a few fractions of its groups (trials).

    The cut is simulated in place on the output projection: the removed groups' input columns are zeroed
    (exactly what removing them does to the branch output) and, with repair, the kept columns get their
    least-squares refit; the weight is restored afterwards.
    """
    ir: ModelIR = ctx.ir
    fams = ir.channel_groups()
    base = runner.current_loss
    out: dict[str, dict[int, float]] = {}
    for fid, order in orders.items():
        sub, fam = fams[fid]
        member = out_member(sub, fam)
        if member is None or not sub.removable:
            continue
        ks = [k for k in allowed_cuts(fam, round_to, allow_all=False) if k > 0]
        picks = sorted({_nearest(ks, f * fam.count) for f in fractions} if ks else set())
        out_proj = out_proj_path(sub)
        weight = module_tensor(get_module(ctx.model, out_proj), "weight")
        saved = weight.detach().clone()
        W = saved.double()
        G = stats.gram[out_proj] + stats.gram_hold.get(out_proj, 0)
        out[fid] = {}
        for k in picks:
            kept = sorted(order[k:])
            keep = member_index(member, fam.count, kept, W.shape[1])
            new = torch.zeros_like(W)
            new[:, keep] = refit_columns(W, G, keep, REFIT_RIDGE_GRID[1]) if repair else W[:, keep]
            try:
                weight.copy_(new.to(saved.dtype))
                out[fid][k] = runner.replay(sub.id) - base
            finally:
                weight.copy_(saved)
    return out


def _unplanned_hint(ir: ModelIR, planned: dict[str, list[int]], metric: Any) -> str:
    """Which families the width planner left out, and how to reach them."""
    left = {f.kind for fid, (_s, f) in ir.channel_groups().items() if fid not in planned}
    hints = []
    if "expert" in left:
        hints.append("experts are planned with --granularity expert")
    other = sorted(left - {"expert"})
    if other:
        hints.append(
            f"metric {metric.name!r} does not score {', '.join(other)} families (magnitude and taylor do)"
        )
    return (". Not planned here: " + "; ".join(hints)) if hints else ""


@contextmanager
def groups_zeroed(model: nn.Module, fam: ChannelGroup, groups: list[int]) -> Iterator[None]:
    """Within the block, every member slice of ``groups`` is zero (what removing them computes)."""
    slices = group_slices(model, fam)
    # one copy per tensor, taken before any zeroing (several members may share a fused tensor)
    saved = {id(t): (t, t.detach().clone()) for _m, t in slices}
    with torch.no_grad():
        for member, tensor in slices:
            for g in groups:
                tensor.narrow(member.axis, member.offset + g * member.width, member.width).zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved.values():
                tensor.copy_(copy)


def trial_costs(
    model: nn.Module,
    runner: Any,
    fid: str,
    sub: Sublayer,
    fam: ChannelGroup,
    order: list[int],
    *,
    round_to: int,
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75),
) -> FamilyCost:
    """A family's cost curve from removal trials: the least important groups zeroed at a few fractions of
    the family (loss increase measured, interpolated in between, extended by the last slope)."""
    ks = allowed_cuts(fam, round_to, allow_all=False)
    live = [k for k in ks if k > 0]
    picks = sorted({_nearest(live, f * fam.count) for f in fractions}) if live else []
    base = runner.current_loss
    anchors = [(0, 0.0)]
    for k in picks:
        with groups_zeroed(model, fam, order[:k]):
            loss = max(runner.replay(sub.id) - base, anchors[-1][1])  # removing more never costs less
        anchors.append((k, loss))
    cost = []
    for k in ks:
        j = next((i for i in range(1, len(anchors)) if anchors[i][0] >= k), len(anchors) - 1)
        (ka, ca), (kb, cb) = anchors[max(j - 1, 0)], anchors[j]
        cost.append(ca + (k - ka) * (cb - ca) / (kb - ka) if kb > ka else ca)
    return FamilyCost(fid, sub.id, order, ks, [k * fam.params_per_group for k in ks], cost, fam.count)


def family_costs(
    model: nn.Module,
    ir: ModelIR,
    orders: dict[str, list[int]],
    stats: WidthStats,
    sublayer_loss: dict[str, float],
    *,
    repair: bool,
    round_to: int,
    allow_all: bool,
    probes: dict[str, dict[int, float]] | None = None,
    curves: dict[str, torch.Tensor] | None = None,
) -> list[FamilyCost]:
    """The cost curve of every family (see the module docstring). ``curves``: the output-energy curves,
    already computed block by block (:class:`WidthCurveObserver`), instead of ``stats`` and the weights."""
    out = []
    for fid, (sub, fam) in ir.channel_groups().items():
        if fid not in orders:
            continue
        member = out_member(sub, fam)
        if curves is not None and member is not None:
            curve = curves[fid]
        else:
            if member is None or sub.out_proj not in stats.gram:
                raise PlanError(
                    f"{fid}: the cost model needs the sublayer's out_proj among the family's members (axis 1)"
                )
            out_proj = out_proj_path(sub)
            W = module_tensor(get_module(model, out_proj), "weight").detach().double()
            G = stats.gram[out_proj] + stats.gram_hold.get(out_proj, 0)
            curve = _output_energy_curve(W, G, member, fam.count, orders[fid], repair)
        measured = max(sublayer_loss.get(sub.id, 0.0), 0.0)  # removal that helps is free
        anchors = {0: 0.0, **(probes or {}).get(fid, {}), fam.count: measured}
        ks_a = sorted(anchors)
        vals = [max(anchors[k], 0.0) for k in ks_a]
        for i in range(1, len(vals)):  # removing more never costs less
            vals[i] = max(vals[i], vals[i - 1])
        ks = allowed_cuts(fam, round_to, allow_all=allow_all)
        params, cost = [], []
        for k in ks:
            if k == fam.count:
                params.append(sub.params)  # the whole branch goes, pre-norm included
                cost.append(vals[-1])
                continue
            params.append(k * fam.params_per_group)
            j = next(i for i in range(1, len(ks_a)) if ks_a[i] >= k)
            a, b = ks_a[j - 1], ks_a[j]
            ea, eb, ek = float(curve[a]), float(curve[b]), float(curve[k])
            t = (ek - ea) / (eb - ea) if eb > ea else (k - a) / (b - a)
            cost.append(vals[j - 1] + min(max(t, 0.0), 1.0) * (vals[j] - vals[j - 1]))
        out.append(FamilyCost(fid, sub.id, orders[fid], ks, params, cost, fam.count))
    return out


def _hull(fc: FamilyCost) -> list[int]:
    """Indices into ``fc.ks`` of the lower convex hull from the origin (increasing slopes)."""
    pts = list(zip(fc.params, fc.cost, strict=True))
    hull = [0]
    for i in range(1, len(pts)):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = pts[hull[-2]], pts[hull[-1]]
            x3, y3 = pts[i]
            if (y2 - y1) * (x3 - x1) >= (y3 - y1) * (x2 - x1):  # middle point not below the chord
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate_global(costs: list[FamilyCost], target: int) -> dict[str, int]:
    """Position in ``ks`` per family: hull segments by loss per parameter, cheapest finisher last."""
    pos = {fc.family: 0 for fc in costs}
    by_id = {fc.family: fc for fc in costs}
    segs = []
    for fc in costs:
        h = _hull(fc)
        for a, b in zip(h, h[1:], strict=False):
            dp = fc.params[b] - fc.params[a]
            segs.append(((fc.cost[b] - fc.cost[a]) / max(dp, 1), fc.family, a, b))
    segs.sort(key=lambda s: s[0])
    done = 0
    for _slope, fid, a, b in segs:
        if pos[fid] != a:
            continue  # an earlier finisher moved this family past the segment's start
        fc = by_id[fid]
        gain = fc.params[b] - fc.params[a]
        need = target - done
        if gain >= need:
            # finish with the cheapest single move over all families (any allowed level, hull or not)
            best = (fc.cost[b] - fc.cost[a], fid, b)
            for other in costs:
                p0, c0 = other.params[pos[other.family]], other.cost[pos[other.family]]
                for j in range(pos[other.family] + 1, len(other.ks)):
                    if other.params[j] - p0 >= need:
                        if other.cost[j] - c0 < best[0]:
                            best = (other.cost[j] - c0, other.family, j)
                        break
            _, fid, b = best
            pos[fid] = b
            return pos
        pos[fid] = b
        done += gain
    raise PlanError(
        f"the budget ({target} parameters) cannot be met at this granularity: at most {done} can go. "
        "Lower --ratio, or use --granularity mixed (which may also remove whole sublayers and blocks)."
    )


def _uniform_space(
    costs: list[FamilyCost], ir: ModelIR
) -> tuple[dict[tuple[str, int], list[FamilyCost]], list[tuple[str, int]], dict[tuple[str, int], list[int]]]:
    """Families by (kind, group count), the kinds in order, and the cuts every family of a kind allows."""
    fams = ir.channel_groups()
    kinds: dict[tuple[str, int], list[FamilyCost]] = {}
    for fc in costs:
        fam = fams[fc.family][1]
        kinds.setdefault((fam.kind, fam.count), []).append(fc)
    keys = sorted(kinds)
    common: dict[tuple[str, int], list[int]] = {}
    for key in keys:
        sets = [set(fc.ks) - {fams[fc.family][1].count} for fc in kinds[key]]
        common[key] = sorted(set.intersection(*sets))
    if math.prod(len(v) for v in common.values()) > 200_000:
        raise PlanError("too many uniform width combinations to search; use --width-allocation global")
    return kinds, keys, common


def _uniform_fields(
    ir: ModelIR, kinds: dict[tuple[str, int], list[FamilyCost]], chosen: dict[tuple[str, int], int]
) -> dict[str, int]:
    """The config fields a uniform choice (groups removed per kind) implies."""
    fams = ir.channel_groups()
    fields: dict[str, int] = {}
    for (kind, count), k in chosen.items():
        fam = fams[kinds[(kind, count)][0].family][1]
        fields.update({f: per * (count - k) for f, per in fam.config_fields.items()})
    return fields


def _no_uniform_plan(target: int) -> PlanError:
    return PlanError(
        f"no uniform width plan removes {target} parameters (every layer keeping at least one rounding "
        "step per family); lower --ratio or --round-to, or use --width-allocation global"
    )


def allocate_uniform(
    costs: list[FamilyCost],
    ir: ModelIR,
    target: int,
    describable: Callable[[dict[str, int]], bool] | None = None,
) -> dict[str, int]:
    """The same number of groups removed from every family of a kind; the cheapest such plan that fits.

    ``describable(fields)`` says whether the model's config accepts the config fields such a plan implies
    (e.g. ``LlamaConfig`` wants ``hidden_size % num_attention_heads == 0``); rejected choices are skipped.
    """
    kinds, keys, common = _uniform_space(costs, ir)
    best: tuple[float, dict[tuple[str, int], int]] | None = None

    def visit(i: int, chosen: dict[tuple[str, int], int]) -> None:
        nonlocal best
        if i == len(keys):
            params = cost = 0.0
            for key, k in chosen.items():
                for fc in kinds[key]:
                    j = fc.ks.index(k)
                    params += fc.params[j]
                    cost += fc.cost[j]
            if params >= target and (best is None or cost < best[0]):
                if describable is None or describable(_uniform_fields(ir, kinds, chosen)):
                    best = (cost, dict(chosen))
            return
        for k in common[keys[i]]:
            chosen[keys[i]] = k
            visit(i + 1, chosen)
        chosen.pop(keys[i], None)

    visit(0, {})
    if best is None:
        raise _no_uniform_plan(target)
    return _uniform_positions(costs, ir, best[1])


def _uniform_positions(
    costs: list[FamilyCost], ir: ModelIR, chosen: dict[tuple[str, int], int]
) -> dict[str, int]:
    fams = ir.channel_groups()
    return {
        fc.family: fc.ks.index(chosen[(fams[fc.family][1].kind, fams[fc.family][1].count)]) for fc in costs
    }


#: uniform widths the planner measures at most; a model with more least widths that meet the budget gets
#: the cost model's choice (from a removal trial of every sublayer) instead
MAX_MEASURED = 8


def uniform_frontier(
    costs: list[FamilyCost],
    ir: ModelIR,
    target: int,
    describable: Callable[[dict[str, int]], bool] | None = None,
    *,
    limit: int = MAX_MEASURED,
) -> tuple[list[dict[str, int]], bool]:
    """The least uniform widths that remove at least ``target`` parameters: every choice of groups removed
    per kind that meets the budget and the config, except those that remove at least as much of every kind
    as another such choice (removing more of every kind never lowers the loss, so they cannot win).

    Needs only the families' cuts and parameter counts (``costs``' ``cost`` is not read). Returns at most
    ``limit`` choices (allocator positions, fewest groups removed first) and whether more were left out.
    """
    kinds, keys, common = _uniform_space(costs, ir)
    per_param = {
        key: {k: sum(fc.params[fc.ks.index(k)] for fc in kinds[key]) for k in common[key]} for key in keys
    }
    feasible = [
        c
        for c in itertools.product(*(common[key] for key in keys))
        if sum(per_param[key][k] for key, k in zip(keys, c, strict=True)) >= target
    ]
    # a choice that removes no more of any kind than another has a smaller sum of levels: it comes first
    feasible.sort(key=lambda c: (sum(common[key].index(k) for key, k in zip(keys, c, strict=True)), c))
    kept: list[tuple[int, ...]] = []
    for c in feasible:
        if any(all(a <= b for a, b in zip(d, c, strict=True)) for d in kept):
            continue
        chosen = dict(zip(keys, c, strict=True))
        if describable is not None and not describable(_uniform_fields(ir, kinds, chosen)):
            continue
        if len(kept) == limit:
            return [_uniform_positions(costs, ir, dict(zip(keys, d, strict=True))) for d in kept], True
        kept.append(c)
    if not kept:
        raise _no_uniform_plan(target)
    return [_uniform_positions(costs, ir, dict(zip(keys, d, strict=True))) for d in kept], False


def shape_costs(
    fams: dict[str, tuple[Sublayer, ChannelGroup]], orders: dict[str, list[int]], round_to: int
) -> list[FamilyCost]:
    """Every family's allowed cuts and their parameter counts, with no loss estimate (all zero)."""
    out = []
    for fid, order in orders.items():
        sub, fam = fams[fid]
        ks = allowed_cuts(fam, round_to, allow_all=False)
        out.append(
            FamilyCost(
                fid, sub.id, order, ks, [k * fam.params_per_group for k in ks], [0.0] * len(ks), fam.count
            )
        )
    return out


@contextmanager
def width_cut(
    model: nn.Module, ir: ModelIR, groups: dict[str, list[int]], stats: WidthStats | None
) -> Iterator[list[str]]:
    """Within the block, the groups ``groups`` (family id -> group indices) are cut from their sublayers'
    output projections in place: their input columns zeroed (exactly what removing them does to the branch
    output) and, with ``stats`` (repair), the kept columns refit by least squares on the calibration Gram
    (ridge ``REFIT_RIDGE_GRID[1]``, as :func:`_probe`). Yields the edited sublayers' ids; restores the weights."""
    fams = ir.channel_groups()
    gone: dict[str, tuple[str, set[int]]] = {}
    for fid, cut in groups.items():
        if not cut:
            continue
        sub, fam = fams[fid]
        member = out_member(sub, fam)
        if member is None:
            raise PlanError(
                f"{fid}: an in-place cut needs the sublayer's out_proj among the family's members"
            )
        path = out_proj_path(sub)
        size = module_tensor(get_module(model, path), "weight").shape[1]
        kept = sorted(set(range(fam.count)) - set(cut))
        gone.setdefault(path, (sub.id, set()))[1].update(removed_positions(member, fam.count, kept, size))
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for path, (_sid, cols) in gone.items():
                weight = module_tensor(get_module(model, path), "weight")
                saved.append((weight, weight.detach().clone()))
                W = weight.detach().double()
                keep = torch.tensor([i for i in range(W.shape[1]) if i not in cols], dtype=torch.long)
                new = torch.zeros_like(W)
                if stats is not None:
                    G = stats.gram[path] + stats.gram_hold.get(path, 0)
                    new[:, keep] = refit_columns(W, G, keep, REFIT_RIDGE_GRID[1])
                else:
                    new[:, keep] = W[:, keep]
                weight.copy_(new.to(weight.dtype))
        yield [sid for sid, _ in gone.values()]
    finally:
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)


def measure_uniform(
    ctx: Any,
    runner: Any,
    costs: list[FamilyCost],
    options: list[dict[str, int]],
    *,
    repair: bool,
    what: str = "width",
) -> list[float]:
    """The measured calibration-loss increase (removal trials' windows) of each uniform width in ``options``,
    cut in place (:func:`width_cut`) on the model as it is."""
    ir: ModelIR = ctx.ir
    order = {s.id: i for i, s in enumerate(ir.sublayers())}
    stats = ctx.width_stats() if repair else None
    base = runner.current_loss
    out = []
    for i, pos in enumerate(options, 1):
        groups = {fc.family: sorted(fc.order[: fc.ks[pos[fc.family]]]) for fc in costs}
        with width_cut(ctx.model, ir, groups, stats) as edited:
            start = min(edited, key=lambda sid: order[sid]) if edited else None
            loss = runner.loss(start=start) - base if start else 0.0
        out.append(loss)
        log.info("%s: uniform width %d/%d measured, calibration loss %+.4f", what, i, len(options), loss)
    return out


# ---------------------------------------------------------------------------------------------------------
# The width and mixed planners


@dataclass
class WidthPlan:
    remove: list[str]
    remove_groups: dict[str, list[int]]
    estimated_loss: float
    sublayer_loss: dict[str, float]
    notes: list[str]


def _to_plan(
    ir: ModelIR, costs: list[FamilyCost], pos: dict[str, int]
) -> tuple[list[str], dict[str, list[int]], float]:
    """Turn allocator positions into (units to remove, groups to remove, estimated loss)."""
    fams = ir.channel_groups()
    removed_subs: set[str] = set()
    remove_groups: dict[str, list[int]] = {}
    est = 0.0
    for fc in costs:
        j = pos.get(fc.family, 0)
        k = fc.ks[j]
        est += fc.cost[j]
        if k == 0:
            continue
        if fc.family not in fams or k == fams[fc.family][1].count:
            removed_subs.add(fc.sublayer)
        else:
            remove_groups[fc.family] = sorted(fc.order[:k])
    remove_groups = {f: g for f, g in remove_groups.items() if fams[f][0].id not in removed_subs}
    remove: list[str] = []
    for b in ir.blocks():
        ids = [s.id for s in b.sublayers]
        if ids and all(i in removed_subs for i in ids):
            remove.append(b.id)
        else:
            remove += [i for i in ids if i in removed_subs]
    towers_empty = [t.name for t in ir.towers if t.blocks and all(b.id in remove for b in t.blocks)]
    if towers_empty:
        raise PlanError(f"the plan would remove every block of tower {towers_empty[0]}; lower --ratio")
    return remove, remove_groups, est


def _depth_spans(ctx: Any, target: int) -> list[list[str]]:
    """Prunekit's depth choice (least angular-distance span) for every span length below the budget and
    the shortest one that meets it."""
    from ..registry.plugins import get_metric
    from ..scoring.calibration import calibrate

    if not ctx.calibration.towers:
        ctx.calibration = calibrate(ctx.model, ctx.ir, ctx.calibration.windows)
    ir: ModelIR = ctx.ir
    order = [b.id for b in ir.blocks()]
    units = ir.units()
    spans = []
    for n in range(1, len(order)):
        values = get_metric("angular").score(ctx, span=n).values
        fits = []
        for start, v in values.items():
            ids = order[order.index(start) : order.index(start) + n]
            if all(units[u].removable for u in ids):
                fits.append((v, ids))
        if not fits:
            break
        ids = min(fits)[1]
        spans.append(ids)
        if sum(units[u].params for u in ids) >= target:
            break
    return spans


def _choose_mixed(
    ctx: Any,
    costs: list[FamilyCost],
    one_scale: tuple[list[str], dict[str, list[int]], float],
    target: int,
    repair: bool,
    measured: dict[str, float],
    notes: list[str],
) -> WidthPlan:
    """Candidates under the same budget, applied to a copy and measured; the lowest calibration loss wins.

    Candidates: the one-scale plan, every split "span of n blocks (prunekit's depth choice) + width for the
    rest of the budget" (n = 0 is width only, allocated uniformly and globally; the last n meets the budget
    alone: depth only; splits allocate their width part uniformly).
    """
    allocations = ("uniform", "global")
    import copy

    from ..ir.plan import PrunePlan
    from ..surgery.apply import apply_plan

    ir: ModelIR = ctx.ir
    units = ir.units()
    cands: list[tuple[str, list[str], dict[str, list[int]]]] = [("one scale", one_scale[0], one_scale[1])]
    for span in [[], *_depth_spans(ctx, target)]:
        got = sum(units[u].params for u in span)
        if got >= target:
            cands.append((f"depth only ({len(span)} blocks)", span, {}))
            continue
        gone = set(span)
        rest = [fc for fc in costs if not any(fc.sublayer.startswith(b + ".") for b in gone)]
        rest = [_without_whole(fc) for fc in rest if fc.family != fc.sublayer]
        for how in allocations if not span else allocations[:1]:
            try:
                if how == "uniform":
                    pos = allocate_uniform(rest, ir, target - got, describable=_describable(ctx))
                else:
                    pos = allocate_global(rest, target - got)
            except PlanError:
                continue
            _, groups, _ = _to_plan(ir, rest, pos)
            what = f"{len(span)} blocks + {how} width" if span else f"{how} width only"
            cands.append((what, span, groups))
    windows = ctx.calibration.windows
    select = windows[-min(8, windows.shape[0]) :]
    fp = ctx.fingerprint(ir)
    results = []
    for label, remove, groups in cands:
        plan = PrunePlan(
            fingerprint=fp, remove=remove, remove_groups=groups, repair="lsq" if repair else "none"
        )
        trial = copy.deepcopy(ctx.model)
        apply_plan(trial, plan, adapter=ctx.adapter, repair_windows=windows)
        with torch.inference_mode():
            loss = float(trial(input_ids=select, labels=select, use_cache=False).loss)
        del trial
        results.append((loss, label, remove, groups))
        log.info("mixed candidate %s: calibration loss %.4f", label, loss)
    loss, label, remove, groups = min(results, key=lambda r: r[0])
    notes = notes + [
        "mixed: candidates measured on the last "
        f"{select.shape[0]} calibration windows after surgery"
        + (" and repair" if repair else "")
        + ": "
        + "; ".join(f"{lab} {lo:.4f}" for lo, lab, _, _ in results)
        + f"; chosen: {label}"
    ]
    return WidthPlan(remove, groups, loss, measured, notes)


def _uniform_label(ir: ModelIR, costs: list[FamilyCost], pos: dict[str, int]) -> str:
    """``mlp.channels 224/1536, attn.kv_groups 0/3``: groups removed per family of each kind."""
    fams = ir.channel_groups()
    seen: dict[str, str] = {}
    for fc in costs:
        fam = fams[fc.family][1]
        name = fc.family.rsplit(".", 2)[-2:]
        seen.setdefault(".".join(name) + f"/{fam.count}", f"{fc.ks[pos[fc.family]]}")
    return ", ".join(f"{key.split('/')[0]} {k}/{key.split('/')[1]}" for key, k in seen.items())


def _plan_uniform_measured(
    ctx: Any,
    runner: Any,
    shapes: list[FamilyCost],
    options: list[dict[str, int]],
    repair: bool,
    round_to: int,
) -> WidthPlan:
    """The least uniform widths that meet the budget, each measured cut in place; the lowest loss wins."""
    ir: ModelIR = ctx.ir
    head = f"width planner (uniform allocation, round to {round_to} channels): "
    if len(options) == 1:
        remove, groups, _ = _to_plan(ir, shapes, options[0])
        note = head + f"one least uniform width meets the budget ({_uniform_label(ir, shapes, options[0])})"
        return WidthPlan(remove, groups, 0.0, {}, [note])
    losses = measure_uniform(ctx, runner, shapes, options, repair=repair)
    j = min(range(len(options)), key=lambda i: losses[i])
    remove, groups, _ = _to_plan(ir, shapes, options[j])
    note = head + (
        f"{len(options)} least uniform widths meet the budget; each cut in place"
        + (" with its least-squares refit" if repair else "")
        + f", calibration loss increase over {runner.current_loss:.4f} on {runner.windows.numel()} tokens: "
        + "; ".join(
            f"{_uniform_label(ir, shapes, p)} {lo:+.4f}" for p, lo in zip(options, losses, strict=True)
        )
        + f"; chosen: {_uniform_label(ir, shapes, options[j])}"
    )
    return WidthPlan(remove, groups, losses[j], {}, [note])


def _plan_mixed(
    ctx: Any, runner: Any, shapes: list[FamilyCost], target: int, repair: bool, round_to: int
) -> WidthPlan:
    """Candidates under the same budget, applied to a copy and measured; the lowest calibration loss wins.
    Candidates it cannot win with are left out before they are measured.

    Candidates: depth only (prunekit's depth choice: the least angular-distance span that meets the budget)
    and every split "span of n blocks + the least uniform width for the rest of the budget" (n = 0: width
    only). Each split's width part alone is first measured cut in place on the trial windows (a handful of
    trials); that increase bounds the split's from below (removing blocks as well does not lower the
    loss). Depth only is measured first, then the splits from the lowest bound up, and a split whose bound
    already reaches the best measured increase is not measured (no copy, surgery or refit).
    """
    import copy

    from ..ir.plan import PrunePlan
    from ..surgery.apply import apply_plan

    ir: ModelIR = ctx.ir
    units = ir.units()
    describable = _describable(ctx)
    depth: tuple[str, list[str]] | None = None
    splits: list[tuple[float, str, list[str], dict[str, list[int]]]] = []
    for span in [[], *_depth_spans(ctx, target)]:
        got = sum(units[u].params for u in span)
        if got >= target:
            depth = (f"depth only ({len(span)} blocks)", span)
            continue
        gone = set(span)
        rest = [fc for fc in shapes if not any(fc.sublayer.startswith(b + ".") for b in gone)]
        try:
            options, _more = uniform_frontier(rest, ir, target - got, describable)
        except PlanError:
            continue
        losses = measure_uniform(ctx, runner, rest, options, repair=repair, what=f"mixed, {len(span)} blocks")
        j = min(range(len(options)), key=lambda i: losses[i])
        _, groups, _ = _to_plan(ir, rest, options[j])
        label = f"{len(span)} blocks + uniform width" if span else "uniform width only"
        splits.append((losses[j], label, span, groups))
    if depth is None and not splits:
        raise PlanError(
            f"the budget ({target} parameters) cannot be met by blocks or uniform widths; lower --ratio"
        )
    windows = ctx.calibration.windows
    select = windows[-min(8, windows.shape[0]) :]
    fp = ctx.fingerprint(ir)

    def measure(remove: list[str], groups: dict[str, list[int]]) -> float:
        plan = PrunePlan(
            fingerprint=fp, remove=remove, remove_groups=groups, repair="lsq" if repair else "none"
        )
        trial = copy.deepcopy(ctx.model)
        apply_plan(trial, plan, adapter=ctx.adapter, repair_windows=windows)
        with torch.inference_mode():
            loss = float(trial(input_ids=select, labels=select, use_cache=False).loss)
        del trial
        return loss

    with torch.inference_mode():
        base_sel = float(ctx.model(input_ids=select, labels=select, use_cache=False).loss)
    results: list[tuple[float, str, list[str], dict[str, list[int]]]] = []
    skipped: list[tuple[str, float]] = []
    best = math.inf
    if depth is not None:
        loss = measure(depth[1], {})
        results.append((loss, depth[0], depth[1], {}))
        best = loss - base_sel
        log.info("mixed candidate %s: calibration loss %.4f", depth[0], loss)
    for bound, label, remove, groups in sorted(splits, key=lambda c: c[0]):
        if bound >= best:
            skipped.append((label, bound))
            log.info("mixed candidate %s left out: its width part alone costs %+.4f", label, bound)
            continue
        loss = measure(remove, groups)
        results.append((loss, label, remove, groups))
        best = min(best, loss - base_sel)
        log.info("mixed candidate %s: calibration loss %.4f", label, loss)
    loss, label, remove, groups = min(results, key=lambda r: r[0])
    notes = [
        f"mixed planner (uniform widths, round to {round_to} channels): candidates measured on the last "
        f"{select.shape[0]} calibration windows after surgery"
        + (" and repair" if repair else "")
        + f" (unpruned {base_sel:.4f}): "
        + "; ".join(f"{lab} {lo:.4f}" for lo, lab, _, _ in results)
        + (
            "; left out unmeasured, their width part alone (cut in place on "
            f"{runner.windows.numel()} trial tokens) already costs at least the best increase "
            f"({best:+.4f}): " + "; ".join(f"{lab} {b:+.4f}" for lab, b in skipped)
            if skipped
            else ""
        )
        + f"; chosen: {label}"
    ]
    return WidthPlan(remove, groups, loss, {}, notes)


def _without_whole(fc: FamilyCost) -> FamilyCost:
    """The same cost curve without the "remove the whole branch" level (width-only moves)."""
    keep = [i for i, k in enumerate(fc.ks) if k != fc.count]
    return FamilyCost(
        fc.family,
        fc.sublayer,
        fc.order,
        [fc.ks[i] for i in keep],
        [fc.params[i] for i in keep],
        [fc.cost[i] for i in keep],
        fc.count,
    )


def _describable(ctx: Any) -> Callable[[dict[str, int]], bool]:
    import copy

    from ..surgery.width import config_valid

    text_config = getattr(ctx.adapter, "text_config", None)
    config = text_config(ctx.model) if text_config else ctx.model.config

    def check(fields: dict[str, int]) -> bool:
        probe = copy.deepcopy(config)
        for name, value in fields.items():
            setattr(probe, name, value)
        return config_valid(probe)

    return check


def plan_width(
    ctx: Any,
    metric: Any,
    *,
    target: int,
    mixed: bool,
    repair: bool,
    round_to: int,
    allocation: Allocation = "global",
    probe_fractions: tuple[float, ...] = (),
    estimate: bool = False,
) -> WidthPlan:
    """Choose groups (and, when ``mixed``, whole sublayers/blocks) to remove ``target`` parameters.

    ``ctx`` is a :class:`~prunekit_core.scoring.calibration.ScoringContext`, ``metric`` a
    :class:`~prunekit_core.scoring.metrics.ChannelMetric` that orders the groups inside each family.
    Uniform and mixed plans measure their few least uniform widths cut in place; ``estimate`` chooses them
    from the cost model instead (a removal trial of every sublayer, and for mixed also the one-scale and
    global-width candidates, every candidate measured after surgery): the planner before 2026-12, kept
    for comparison (tests, ``bench/width_pruning.py --timing``).
    """
    ir: ModelIR = ctx.ir
    # the cost model reads a family's cut off its sublayer's output projection; families without one
    # among their members (the channels inside fused experts) get cost curves measured by removal trials;
    # routed families (experts) are planned at --granularity expert
    fams = width_families(ir)
    if not fams:
        where = f"in tower(s) {', '.join(ir.scope)} (--scope)" if ir.scope else "for this model"
        stages = sorted(ir.stage_channel_groups())
        narrow = (
            f" Its conv stages' channels ({', '.join(stages[:4])}) are narrowed by a plan that names them "
            "(prunekit prune --plan PLAN.json with remove_groups; `prunekit score --metric magnitude` ranks "
            "them); the width planner does not choose them."
            if stages
            else ""
        )
        raise PlanError(
            f"the {ir.adapter} plugin declares no channel groups {where}: width pruning needs them. "
            "Use --granularity block or sublayer" + (", or another --scope." if ir.scope else ".") + narrow
        )
    if mixed and ctx.streaming:
        raise PlanError(
            "the mixed planner with a channel metric measures its candidate plans on pruned copies of the "
            "whole model, which streaming does not hold: use --granularity width (uniform or global "
            "allocation), or a block/sublayer metric at --granularity mixed, or drop --streaming"
        )
    if mixed:
        allocation = "global"  # the one-scale candidate; the mixed planner also tries uniform width splits
    scores = ctx.group_scores(metric)
    orders = {
        fid: [int(i) for i in torch.argsort(s, stable=True)] for fid, s in scores.items() if fid in fams
    }
    gram_orders = {fid: o for fid, o in orders.items() if out_member(*fams[fid]) is not None}
    trial_only = sorted(set(orders) - set(gram_orders))
    if trial_only and ctx.streaming:
        raise PlanError(
            f"families {', '.join(trial_only[:3])}{' ...' if len(trial_only) > 3 else ''} have no output "
            "projection among their members (channels inside fused experts): their cost is measured by "
            "zeroing groups in place, which needs the whole model. With --streaming use a metric that does "
            "not score them (wanda, obs), or drop --streaming"
        )
    runner = ctx.trials()
    base = runner.base_loss
    # uniform and mixed plans with every family cut off its output projection: the few least uniform widths
    # are measured cut in place (a handful of trials), not estimated from a removal trial of every sublayer
    fast = not (estimate or ctx.streaming or trial_only or probe_fractions)
    if fast and (mixed or allocation == "uniform"):
        shapes = shape_costs(fams, orders, round_to)
        try:
            if mixed:
                return _plan_mixed(ctx, runner, shapes, target, repair, round_to)
            options, more = uniform_frontier(shapes, ir, target, _describable(ctx))
        except PlanError as exc:  # name what the metric left unplanned, as the cost-model path does
            raise PlanError(f"{exc}{_unplanned_hint(ir, orders, metric)}") from exc
        if not more:
            return _plan_uniform_measured(ctx, runner, shapes, options, repair, round_to)
    subs_with = {fams[fid][0].id for fid in orders}
    per_sub: dict[str, int] = {}
    for sub, _ in ir.channel_groups().values():  # a family whose full cut removes its sublayer: alone there
        per_sub[sub.id] = per_sub.get(sub.id, 0) + 1
    measured: dict[str, float] = {}
    trial_subs = [s for s in ir.sublayers() if s.removable and (s.id in subs_with or mixed)]
    for i, sub in enumerate(trial_subs, 1):
        measured[sub.id] = runner.loss([sub.id]) - base
        log.info("width: sublayer removal trial %d/%d (%s)", i, len(trial_subs), sub.id)
    curves = ctx.calibration.observed.get(curve_key(metric.name, repair))  # a streaming pass's, per block
    stats = ctx.width_stats() if curves is None else WidthStats()
    probes = (
        _probe(ctx, runner, gram_orders, stats, repair=repair, round_to=round_to, fractions=probe_fractions)
        if probe_fractions
        else {}
    )
    single = {fid for fid in gram_orders if per_sub[fams[fid][0].id] == 1 and fams[fid][0].removable}
    costs = []
    for fid in orders:
        if fid not in gram_orders:
            costs.append(trial_costs(ctx.model, runner, fid, *fams[fid], orders[fid], round_to=round_to))
            continue
        costs += family_costs(
            ctx.model,
            ir,
            {fid: orders[fid]},
            stats,
            measured,
            repair=repair,
            round_to=round_to,
            allow_all=mixed and fid in single,
            probes=probes,
            curves=curves,
        )
    if mixed:  # sublayers that cannot go all the way through one family: whole-branch moves
        covered = {fams[f][0].id for f in single}
        for sub in ir.sublayers():
            if sub.removable and sub.id not in covered:
                costs.append(
                    FamilyCost(sub.id, sub.id, [], [0, 1], [0, sub.params], [0.0, measured[sub.id]], count=1)
                )
    try:
        if allocation == "uniform":
            pos = allocate_uniform(costs, ir, target, describable=_describable(ctx))
        else:
            pos = allocate_global(costs, target)
    except PlanError as exc:
        raise PlanError(f"{exc}{_unplanned_hint(ir, orders, metric)}") from exc
    remove, remove_groups, est = _to_plan(ir, costs, pos)
    notes = [
        f"{'mixed' if mixed else 'width'} planner ({allocation} allocation, round to {round_to} channels): "
        f"estimated calibration loss increase {est:.4f} over {base:.4f}; "
        f"{runner.trials} trials on {runner.windows.numel()} tokens calibrate the cost model (each "
        "sublayer removed"
        + (f"; its groups cut at {', '.join(f'{f:.0%}' for f in probe_fractions)}" if probe_fractions else "")
        + ")",
    ]
    if mixed:
        return _choose_mixed(ctx, costs, (remove, remove_groups, est), target, repair, measured, notes)
    return WidthPlan(remove, remove_groups, est, measured, notes)
