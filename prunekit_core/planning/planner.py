"""Planning to a parameter budget.

``ratio`` is a fraction of the parameters inside blocks (embeddings, final norm and head excluded): a plan
removes *at least* ``ceil(ratio * block_params)`` parameters.

Two planners:

- ``rank``: score once with any metric, remove the least important units until the budget is met (span
  metrics: the least important span of the fewest blocks that meets the budget).
- ``greedy``: re-score after every removal with a trial metric (NRI or SLEB). Each round picks the unit with
  the lowest estimated cost of finishing the budget: its measured loss increase if it finishes the budget
  alone, otherwise its loss increase per parameter times the parameters still to remove. After the first
  full round only a shortlist of the best candidates is re-measured (``shortlist``; ``None`` = all).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, cast

import torch
from torch import nn

from ..adapters.base import ArchitectureAdapter
from ..ir.defaults import (
    BEST,
    BEST_EXPERT,
    BEST_SUBLAYER,
    BEST_WIDTH,
    DEFAULT_CANDIDATES,
    DEFAULT_ROUND_TO,
    GRANULARITIES,
    REPAIRS,
    Candidate,
    Granularity,
    PlannerName,
    RepairName,
    check_ratio,
)
from ..ir.errors import PlanError
from ..ir.model import Block, ModelIR, Sublayer
from ..ir.plan import PrunePlan
from ..registry.plugins import get_metric, metrics, select_adapter
from ..scoring.calibration import Calibration, ScoringContext, calibrate
from ..scoring.metrics import ChannelMetric, ExpertMetric, ImportanceMetric, Scores
from ..surgery.apply import removed_params, resolve_removals

log = logging.getLogger(__name__)


def budget_params(ir: ModelIR, ratio: float) -> int:
    check_ratio(ratio)
    return math.ceil(ratio * ir.block_params())


def budget_ceiling(ir: ModelIR, granularity: str) -> int | None:
    """At most how many block parameters a plan at ``granularity`` can remove from ``ir``'s towers in scope,
    from parameter counts alone (no calibration): the removable units, less what every tower must keep (a
    tower keeps at least one block, and a block at least one sublayer when only sublayers go). An upper
    bound: a budget above it is impossible. ``None`` for width and expert granularity (their ceilings
    depend on channel rounding and router top-k; their planners check them)."""
    if granularity not in ("block", "sublayer", "mixed"):
        return None
    total = 0
    for tower in ir.towers:
        if not ir.in_scope(tower.name) or not tower.blocks:
            continue
        whole = [b for b in tower.blocks if b.removable]
        if granularity == "block":
            total += sum(b.params for b in whole)
            if whole and len(whole) == len(tower.blocks):
                total -= min(b.params for b in whole)
            continue
        # sublayer / mixed: a block whose sublayers all go is removed whole (all its parameters); the
        # sublayers of a block that is not removable are not candidates either (candidates_for)
        total += sum(b.params for b in whole)
        if whole and len(whole) == len(tower.blocks):
            total -= (
                min(s.params for b in whole for s in b.sublayers) if any(b.sublayers for b in whole) else 0
            )
    return total


def check_budget(ir: ModelIR, ratio: float, granularity: str) -> None:
    """Raise :class:`PlanError` if ``ratio`` of ``ir``'s block parameters cannot be removed at
    ``granularity`` (:func:`budget_ceiling`): decided from parameter counts, before any calibration."""
    ceiling = budget_ceiling(ir, granularity)
    if ceiling is None:
        return
    target = budget_params(ir, ratio)
    if target > ceiling:
        base = ir.block_params()
        if ceiling == 0:
            raise PlanError(
                f"nothing can be removed at granularity {granularity}: no block in scope is removable without "
                "removing every block of its tower; choose another --granularity or --scope"
            )
        most = math.floor(ceiling / base * 1000) / 1000 or float(f"{ceiling / base:.2g}")
        raise PlanError(
            f"--ratio {ratio:g} asks for {target:,} of the {base:,} block parameters, but at most {ceiling:,} "
            f"can be removed at granularity {granularity} without removing every block of a tower (each keeps "
            "at least one block"
            + ("" if granularity == "block" else ", and a block that stays keeps a sublayer")
            + f"): lower --ratio to {most:g} or less"
        )


def candidates_for(
    ir: ModelIR, granularity: Granularity, removed: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Units a plan at ``granularity`` may remove next, given what is already removed."""
    if granularity not in GRANULARITIES or granularity in ("width", "expert"):
        raise PlanError(f"unknown granularity {granularity!r}; choose one of block, sublayer, mixed")
    out: list[str] = []
    for b in ir.blocks():
        if b.id in removed or not b.removable:
            continue
        live = [s for s in b.sublayers if s.id not in removed and s.removable]
        untouched = len(live) == len(b.sublayers)
        if granularity in ("block", "mixed") and untouched:
            out.append(b.id)
        if granularity in ("sublayer", "mixed"):
            out.extend(s.id for s in live)
    return out


def _removed_params(ir: ModelIR, remove: list[str]) -> int:
    return removed_params(ir, resolve_removals(ir, remove))


def _would_empty_a_tower(ir: ModelIR, remove: list[str]) -> bool:
    try:
        resolve_removals(ir, remove)
    except PlanError:
        return True
    return False


def uses_width(metric: str, granularity: str) -> bool:
    """Whether a (metric, granularity) pair runs the width/mixed planner over channel groups."""
    return granularity == "width" or (
        granularity == "mixed" and isinstance(get_metric(metric), ChannelMetric)
    )


def _check_metric_fits(metric: ImportanceMetric, granularity: Granularity) -> None:
    channel = isinstance(metric, ChannelMetric)
    if granularity == "expert" and not channel:
        names = ", ".join(sorted(n for n, m in metrics().items() if isinstance(m, ChannelMetric)))
        raise PlanError(f"metric {metric.name!r} does not score experts; for experts use one of: {names}")
    if isinstance(metric, ExpertMetric) and granularity != "expert":
        raise PlanError(f"metric {metric.name!r} scores experts; use --granularity expert")
    if granularity == "expert":
        return
    if granularity == "width" and not channel:
        names = ", ".join(sorted(n for n, m in metrics().items() if isinstance(m, ChannelMetric)))
        raise PlanError(
            f"metric {metric.name!r} does not score channel groups; for width use one of: {names}"
        )
    if channel and granularity not in ("width", "mixed"):
        raise PlanError(
            f"metric {metric.name!r} scores channel groups; use --granularity width or mixed "
            "(or a block/sublayer metric such as angular or sublayer_drop)"
        )
    if channel or "trials" in metric.needs:
        return
    if metric.unit in ("block", "span") and granularity != "block":
        raise PlanError(
            f"metric {metric.name!r} scores blocks; use --granularity block (or a trial metric: nri)"
        )
    if metric.unit == "sublayer" and granularity == "block":
        raise PlanError(
            f"metric {metric.name!r} scores sublayers; use --granularity sublayer or mixed (or metric bi for blocks)"
        )


def resolve_method(
    metric: str | None = None,
    planner: str | None = None,
    granularity: str | None = None,
    repair: str | None = None,
) -> tuple[str, PlannerName, Granularity, RepairName]:
    """Fill unset planning choices and validate the combination (the CLI and the API share this).

    (:func:`plan_pruning` runs the self-validating default instead where :func:`self_validating` says so.)
    With no metric named, every unset choice comes from :data:`BEST`, except the metric of a granularity
    BEST's metric does not score (sublayer: :data:`BEST_SUBLAYER`; width and mixed: :data:`BEST_WIDTH`;
    expert: :data:`BEST_EXPERT`). With a metric named, it runs as
    published: ``greedy`` for trial metrics and ``rank`` otherwise, the granularity the metric scores
    (:data:`BEST`'s for trial metrics), and no repair.
    """
    if metric is None and granularity == "expert":
        metric = BEST_EXPERT["metric"]
    if metric is None and granularity in ("width", "mixed"):
        metric = BEST_WIDTH["metric"]
        repair = repair or BEST_WIDTH["repair"]
    if (
        metric is None and granularity == "sublayer"
    ):  # BEST's metric scores blocks: take one that scores sublayers
        metric = BEST_SUBLAYER["metric"]
        repair = repair or BEST_SUBLAYER["repair"]
    if metric is None:
        metric = BEST["metric"]
        planner = planner or BEST["planner"]
        granularity = granularity or BEST["granularity"]
        repair = repair or BEST.get("repair", "none")
    m = get_metric(metric)
    trials = "trials" in m.needs
    if isinstance(m, ChannelMetric) and granularity is None:
        granularity = "expert" if isinstance(m, ExpertMetric) else "width"
    planner = planner or ("greedy" if trials else "rank")
    if granularity is None:
        granularity = BEST["granularity"] if trials else ("sublayer" if m.unit == "sublayer" else "block")
    repair = repair or "none"
    if repair not in REPAIRS:
        raise PlanError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")
    if planner not in ("rank", "greedy"):
        raise PlanError(f"unknown planner {planner!r}; choose rank or greedy")
    if planner == "greedy" and not trials:
        raise PlanError(
            f"the greedy planner re-measures after each removal: use a trial metric (nri, sleb), not {metric!r}"
        )
    if granularity not in GRANULARITIES:
        raise PlanError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    _check_metric_fits(m, granularity)
    # each choice was checked against its literals above
    return metric, cast(PlannerName, planner), granularity, repair


def plan_pruning(
    model: nn.Module,
    calibration: Calibration,
    *,
    ratio: float,
    metric: str | None = None,
    granularity: Granularity | None = None,
    planner: PlannerName | None = None,
    adapter: ArchitectureAdapter | None = None,
    shortlist: int | None = 8,
    trial_windows: int = 8,
    loss_stride: int = 4,
    on_step: Callable[[str], None] | None = None,
    repair: RepairName | None = None,
    round_to: int = DEFAULT_ROUND_TO,
    width_allocation: Literal["global", "uniform"] = "uniform",
    expert_allocation: Literal["global", "uniform"] = "uniform",
    top_k_policy: Literal["error", "clamp"] = "error",
    scope: Sequence[str] | None = None,
    repair_optional: bool = False,
    naive_trials: bool = False,
    heldout: torch.Tensor | None = None,
    heldout_split: str | None = None,
    repair_windows: torch.Tensor | None = None,
    candidates: Sequence[Candidate] | None = None,
) -> PrunePlan:
    """Make a :class:`PrunePlan` removing at least ``ratio`` of the block parameters of ``model``.

    **The self-validating default.** With no metric named (and ``planner`` and ``granularity`` unset, or
    rank and block), every candidate of ``candidates`` (default
    :data:`~prunekit_core.ir.defaults.DEFAULT_CANDIDATES`: ShortGPT BI, the angular span and a mixed
    sublayer-drop plan, each with and without the least-squares repair) is planned at the budget from the
    one calibration pass, applied to a copy of the model with its repair (fitted on ``repair_windows``,
    default the calibration windows), and measured by its language-model loss on ``heldout`` windows; the
    lowest loss wins (:mod:`prunekit_core.planning.select`). ``heldout`` must be disjoint from the
    calibration windows (more windows of the calibration text; ``heldout_split`` says how they were cut,
    for the plan). Unset, the last quarter of the calibration windows (at most 8) is held out and the
    others are calibrated again: apply such a plan with ``repair_windows=windows[:plan.selection.fit_windows]``
    to get the model that was measured. The plan lists every candidate (``plan.candidates``, with its
    loss) and why the winner won (``plan.selection``). ``repair`` given keeps only candidates with that
    repair, ``granularity="block"`` only block candidates. A streaming calibration cannot copy the model:
    there the default is :data:`BEST`.

    ``scope`` names the towers the plan may touch (``["vision"]``, ``["text"]``; default all): the budget
    is then ``ratio`` of those towers' block parameters. The plan's notes give the budget per tower.
    A least-squares repair that came from a default (``repair=None``, or ``repair_optional=True`` when the
    caller resolved the default itself) is dropped, with a note, for a plan that removes units of a tower
    read from its hidden states (a vision tower); asked for explicitly, it is an error there.

    Otherwise unset choices are filled by :func:`resolve_method`: with no metric named, the granularity's
    own default metric for sublayer, width, mixed and expert plans (:data:`BEST` for a streaming block
    plan), the metric's own setting (as published, no repair) otherwise. A plan with ``repair="lsq"`` needs the
    calibration windows again when it is applied (``apply_plan(model, plan, repair_windows=...)``).

    ``granularity="expert"`` reads ``ratio`` differently: at least ``ratio`` of the experts of every MoE
    layer go (``expert_allocation="uniform"``), or that many in total, spread over layers by the metric's
    share of each layer's importance (``"global"``: per-layer counts); every layer keeps ``top_k`` experts
    unless ``top_k_policy="clamp"``.

    ``naive_trials`` measures removal trials with a full model evaluation each
    (:class:`~prunekit_core.scoring.calibration.NaiveTrialRunner`): the reference the cached trials are checked and
    benchmarked against; same plan, more block forwards.
    """
    if self_validating(metric, planner, granularity) and not _streamed(calibration):
        return _plan_default(
            model, calibration, ratio=ratio, granularity=granularity, repair=None if repair_optional else repair,
            adapter=adapter or select_adapter(model), heldout=heldout, heldout_split=heldout_split,
            repair_windows=repair_windows, candidates=candidates, scope=scope, round_to=round_to,
            on_step=on_step,
        )  # fmt: skip
    explicit_lsq = repair == "lsq" and not repair_optional
    metric, planner, granularity, repair = resolve_method(metric, planner, granularity, repair)
    adapter = adapter or select_adapter(model)
    full_ir = adapter.build_ir(model)
    ir = full_ir.restricted(list(scope) if scope else None)
    if not uses_width(metric, granularity):  # before any scoring: parameter counts decide it
        check_budget(ir, ratio, granularity)
    plan = _plan_in_scope(
        model, calibration, ir, adapter, ratio, metric, granularity, planner, shortlist, trial_windows,
        loss_stride, on_step, repair, round_to, width_allocation, expert_allocation, top_k_policy, naive_trials,
    )  # fmt: skip
    notes = [*plan.notes, *budget_notes(full_ir, plan)]
    update: dict[str, object] = {"notes": notes}
    unrepaired = _unrepairable_towers(full_ir, plan)
    if plan.repair != "none" and unrepaired:
        if explicit_lsq:
            raise PlanError(
                f"repair=lsq was asked for, but the plan removes units of tower(s) {unrepaired}, which are read "
                "from their hidden states and cannot be repaired by least squares. Use repair='none' "
                "(--repair none), or restrict the plan to the text tower (--scope text)"
            )
        update["repair"] = "none"
        notes.append(f"no least-squares repair: the plan removes units of tower(s) {unrepaired}")
    return plan.model_copy(update=update)


def self_validating(metric: str | None, planner: str | None, granularity: str | None) -> bool:
    """Whether these choices run the self-validating default (no metric named; rank, block or unset)."""
    return metric is None and planner in (None, "rank") and granularity in (None, "block")


def _streamed(calibration: Calibration) -> bool:
    """A streaming pass's calibration: its model is a skeleton whose weights stay on disk."""
    return calibration.trial_factory is not None or calibration.weights_digest is not None


def _plan_default(
    model: nn.Module,
    calibration: Calibration,
    *,
    ratio: float,
    granularity: Granularity | None,
    repair: RepairName | None,
    adapter: ArchitectureAdapter,
    heldout: torch.Tensor | None,
    heldout_split: str | None,
    repair_windows: torch.Tensor | None,
    candidates: Sequence[Candidate] | None,
    scope: Sequence[str] | None,
    round_to: int,
    on_step: Callable[[str], None] | None,
) -> PrunePlan:
    """The self-validating default (:func:`plan_pruning`, :mod:`prunekit_core.planning.select`)."""
    from .select import Planned, compare, heldout_count, selection

    t0 = time.perf_counter()
    pool = list(DEFAULT_CANDIDATES if candidates is None else candidates)
    if granularity is not None:
        pool = [c for c in pool if c.granularity == granularity]
    if repair is not None:
        named = [c for c in pool if c.repair == repair]
        # a repair no candidate uses (refit): each candidate plan with that repair instead
        pool = named or list(dict.fromkeys(c._replace(repair=repair) for c in pool))
    if not pool:
        raise PlanError(
            f"no candidate of the default method has granularity {granularity or 'any'} and repair "
            f"{repair or 'any'}: name a method (--metric bi, --metric angular) instead"
        )
    full_ir = adapter.build_ir(model)
    windows, n = calibration.windows, int(calibration.windows.shape[0])
    if heldout is None:
        k = heldout_count(n)
        fit, held = windows[: n - k], windows[n - k :]
        held_inputs = {key: v[n - k :] for key, v in calibration.inputs.items()}
        # the given pass read the held-out windows too: score on the others only
        cal = calibrate(
            model, full_ir, fit, inputs={key: v[: n - k] for key, v in calibration.inputs.items()}
        )
        repair_windows = fit if repair_windows is None else repair_windows[: n - k]
        split = heldout_split or (
            f"the last {k} of the {n} calibration windows; the first {n - k} scored the units and fitted the "
            f"repair (apply the plan with repair_windows=windows[:{n - k}] for the model measured here)"
        )
    else:
        held, held_inputs = adapter.calibration_inputs(model, heldout)
        cal = (
            calibration
            if calibration.towers
            else calibrate(model, full_ir, windows, inputs=calibration.inputs)
        )
        repair_windows = windows if repair_windows is None else repair_windows
        split = heldout_split or f"{heldout.shape[0]} windows given apart from the {n} calibration windows"
    planned: list[Planned] = []
    for c in pool:
        try:
            p = plan_pruning(
                model, cal, ratio=ratio, metric=c.metric, granularity=c.granularity, planner="rank",
                adapter=adapter, repair=c.repair, repair_optional=repair is None, scope=scope, round_to=round_to,
            )  # fmt: skip
            planned.append(Planned(c, p))
        except PlanError as exc:  # e.g. a granularity that cannot meet this budget
            planned.append(Planned(c, None, str(exc)))
    rows, best = compare(
        model,
        planned,
        adapter=adapter,
        repair_windows=repair_windows,
        heldout=held,
        heldout_inputs=held_inputs,
        on_step=on_step,
    )
    chosen = planned[best].plan
    assert chosen is not None  # compare picks a measured candidate
    sel = selection(
        rows,
        best,
        heldout=heldout if heldout is not None else held,
        fit_windows=int(cal.windows.shape[0]),
        split=split,
    )
    notes = [
        *chosen.notes,
        f"default method: {sel.reason}",
        f"held out: {split}",
        f"comparing {len(rows)} candidates took {time.perf_counter() - t0:.1f} s",
    ]
    return chosen.model_copy(update={"candidates": rows, "selection": sel, "notes": notes})


def _unrepairable_towers(ir: ModelIR, plan: PrunePlan) -> list[str]:
    """Towers without a final norm (read from hidden states) in which the plan removes whole units."""
    return [
        t.name
        for t in ir.towers
        if t.final_norm is None
        and any(u == b.id or u.startswith(b.id + ".") for u in plan.remove for b in t.blocks)
    ]


def budget_by_tower(ir: ModelIR, plan: PrunePlan) -> dict[str, tuple[int, int]]:
    """Tower name -> (parameters the plan removes there, the tower's block parameters), for towers with
    blocks. Whole units count their parameters, narrowed families their removed groups (narrowed stages are
    not in any block budget)."""
    from ..surgery.width import resolve_width

    units = ir.units()
    resolved = resolve_removals(ir, plan.remove) if plan.remove else None
    removed: dict[str, int] = {t.name: 0 for t in ir.towers if t.blocks}
    tower_of = {b.id: t.name for t in ir.towers for b in t.blocks}
    for uid in (resolved.blocks | resolved.sublayers) if resolved else ():
        removed[tower_of.get(uid) or tower_of[uid.rsplit(".", 1)[0]]] += units[uid].params
    whole = (resolved.blocks | resolved.sublayers) if resolved else frozenset()
    for cut in resolve_width(
        ir, plan.remove_groups, removed_units=whole, top_k_policy=plan.top_k_policy
    ).values():
        if cut.sublayer.id in {st.id for st in ir.stages()}:
            continue  # a narrowed stage (conv neck, projector): outside the block budget, like embeddings
        block = next(b for b in ir.blocks() if any(s.id == cut.sublayer.id for s in b.sublayers))
        removed[tower_of[block.id]] += cut.removed_params
    return {t.name: (removed[t.name], sum(b.params for b in t.blocks)) for t in ir.towers if t.blocks}


def budget_notes(ir: ModelIR, plan: PrunePlan) -> list[str]:
    """One note per tower of a multi-tower model: what the plan removes there (empty for one tower)."""
    per = budget_by_tower(ir, plan)
    if len(per) < 2:
        return []
    return [
        f"tower {name}: removes {gone} of {total} block parameters ({gone / total:.1%})"
        for name, (gone, total) in per.items()
    ]


def _plan_in_scope(
    model: nn.Module,
    calibration: Calibration,
    ir: ModelIR,
    adapter: ArchitectureAdapter,
    ratio: float,
    metric: str,
    granularity: Granularity,
    planner: PlannerName,
    shortlist: int | None,
    trial_windows: int,
    loss_stride: int,
    on_step: Callable[[str], None] | None,
    repair: RepairName,
    round_to: int,
    width_allocation: Literal["global", "uniform"],
    expert_allocation: Literal["global", "uniform"],
    top_k_policy: Literal["error", "clamp"],
    naive_trials: bool,
) -> PrunePlan:
    if granularity == "expert":
        ctx = ScoringContext(model=model, adapter=adapter, ir=ir, calibration=calibration)
        # resolve_method checked that an expert granularity comes with an expert (channel) metric
        expert_metric = cast(ChannelMetric, get_metric(metric))
        return plan_experts(ctx, expert_metric, ratio, expert_allocation, top_k_policy)
    target = budget_params(ir, ratio)
    m = get_metric(metric)
    ctx = ScoringContext(
        model=model,
        adapter=adapter,
        ir=ir,
        calibration=calibration,
        trial_windows=trial_windows,
        loss_stride=loss_stride,
        naive_trials=naive_trials,
    )
    t0 = time.perf_counter()
    if uses_width(metric, granularity):
        return _plan_width(
            ctx,
            cast(ChannelMetric, m),  # a width plan's metric is a channel metric (_check_metric_fits)
            granularity,
            target,
            ratio,
            repair,
            round_to,
            width_allocation,
            t0,
        )
    if planner == "rank":
        remove, scores = _plan_rank(ctx, m, granularity, target)
    else:
        remove, scores = _plan_greedy(ctx, m, granularity, target, shortlist, on_step)
    removed = _removed_params(ir, remove)
    notes = [
        f"budget: at least {target} of {ir.block_params()} block parameters (embeddings and head excluded)",
        f"planning took {time.perf_counter() - t0:.1f} s on {calibration.tokens} calibration tokens",
    ]
    if ctx._trials is not None:
        notes.append(
            f"{ctx._trials.trials} removal trials on {ctx._trials.windows.numel()} tokens, "
            f"{ctx._trials.block_forwards} block forwards"
        )
    return PrunePlan(
        fingerprint=ctx.fingerprint(ir),
        remove=remove,
        method=f"{planner}:{metric}",
        granularity=granularity,
        target_ratio=ratio,
        repair=repair,
        removed_params=removed,
        block_params=ir.block_params(),
        scores=scores,
        notes=notes,
    )


def _plan_width(
    ctx: ScoringContext,
    m: ChannelMetric,
    granularity: Granularity,
    target: int,
    ratio: float,
    repair: RepairName,
    round_to: int,
    allocation: Literal["global", "uniform"],
    t0: float,
) -> PrunePlan:
    from ..surgery.width import resolve_width, width_is_uniform, width_removed_params
    from .width import plan_width

    ir = ctx.ir
    wp = plan_width(
        ctx,
        m,
        target=target,
        mixed=granularity == "mixed",
        repair=repair != "none",
        round_to=round_to,
        allocation=allocation,
    )
    resolved = resolve_removals(ir, wp.remove) if wp.remove else None
    whole = (resolved.blocks | resolved.sublayers) if resolved else frozenset()
    cuts = resolve_width(ir, wp.remove_groups, removed_units=whole)
    removed = (removed_params(ir, resolved) if resolved else 0) + width_removed_params(ctx.model, cuts)
    notes = [
        f"budget: at least {target} of {ir.block_params()} block parameters (embeddings and head excluded)",
        *wp.notes,
        f"planning took {time.perf_counter() - t0:.1f} s on {ctx.calibration.tokens} calibration tokens",
    ]
    scores = dict(wp.sublayer_loss)  # measured loss increase of removing each sublayer
    return PrunePlan(
        fingerprint=ctx.fingerprint(ir),
        remove=wp.remove,
        remove_groups=wp.remove_groups,
        width_uniform=width_is_uniform(ir, cuts, whole),
        method=f"{granularity}:{m.name}",
        granularity=granularity,
        target_ratio=ratio,
        repair=repair,
        removed_params=removed,
        block_params=ir.block_params(),
        scores=scores,
        notes=notes,
    )


def _plan_rank(
    ctx: ScoringContext, m: ImportanceMetric, granularity: Granularity, target: int
) -> tuple[list[str], dict[str, float]]:
    ir = ctx.ir
    units = ir.units()
    if m.unit == "span":
        blocks = [b for b in ir.blocks() if b.removable]
        for n in range(1, len(blocks)):
            scores = m.score(ctx, span=n)
            order = [b.id for b in ir.blocks()]
            fits = []
            for start, value in scores.values.items():
                i = order.index(start)
                span_ids = order[i : i + n]
                if (
                    all(units[u].removable for u in span_ids)
                    and sum(units[u].params for u in span_ids) >= target
                ):
                    fits.append((value, span_ids))
            if fits:
                fits.sort(key=lambda f: f[0])
                return fits[0][1], scores.values
        raise PlanError("no span of blocks meets the budget without removing every block; lower --ratio")
    ctx.candidates = candidates_for(ir, granularity)
    scores = m.score(ctx)
    remove: list[str] = []
    for uid, _ in scores.ranked():
        if uid not in candidates_for(ir, granularity, set(remove)):
            continue
        if _would_empty_a_tower(ir, remove + [uid]):
            continue
        remove.append(uid)
        if _removed_params(ir, remove) >= target:
            return remove, scores.values
    raise PlanError(
        f"the budget ({target} parameters) cannot be met without removing every block; lower --ratio"
    )


def _plan_greedy(
    ctx: ScoringContext,
    m: ImportanceMetric,
    granularity: Granularity,
    target: int,
    shortlist: int | None,
    on_step: Callable[[str], None] | None,
) -> tuple[list[str], dict[str, float]]:
    ir = ctx.ir
    units = ir.units()
    runner = ctx.trials()
    remove: list[str] = []
    first_scores: dict[str, float] = {}
    ranking: list[str] | None = None
    # the last removal, reported once the loss after it is known: a lazy runner (streaming) measures that
    # loss in the same pass as the next round of trials, so it is read only once that round's pool is set
    last: tuple[str, float, int, int] | None = None

    def report(after: float) -> None:
        assert last is not None
        unit, before, removed, forwards = last
        msg = (
            f"removed {unit}: loss {before:.4f} -> {after:.4f} ({removed}/{target}); "
            f"{forwards} block forwards so far"
        )
        log.info(msg)
        if on_step:
            on_step(msg)

    while (done := _removed_params(ir, remove)) < target:
        need = target - done
        live = [
            u
            for u in candidates_for(ir, granularity, set(remove))
            if not _would_empty_a_tower(ir, remove + [u])
        ]
        if not live:
            raise PlanError(f"the budget ({target} parameters) cannot be met without removing every block")
        if ranking is not None and shortlist:
            pool = [u for u in ranking if u in live][:shortlist]
            # a unit that alone finishes the budget is always worth measuring at the end
            pool += [u for u in live if u not in pool and _gain(ir, remove, u) >= need][
                : max(0, shortlist // 2)
            ]
        else:
            pool = live
        ctx.candidates = pool
        base = runner.current_loss
        if last is not None:
            report(base)
        scores = _as_losses(m.score(ctx), runner, units, base)
        if not first_scores:
            first_scores = {u: s for u, s in scores.items()}
        cost = {}
        for u, loss in scores.items():
            delta = loss - base
            gain = _gain(ir, remove, u)
            cost[u] = delta if gain >= need else delta * need / max(gain, 1)
        best = min(cost, key=cost.__getitem__)
        # units not measured this round keep their place after the measured ones
        ranking = sorted(cost, key=cost.__getitem__) + [u for u in live if u not in cost]
        remove.append(best)
        runner.commit([best])
        last = (best, base, _removed_params(ir, remove), runner.block_forwards)
    if last is not None:
        report(runner.current_loss)
    return remove, first_scores


def _gain(ir: ModelIR, remove: list[str], unit: str) -> int:
    return _removed_params(ir, remove + [unit]) - _removed_params(ir, remove)


def _as_losses(
    scores: Scores, runner: object, units: Mapping[str, Block | Sublayer], base: float
) -> dict[str, float]:
    """Turn a trial metric's scores back into the loss after removing each unit."""
    if scores.metric == "sleb":
        return dict(scores.values)
    if scores.metric == "nri":
        return {u: base + math.log1p(v * units[u].params) for u, v in scores.values.items()}
    raise PlanError(f"the greedy planner does not know how to read metric {scores.metric!r}")


def plan_experts(
    ctx: ScoringContext,
    metric: ChannelMetric,
    ratio: float,
    allocation: Literal["global", "uniform"] = "uniform",
    top_k_policy: Literal["error", "clamp"] = "error",
) -> PrunePlan:
    """Remove the least important experts: ``ceil(ratio * experts)`` of every MoE layer (uniform), or that
    many in total where each expert's share of its layer's importance is lowest (global)."""
    from ..surgery.width import resolve_width, routed_families, width_is_uniform, width_removed_params

    if not 0.0 < ratio < 1.0:
        raise PlanError(f"--ratio must be strictly between 0 and 1 (a fraction of experts), got {ratio}")
    t0 = time.perf_counter()
    ir = ctx.ir
    routed = routed_families(ir)
    if not routed:
        raise PlanError(
            f"the {ir.adapter} plugin declares no experts for this model: --granularity expert needs a "
            "mixture-of-experts model"
        )
    scores = ctx.group_scores(metric)
    missing = [f for f in routed if f not in scores]
    if missing:
        raise PlanError(
            f"metric {metric.name!r} does not score the experts of {missing[0]}; use an expert metric"
        )
    want = {fid: math.ceil(ratio * fam.count) for fid, (_s, fam) in routed.items()}
    floor = {
        fid: 1 if top_k_policy == "clamp" or fam.top_k is None else fam.top_k.value
        for fid, (_s, fam) in routed.items()
    }
    too_many = [f for f, k in want.items() if routed[f][1].count - k < floor[f]]
    if allocation == "uniform" and too_many:
        fam = routed[too_many[0]][1]
        raise PlanError(
            f"removing {want[too_many[0]]} of {fam.count} experts in {too_many[0]} leaves fewer than the "
            f"{floor[too_many[0]]} its router picks per token (top_k); lower --ratio, or pass --top-k clamp"
        )
    if allocation == "uniform":
        chosen = {
            fid: [int(i) for i in torch.argsort(scores[fid], stable=True)[:k]] for fid, k in want.items()
        }
    elif allocation == "global":
        # each expert's share of its layer's importance: comparable across layers whatever the metric's scale
        pool = []
        for fid in routed:
            s = scores[fid].double().clamp_min(0)
            share = s / s.sum().clamp_min(1e-30)
            pool += [(float(v), fid, i) for i, v in enumerate(share)]
        pool.sort()
        chosen = {fid: [] for fid in routed}
        left = sum(want.values())
        for _v, fid, i in pool:
            if left == 0:
                break
            if routed[fid][1].count - len(chosen[fid]) - 1 >= floor[fid]:
                chosen[fid].append(i)
                left -= 1
        if left:
            raise PlanError(f"--ratio {ratio} asks for more experts than the layers can lose; lower it")
    else:
        raise PlanError(f"unknown expert allocation {allocation!r}; choose uniform or global")
    groups = {fid: sorted(g) for fid, g in chosen.items() if g}
    cuts = resolve_width(ir, groups, top_k_policy=top_k_policy)
    values = {}
    for fid, (sub, _fam) in routed.items():
        ids = {e.router_row: e.id for e in sub.experts if e.router_row is not None}
        values.update({ids.get(i, f"{fid}.{i}"): float(v) for i, v in enumerate(scores[fid])})
    counts = sorted({routed[f][1].count - len(groups.get(f, [])) for f in routed})
    return PrunePlan(
        fingerprint=ctx.fingerprint(ir),
        remove=[],
        remove_groups=groups,
        width_uniform=width_is_uniform(ir, cuts),
        top_k_policy=top_k_policy,
        method=f"expert:{metric.name}",
        granularity="expert",
        target_ratio=ratio,
        removed_params=width_removed_params(ctx.model, cuts),
        block_params=ir.block_params(),
        scores=values,
        notes=[
            f"experts: at least {ratio:g} of the experts of "
            + (
                "every MoE layer"
                if allocation == "uniform"
                else "all MoE layers together (global allocation)"
            )
            + f"; experts left per layer: {', '.join(map(str, counts))}",
            f"planning took {time.perf_counter() - t0:.1f} s on {ctx.calibration.tokens} calibration tokens",
        ],
    )
