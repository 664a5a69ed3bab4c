"""Structural surgery on the IR: remove blocks and residual branches for real.

A branch hung on a residual edge (``x + f(norm(x))``) is removed by replacing the branch with
:class:`RemovedBranch`, a parameter-free module whose output is a zero scalar, and its pre-norm with
``nn.Identity``: ``x + 0`` equals ``x`` exactly, the weights are gone from the state dict, and the branch
costs nothing at run time. A block is removed by deleting it from its ``ModuleList``. The adapter then
updates the config and cache indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.base import ArchitectureAdapter, RemovedBranch, get_module, set_module
from ..ir.errors import PlanError
from ..ir.model import ModelIR, Sublayer
from ..ir.plan import PrunePlan, check_fingerprint, fingerprint
from .refit import RefitStep, stream_refit
from .repair import RepairStep, lsq_repair, refit_narrowed
from .width import apply_width, config_describes_shapes, resolve_width


@dataclass(frozen=True)
class Resolved:
    """A plan resolved against an IR: whole blocks and single branches to remove."""

    blocks: frozenset[str]
    sublayers: frozenset[str]


def resolve_removals(ir: ModelIR, remove: list[str]) -> Resolved:
    """Validate unit ids and fold "every sublayer of a block" into a block removal."""
    units = ir.units()
    if len(set(remove)) != len(remove):
        dupes = sorted({u for u in remove if remove.count(u) > 1})
        raise PlanError(f"the plan lists units more than once: {dupes}")
    unknown = [u for u in remove if u not in units]
    experts = {e.id: (s, e) for s in ir.sublayers() for e in s.experts}
    if unknown and unknown[0] in experts:
        sub, expert = experts[unknown[0]]
        family = next((g.id for g in sub.channel_groups if g.router), None)
        if expert.router_row is None or family is None:
            raise PlanError(f"{unknown[0]} is a shared expert: remove its channels or the whole {sub.id}")
        raise PlanError(
            f"{unknown[0]} is an expert: experts are removed through the plan's remove_groups "
            f"({{{family!r}: [{expert.router_row}]}}), or with --granularity expert"
        )
    if unknown:
        _refuse_stage(ir, unknown[0])
        import difflib

        hint = difflib.get_close_matches(unknown[0], list(units), n=1)
        raise PlanError(
            f"unknown unit id(s) {unknown[:5]} for this model"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ". Run `prunekit inspect MODEL` to list unit ids."
        )
    blocks: set[str] = set()
    subs: set[str] = set()
    for u in remove:
        unit = units[u]
        if isinstance(unit, Sublayer):
            if not unit.removable:
                raise PlanError(f"{u} ({unit.kind}) is not removable")
            subs.add(u)
        else:
            if not unit.removable:
                raise PlanError(f"block {u} is not removable")
            blocks.add(u)
    for b in ir.blocks():
        if b.id in blocks:
            subs -= {s.id for s in b.sublayers}
        elif b.sublayers and all(s.id in subs for s in b.sublayers):
            blocks.add(b.id)
            subs -= {s.id for s in b.sublayers}
    for tower in ir.towers:
        if tower.blocks and all(b.id in blocks for b in tower.blocks):
            raise PlanError(
                f"the plan removes every block of tower {tower.name!r} ({len(tower.blocks)} blocks); "
                "at least one must remain. Use a smaller --ratio."
            )
    return Resolved(frozenset(blocks), frozenset(subs))


def _refuse_stage(ir: ModelIR, unit: str) -> None:
    """Explain why ``unit``, a stage or a layer inside one (``vision.neck.conv1``), cannot be removed."""
    for st in ir.stages():
        fams = [g.id for g in st.channel_groups]
        inside = [f for f in fams if f == unit or f.startswith(unit + ".")]
        if unit != st.id and not unit.startswith(st.id + ".") and not inside:
            continue
        fix = (
            f"Narrow it instead: remove channel groups of {', '.join(inside or fams)} (the plan's remove_groups)"
            if inside or fams
            else "Remove blocks or sublayers (prunekit inspect lists them), or narrow channel groups instead"
        )
        raise PlanError(
            f"{unit} is part of the {st.kind} stage {st.id} ({st.module}), not a branch on a residual edge: "
            "removing it would break the dimensions between what feeds it and what reads it, so it cannot be "
            f"removed. {fix}."
        )


def removed_params(ir: ModelIR, resolved: Resolved) -> int:
    units = ir.units()
    return sum(units[u].params for u in resolved.blocks | resolved.sublayers)


def remove_branch(model: nn.Module, sub: Sublayer) -> None:
    """Replace one branch (its module, its parts, its post modules and its pre-norm) by parameter-free
    stand-ins."""
    set_module(model, sub.module, RemovedBranch(sub.kind, sub.output, sub.norm, full=sub.full_zero))
    for part in sub.parts:  # their output only fed the branch, which now ignores its input
        set_module(model, part, RemovedBranch(sub.kind, "tensor"))
    for post in sub.write.modules:  # post-norms only carried the branch's output to the add: pass a zero on
        set_module(model, post, RemovedBranch(sub.kind, "tensor", full=sub.full_zero))
    if sub.norm:
        set_module(model, sub.norm, nn.Identity())


def branch_paths(sub: Sublayer) -> list[str]:
    """Every module path a branch removal replaces: the branch, its parts, post modules and pre-norm."""
    return [sub.module, *sub.parts, *sub.write.modules, *([sub.norm] if sub.norm else [])]


def apply_removals(
    model: nn.Module, adapter: ArchitectureAdapter, ir: ModelIR, resolved: Resolved
) -> dict[str, list[int]]:
    """Remove branches and blocks in place; returns the kept block indices per tower."""
    adapter.validate_removals(model, ir, set(resolved.blocks), set(resolved.sublayers))
    subs = ir.sublayer_map()
    for sid in sorted(resolved.sublayers):
        remove_branch(model, subs[sid])
    kept: dict[str, list[int]] = {}
    for tower in ir.towers:
        keep = [b.index for b in tower.blocks if b.id not in resolved.blocks]
        kept[tower.name] = keep
        if len(keep) == len(tower.blocks):
            continue
        container = get_module(model, tower.blocks_path)
        if not isinstance(container, nn.ModuleList):
            raise PlanError(f"{tower.blocks_path} is a {type(container).__name__}, expected nn.ModuleList")
        new = nn.ModuleList([container[i] for i in keep])
        set_module(model, tower.blocks_path, new)
        _renumber_norm_paths(new, tower.blocks_path, keep)
    adapter.finalize_surgery(model, ir, kept)
    return kept


def _renumber_norm_paths(blocks: nn.ModuleList, blocks_path: str, keep: list[int]) -> None:
    """Point stand-ins' ``norm_path`` at the blocks' new indices (checkpoints rebuild norms from it)."""
    for new_i, old_i in enumerate(keep):
        old_prefix, new_prefix = f"{blocks_path}.{old_i}.", f"{blocks_path}.{new_i}."
        for m in blocks[new_i].modules():
            if isinstance(m, RemovedBranch) and m.norm_path and m.norm_path.startswith(old_prefix):
                m.norm_path = new_prefix + m.norm_path[len(old_prefix) :]


@dataclass(frozen=True)
class AppliedPlan:
    """What :func:`apply_plan` did to a model (pruned in place): the value to save and report from.

    ``plan`` is the plan as applied: ``width_uniform`` says whether the config alone describes the narrowed
    model, so :attr:`PrunePlan.is_uniform` tells whether plain ``from_pretrained`` reloads it; pass it to
    :func:`~prunekit_core.save_pruned` (``plan=applied.plan``) to record it in the checkpoint. Nothing of it
    is kept on the model.
    """

    model: nn.Module
    plan: PrunePlan
    #: whole blocks removed (block ids of the model before surgery)
    removed_blocks: tuple[str, ...] = ()
    #: single branches removed (sublayer ids of the model before surgery), now :class:`RemovedBranch` stand-ins
    removed_sublayers: tuple[str, ...] = ()
    #: the kept block indices per tower (of the model before surgery)
    kept_blocks: dict[str, list[int]] = field(default_factory=dict)
    #: ``repair="lsq"``: each run of removed branches, folded into a surviving projection, undone (it did
    #: not lower the held-out language-model loss) or declined (no writer adds linearly), with its note
    repair_steps: tuple[RepairStep, ...] = ()
    #: ``repair="lsq"``: the held-out share of each narrowed family's output error the refit removed
    refit_gains: dict[str, float] = field(default_factory=dict)
    #: ``repair="refit"``/``"refit_cosine"``: the writers around each gap the stream refit considered
    refit_steps: tuple[RefitStep, ...] = ()

    @property
    def is_uniform(self) -> bool:
        """Whether the config alone describes the result (plain ``from_pretrained`` reloads it)."""
        return self.plan.is_uniform


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    *,
    adapter: ArchitectureAdapter | None = None,
    repair_windows: torch.Tensor | None = None,
) -> AppliedPlan:
    """Apply ``plan`` to ``model`` in place; returns an :class:`AppliedPlan` (the model and the plan as applied).

    Checks the plan's fingerprint first; nothing is modified when validation fails. A plan with
    ``repair="lsq"`` first folds the removed branches into surviving projections, fitted on
    ``repair_windows`` (token ids [n, seq_len], e.g. the calibration windows); a fold is kept only where it
    lowers the language-model loss on held-out windows (:func:`~prunekit_core.surgery.repair.lsq_repair`),
    and the plan's notes say what each run got. Afterwards the removed
    weights are gone from the module tree and the config describes the new shape. Nothing is recorded on
    the model: save the result with ``save_pruned(applied.model, out, plan=applied.plan)``.
    """
    from ..registry.plugins import select_adapter

    adapter = adapter or select_adapter(model)
    ir = adapter.build_ir(model)
    check_fingerprint(plan, fingerprint(model, ir))
    resolved = resolve_removals(ir, plan.remove) if plan.remove else Resolved(frozenset(), frozenset())
    whole = resolved.blocks | resolved.sublayers
    cuts = resolve_width(ir, plan.remove_groups, removed_units=whole, top_k_policy=plan.top_k_policy)
    adapter.validate_removals(model, ir, set(resolved.blocks), set(resolved.sublayers))
    if plan.repair != "none" and repair_windows is None:
        raise PlanError(
            f"this plan repairs weights by least squares (repair={plan.repair}): pass repair_windows "
            "(calibration token windows) to apply_plan, or --calib on the command line"
        )
    gains: dict[str, float] = {}
    steps: list[RepairStep] = []
    refits: list[RefitStep] = []
    kept: dict[str, list[int]] = {}
    if cuts:
        if plan.repair != "none":
            assert repair_windows is not None  # checked above
            gains = refit_narrowed(model, ir, cuts, repair_windows)
        uniform = apply_width(model, adapter, ir, cuts, skip=whole)
        plan = plan.model_copy(update={"width_uniform": uniform})
    if plan.remove or not cuts:
        ir_now = adapter.build_ir(model) if cuts else ir
        if plan.repair == "lsq":
            assert repair_windows is not None  # checked above
            steps = lsq_repair(model, ir_now, resolved, repair_windows, masked=branches_masked)
            # what the repair did with each run (folded, undone, declined, and why): the plan as applied says
            plan = plan.model_copy(update={"notes": [*plan.notes, *(s.note for s in steps)]})
        elif plan.repair in ("refit", "refit_cosine"):
            assert repair_windows is not None  # checked above
            refits = stream_refit(
                model,
                ir_now,
                resolved,
                repair_windows,
                masked=branches_masked,
                objective="cosine" if plan.repair == "refit_cosine" else "lsq",
            )
        kept = apply_removals(model, adapter, ir_now, resolved)
    if not cuts:
        # no cut now, but an earlier one (a model reloaded with load_pruned) may leave shapes the config
        # does not describe: the plan as applied says so, as the checkpoint will (save_pruned)
        plan = plan.model_copy(update={"width_uniform": config_describes_shapes(model)})
    return AppliedPlan(
        model=model,
        plan=plan,
        removed_blocks=tuple(sorted(resolved.blocks)),
        removed_sublayers=tuple(sorted(resolved.sublayers)),
        kept_blocks=kept,
        repair_steps=tuple(steps),
        refit_gains=gains,
        refit_steps=tuple(refits),
    )


@contextmanager
def branches_masked(model: nn.Module, subs: list[Sublayer]) -> Iterator[None]:
    """Temporarily swap branches for :class:`RemovedBranch` (removal trials); restores on exit."""
    saved: list[tuple[str, nn.Module]] = []
    try:
        for s in subs:
            saved += [(path, get_module(model, path)) for path in branch_paths(s)]
            remove_branch(model, s)
        yield
    finally:
        for path, module in reversed(saved):
            set_module(model, path, module)
