"""The self-validating default: compare candidate plans on held-out calibration windows, keep the best.

With no metric named, :func:`~prunekit_core.planning.planner.plan_pruning` plans every candidate of
:data:`~prunekit_core.ir.defaults.DEFAULT_CANDIDATES` at the budget from one calibration pass (BI, the
angular span and the sublayer drop all read the same stream statistics), applies each to a copy of the
model with its repair (the real surgery, fitted on the calibration windows), and measures the copy's
language-model loss on held-out windows of the calibration text, disjoint from the windows that scored the
units and fitted the repair. The candidate with the lowest loss wins; a tie keeps the earlier candidate,
and ShortGPT BI without repair comes first, so the chosen plan's held-out loss is never above BI's.

The evaluation text is never read here. A new repair or metric becomes a candidate by one line in
:data:`~prunekit_core.ir.defaults.DEFAULT_CANDIDATES` (or the ``candidates`` argument).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import ArchitectureAdapter
from ..ir.defaults import DEFAULT_HELDOUT_WINDOWS, Candidate
from ..ir.errors import CalibrationError, PlanError
from ..ir.plan import CandidatePlan, PrunePlan, Selection
from ..surgery.apply import apply_plan


def heldout_count(n: int) -> int:
    """How many of ``n`` given windows to hold out when no further windows are at hand: a quarter, at
    least one, at most :data:`DEFAULT_HELDOUT_WINDOWS`. Raises when ``n < 2`` (nothing would be left)."""
    if n < 2:
        raise CalibrationError(
            f"the default method holds out calibration windows to compare its candidate plans, and {n} "
            "window cannot be split: pass at least 2 calibration windows (--windows), or name a "
            "method (--metric bi)"
        )
    return min(DEFAULT_HELDOUT_WINDOWS, max(1, n // 4))


def label(c: CandidatePlan | Candidate) -> str:
    """How tables name a candidate: ``bi``, ``angular + lsq``, ``sublayer_drop (mixed) + lsq``."""
    metric = c.method.split(":", 1)[-1] if isinstance(c, CandidatePlan) else c.metric
    gran = "" if c.granularity == "block" else f" ({c.granularity})"
    return metric + gran + ("" if c.repair == "none" else f" + {c.repair}")


def _image_token(model: nn.Module) -> int | None:
    """The image placeholder token of a vision-language model (not a next-token target), if any."""
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@torch.inference_mode()
def heldout_loss(
    model: nn.Module,
    windows: torch.Tensor,
    inputs: dict[str, torch.Tensor] | None = None,
    *,
    batch_size: int = 4,
) -> float:
    """Mean next-token cross-entropy of ``model`` over every position of ``windows`` (image placeholder
    tokens are not targets). Written here rather than taken from :mod:`prunekit_core.study.evaluate`, a
    higher layer; it runs the model's own forward, so what it measures is the pruned model as saved."""
    ignore = _image_token(model)
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        extra = {k: v[start : start + batch_size] for k, v in (inputs or {}).items()}
        logits = model(input_ids=batch, use_cache=False, **extra).logits[:, :-1].float()
        labels = batch[:, 1:].clone()
        if ignore is not None:
            labels[labels == ignore] = -100
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((labels != -100).sum())
    if count == 0:
        raise CalibrationError("the held-out windows hold no next-token target; use longer windows")
    return total / count


@dataclass
class Planned:
    """A candidate and the plan made for it (``None`` with ``why`` when it could not be made)."""

    candidate: Candidate
    plan: PrunePlan | None
    why: str = ""


def compare(
    model: nn.Module,
    planned: Sequence[Planned],
    *,
    adapter: ArchitectureAdapter,
    repair_windows: torch.Tensor,
    heldout: torch.Tensor,
    heldout_inputs: dict[str, torch.Tensor],
    on_step: Callable[[str], None] | None = None,
) -> tuple[list[CandidatePlan], int]:
    """Apply each plan to a copy of ``model`` and measure its held-out loss; returns one row per
    candidate and the index of the winner (lowest loss; the earliest on a tie). Plans that are equal
    (same removals, same repair) are measured once."""
    rows: list[CandidatePlan] = []
    seen: dict[tuple[object, ...], int] = {}
    for item in planned:
        c, plan = item.candidate, item.plan
        if plan is None:
            rows.append(
                CandidatePlan(
                    method=f"rank:{c.metric}", granularity=c.granularity, repair=c.repair, note=item.why
                )
            )
            continue
        row = CandidatePlan(
            method=plan.method,
            granularity=plan.granularity,
            repair=plan.repair,
            remove=list(plan.remove),
            removed_params=plan.removed_params,
        )
        if plan.repair != c.repair:  # a repair the plan's towers cannot take was dropped (plan_pruning)
            row.note = next((n for n in plan.notes if "repair" in n), f"repair {c.repair} dropped")
        key = (
            tuple(sorted(plan.remove)),
            plan.repair,
            tuple(sorted((k, tuple(v)) for k, v in plan.remove_groups.items())),
        )
        if key in seen:
            same = rows[seen[key]]
            row.heldout_loss = same.heldout_loss
            row.note = "; ".join(filter(None, (row.note, f"the same plan as {label(same)}")))
        else:
            seen[key] = len(rows)
            # the real surgery on a copy: what is measured is the model prune would save
            pruned = copy.deepcopy(model)
            try:
                apply_plan(pruned, plan, adapter=adapter, repair_windows=repair_windows)
                row.heldout_loss = heldout_loss(pruned, heldout, heldout_inputs)
            except Exception as exc:  # noqa: BLE001 - one candidate's failure is reported, not fatal
                # (a surgery this model refuses, a repair that cannot fit it): the others still compete,
                # and the table and the plan say what failed
                row.note = f"failed: {type(exc).__name__}: {exc}"[:300]
            finally:
                del pruned
            if on_step:
                loss = "-" if row.heldout_loss is None else f"{row.heldout_loss:.4f}"
                on_step(
                    f"candidate {label(row)}: held-out loss {loss}" + (f" ({row.note})" if row.note else "")
                )
        rows.append(row)
    measured = [i for i, r in enumerate(rows) if r.heldout_loss is not None and math.isfinite(r.heldout_loss)]
    if not measured:
        raise PlanError(
            "no candidate of the default method could be planned and measured: "
            + "; ".join(f"{label(r)}: {r.note}" for r in rows)
            + ". Follow the fix each names, or name one method (--metric bi)"
        )
    best = min(measured, key=lambda i: (rows[i].heldout_loss, i))
    rows[best].chosen = True
    return rows, best


def reason(rows: Sequence[CandidatePlan], best: int, heldout: str) -> str:
    """Why the winner won, with its margin over ShortGPT BI (the first plain ``bi`` row) where measured."""
    win = rows[best]
    assert win.heldout_loss is not None  # compare picks a measured row
    text = f"{label(win)}: the lowest held-out loss ({win.heldout_loss:.4f}) of {len(rows)} candidates on {heldout}"
    ref = next(
        (r for r in rows if r.method == "rank:bi" and r.repair == "none" and r.granularity == "block"), None
    )
    if ref is not None and ref.heldout_loss is not None and ref is not win:
        text += f"; ShortGPT BI {ref.heldout_loss:.4f} (ratio {win.heldout_loss / ref.heldout_loss:.3f})"
    elif ref is win:
        text += "; it is ShortGPT BI itself (no other candidate did better)"
    return text


def selection(
    rows: Sequence[CandidatePlan], best: int, *, heldout: torch.Tensor, fit_windows: int, split: str
) -> Selection:
    """The plan's :class:`~prunekit_core.ir.plan.Selection` record."""
    return Selection(
        heldout=split,
        heldout_windows=int(heldout.shape[0]),
        heldout_tokens=int(heldout.numel()),
        fit_windows=fit_windows,
        reason=reason(rows, best, f"{heldout.shape[0]} x {heldout.shape[1]} held-out tokens"),
    )
