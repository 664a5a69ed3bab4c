"""Least-squares repair: fold what removed branches contributed into a surviving output projection.

For every run of consecutive removed branches on a residual stream, the nearest surviving branch before
the run whose ``out_proj`` (an ``nn.Linear``, e.g. ``mlp.down_proj``) reaches the stream linearly
(``Sublayer.write.linear``: no post-norm, gate or unknown operation between it and the residual add)
absorbs the run's contribution: with ``A`` the inputs of that projection, ``D = x_after_run - x_before_run``
on the calibration tokens and ``s`` the writer's constant multiplier (``write.scale``, Granite's
``residual_multiplier``), its weight gets ``dW = argmin ||s A dW^T - D||^2 + lam ||dW||^2``. A nearer writer
with a post-norm after it (Gemma 2/3, OLMo2) is passed over: a correction folded into it would be
renormalised before it reaches the stream. With no linear writer left the run is declined. Shapes never
change, so a uniform plan still reloads with plain ``from_pretrained``.

Runs are processed front to back on the model with earlier runs already masked, so each fit sees the
stream its projection will really receive. The windows split two ways (:func:`split_windows`): every
fourth is held out, the rest fit. The held-out windows choose the ridge strength from a small grid (a
default strength when there are none) and then test the fold end to end; a fold kept is refit on every
window at that strength where the refit lowers the held-out loss too. A fold is kept only if the language
model's loss on the held-out windows (:func:`lm_loss`, with every removal masked) is lower with it than
without it; otherwise it is undone. Statistics are accumulated batch by batch (``A^T A`` and ``A^T D``), so
memory does not grow with the number of windows, and each fitting forward stops as soon as the run's end is
observed.

Narrowing a sublayer (removing channel groups) can be repaired the same way: :func:`refit_narrowed` refits
the output projection on the kept input channels, from the input Grams one calibration pass collects
(:func:`collect_width_stats`, which the width metrics read too).

This module is part of surgery: it imports nothing of scoring or planning. The branch masking it fits
under comes from its caller (:func:`~prunekit_core.apply_plan` passes ``surgery.branches_masked``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ..adapters.base import WidthCut, first_tensor, get_module, module_tensor
from ..ir.errors import PlanError
from ..ir.model import ChannelGroup, GroupMember, ModelIR, Stage, Sublayer
from .width import member_index, split_param

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_RIDGE = 0.1
#: ridge strengths :func:`refit_narrowed` chooses from (relative to the kept channels' mean Gram diagonal)
REFIT_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


class Removals(Protocol):
    """What a plan removes (:class:`prunekit_core.surgery.apply.Resolved`): whole blocks and single branches."""

    @property
    def blocks(self) -> Collection[str]: ...

    @property
    def sublayers(self) -> Collection[str]: ...


#: ``masked(model, branches)``: a context in which ``branches`` are removed (``surgery.branches_masked``)
BranchMask = Callable[[nn.Module, list[Sublayer]], AbstractContextManager[None]]


RepairStatus = Literal["folded", "undone", "declined"]


@dataclass(frozen=True)
class RepairStep:
    """One run of removed branches: the projection it was folded into, or why it was not.

    ``status``: ``folded`` (the fold lowered the held-out language-model loss and was kept), ``undone`` (it
    was fitted, and taken back because it did not lower that loss or did not generalise), ``declined`` (no
    fit: no writer before the run adds linearly into the stream, or no held-out window to test a fold on).
    """

    removed: tuple[str, ...]
    writer: str  # the out_proj folded into (or tried); "" when no writer was found
    ridge: float
    holdout_gain: float  # fraction of the held-out residual energy the fit explains
    status: RepairStatus = "folded"
    loss_without: float = float("nan")  # held-out LM loss of the pruned model without this fold
    loss_with: float = float("nan")  # ... and with it (nan when not fitted)
    note: str = ""  # one line for the plan's notes and the CLI output

    @property
    def folded(self) -> bool:
        return self.status == "folded"


class _Stop(Exception):
    pass


@dataclass
class NormalEquations:
    """Normal equations of ``min ||A dW^T - D||^2``: ``A^T A``, ``A^T D`` and ``||D||^2``, in float64."""

    G: torch.Tensor
    C: torch.Tensor
    dd: torch.Tensor

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> NormalEquations:
        f64 = torch.float64
        return cls(
            torch.zeros(d_in, d_in, dtype=f64),
            torch.zeros(d_in, d_out, dtype=f64),
            torch.zeros((), dtype=f64),
        )

    def add(self, a: torch.Tensor, d: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).double()
        d = d.reshape(-1, d.shape[-1]).double()
        self.G += a.T @ a
        self.C += a.T @ d
        self.dd += (d * d).sum()

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.G + other.G, self.C + other.C, self.dd + other.dd)

    def residual(self, dw: torch.Tensor) -> torch.Tensor:
        """``||A dW^T - D||^2 = tr(dW G dW^T) - 2 tr(dW C) + ||D||^2``."""
        return (dw @ self.G * dw).sum() - 2 * (dw * self.C.T).sum() + self.dd


@dataclass(frozen=True)
class _Run:
    """A run of consecutive removed branches, where the stream after it is read, and its writer choice."""

    subs: list[Sublayer]
    end_path: str  # the module whose input is the stream after the run
    writer: Sublayer | None  # the nearest earlier writer that adds linearly into the run's stream
    passed: list[Sublayer]  # nearer writers passed over: something nonlinear stands after them

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.subs)

    def label(self) -> str:
        return ", ".join(self.ids)

    def why_declined(self) -> str:
        if not self.passed:
            return "no surviving branch with an output projection before it on its stream"
        near = self.passed[0]
        after = ", ".join(near.write.modules) or "undeclared modules"
        return (
            f"the nearest writer {near.out_proj} is followed by a {near.write.post} ({after}) before the "
            f"residual add, so a correction folded into it would not reach the stream linearly, and no "
            f"earlier writer on stream {self.subs[0].residual.stream} adds linearly"
        )


def _runs(ir: ModelIR, removed: set[str]) -> list[_Run]:
    """Every run of consecutive removed branches, per tower, front to back, with its writer.

    The writer is the nearest surviving branch before the run, on the same stream, whose ``out_proj`` output
    reaches the stream linearly (``Sublayer.write.linear``: no norm, gate or unknown operation between it and
    the residual add; a constant ``write.scale`` is allowed). Nearer writers with a post-norm (Gemma 2/3,
    OLMo2) are passed over; with none left the run is declined.
    """
    out = []
    for tower in ir.towers:
        subs = [s for b in tower.blocks for s in b.sublayers]
        if tower.final_norm is None and any(s.id in removed for s in subs):
            raise PlanError(
                f"least-squares repair fits on the token windows' pass through the language model; tower "
                f"{tower.name!r} is read from its hidden states and is not repaired. Use --repair none (API: "
                "repair='none') for plans that remove its units, or --scope text"
            )
        i = 0
        while i < len(subs):
            if subs[i].id not in removed:
                i += 1
                continue
            j = i
            while j < len(subs) and subs[j].id in removed:
                j += 1
            stream = subs[i].residual.stream
            candidates = [
                s
                for s in reversed(subs[:i])
                if s.out_proj and s.id not in removed and s.residual.stream == stream
            ]
            writer = next((s for s in candidates if s.write.linear and s.write.scale != 0), None)
            passed = candidates[: candidates.index(writer)] if writer is not None else candidates
            end_path = (subs[j].norm or subs[j].module) if j < len(subs) else tower.final_norm
            if end_path is None:
                raise PlanError(f"tower {tower.name} declares no final_norm; cannot repair its last branches")
            out.append(_Run(subs[i:j], end_path, writer, passed))
            i = j
    return out


#: ``loss(model, windows)``: the mean next-token loss of the language model on token windows
LossFn = Callable[[nn.Module, torch.Tensor], float]


@torch.inference_mode()
def lm_loss(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of ``model`` on ``windows`` (token ids ``[n, seq_len]``), every token
    weighted alike: a plain forward (``model(input_ids=...).logits``), the language model's own loss."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
        target = ids[:, 1:]
        total += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
        )
        count += target.numel()
    return total / count


def split_windows(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index masks (fit, ridge, held) over ``n`` windows: every fourth window is held out (the last one of 2
    or 3 windows; none of 1); the fit uses the rest. The held-out windows choose the ridge strength (the
    reconstruction error of each strength's fit) and then test the fold end to end (the language-model
    loss), so neither is measured on a window the fit has seen. ``ridge`` and ``held`` are the same mask
    (with fewer than 4 windows ``ridge`` is empty: the default strength, one window is too few to choose).

    Why the same windows: choosing the ridge on a separate quarter of the non-held windows left too few for
    either at the default 8 windows. On SmolLM2-135M at 10% (blocks 13-15, 8 x 256 c4 tokens) that picked
    ridge 0.1 (wiki perplexity 24.07 on 4 x 256 tokens, held-out c4 60.15), against ridge 1 here (22.22 and
    56.49; unrepaired 23.92)."""
    idx = torch.arange(n)
    held = (idx % 4 == 3) if n >= 4 else (idx == n - 1) & (idx > 0)
    # with fewer than 4 windows the one held out only tests the fold: the ridge is the default strength
    return ~held, held.clone() if n >= 4 else torch.zeros(n, dtype=torch.bool), held


@torch.inference_mode()
def lsq_repair(
    model: nn.Module,
    ir: ModelIR,
    resolved: Removals,
    windows: torch.Tensor,
    *,
    masked: BranchMask,
    batch_size: int = 8,
    loss: LossFn | None = None,
) -> list[RepairStep]:
    """Update surviving output projections in place so they absorb the removed branches' contribution.

    ``resolved`` are the removals (blocks count as all their sublayers). Call before the surgery.
    ``masked`` removes branches for the duration of a context (:func:`prunekit_core.surgery.apply.branches_masked`,
    which :func:`~prunekit_core.apply_plan` passes): later runs are fitted with earlier ones removed.

    Every fold is tested end to end: the language-model loss (``loss``, default :func:`lm_loss`) of the
    pruned model (every removal masked) on the held-out windows (every fourth, :func:`split_windows`), with
    and without it (the fold tested is fitted without them). A fold that does not lower that loss is undone; one
    that does is kept, refit on every window at its ridge where the refit lowers that loss too. Runs without a writer that adds linearly
    into the stream are declined. Returns one step per run, each with a one-line ``note`` saying which.
    """
    blocks = ir.block_map()
    removed: set[str] = set(resolved.sublayers)
    for bid in resolved.blocks:
        removed |= {s.id for s in blocks[bid].sublayers}
    runs = _runs(ir, removed)
    loss_fn: LossFn = loss or (lambda m, w: lm_loss(m, w, batch_size=batch_size))
    fit_mask, ridge_mask, held_mask = split_windows(windows.shape[0])
    held = windows[held_mask]
    every = [s for r in runs for s in r.subs]
    steps: list[RepairStep] = []
    if not runs:
        return steps
    if held.shape[0] == 0:
        for r in runs:
            note = (
                f"repair: {r.label()} declined: {windows.shape[0]} calibration window leaves none to test a "
                "fold on (one is held out); pass at least 2 windows (--windows), better 32"
            )
            steps.append(RepairStep(r.ids, "", DEFAULT_RIDGE, float("nan"), "declined", note=note))
        return steps
    with masked(model, every):
        current = loss_fn(model, held)
    n_held = held.shape[0]
    done: list[Sublayer] = []
    for r in runs:
        writer = r.writer
        if writer is None:
            note = f"repair: {r.label()} declined: {r.why_declined()}; left unrepaired"
            steps.append(RepairStep(r.ids, "", DEFAULT_RIDGE, float("nan"), "declined", current, note=note))
            log.info(note)
            done.extend(r.subs)
            continue
        out_proj = writer.out_proj or ""
        proj = get_module(model, out_proj)
        if not isinstance(proj, nn.Linear):
            raise PlanError(f"{out_proj} is a {type(proj).__name__}; repair needs an nn.Linear")
        via = ""
        if r.passed:
            via = f" (passed over {', '.join(s.out_proj or s.id for s in r.passed)}: a {r.passed[0].write.post} follows)"
        ridge, gain, dw = fit_fold(
            model,
            masked,
            done,
            proj,
            r,
            windows[fit_mask],
            windows[ridge_mask],
            writer.write.scale,
            batch_size,
        )
        done.extend(r.subs)
        if not bool(dw.any()):
            note = (
                f"repair: {r.label()} not folded into {out_proj}: the fit explains none of the run's "
                f"contribution on the windows that choose its ridge (gain {gain:.3f}); left unrepaired"
            )
            steps.append(RepairStep(r.ids, out_proj, ridge, gain, "undone", current, current, note))
            log.info(note)
            continue
        before = proj.weight.detach().clone()
        proj.weight += dw.to(proj.weight.dtype)
        with masked(model, every):
            after = loss_fn(model, held)
        if after < current:
            # accepted. The fold is refit at the chosen ridge on every window (fit and held-out), as an
            # estimate checked on held-out data is then refit on all of it; that refit is kept only if the
            # held-out loss with it is lower still than without any fold, else the fold as tested is kept.
            # Statistics are read with the writer as it was: its output feeds the run's input
            tested = proj.weight.detach().clone()
            proj.weight.copy_(before)
            start = r.subs[0].norm or r.subs[0].module
            eq = _accumulate(model, masked, done[: -len(r.subs)], proj, start, r.end_path, windows, batch_size,
                             writer.write.scale)  # fmt: skip
            proj.weight += _ridge_fit(eq.G, eq.C, ridge).to(proj.weight.dtype)
            with masked(model, every):
                after_all = loss_fn(model, held)
            if after_all < current:
                after, kept = after_all, f"the fold kept is refit on all {windows.shape[0]} windows"
            else:
                proj.weight.copy_(tested)
                kept = f"kept as tested: its refit on all {windows.shape[0]} windows scored {after_all:.4f}"
            note = (
                f"repair: {r.label()} folded into {out_proj}{via} (ridge {ridge:g}): held-out loss "
                f"{current:.4f} -> {after:.4f} on {n_held} windows ({kept})"
            )
            steps.append(RepairStep(r.ids, out_proj, ridge, gain, "folded", current, after, note))
            current = after
        else:
            proj.weight.copy_(before)
            note = (
                f"repair: {r.label()} fold into {out_proj}{via} undone: held-out loss {current:.4f} -> "
                f"{after:.4f} on {n_held} windows (not lower)"
            )
            steps.append(RepairStep(r.ids, out_proj, ridge, gain, "undone", current, after, note))
        log.info(note)
    return steps


@torch.inference_mode()
def fit_fold(
    model: nn.Module,
    masked: BranchMask,
    done: list[Sublayer],
    proj: nn.Linear,
    run: _Run,
    fit: torch.Tensor,
    ridge: torch.Tensor,
    scale: float,
    batch_size: int,
) -> tuple[float, float, torch.Tensor]:
    """The fold of ``run`` into ``proj`` (float64 ``dW``, ``[out, in]``), fitted on the ``fit`` windows with
    ``done`` masked, the ridge strength chosen on the ``ridge`` windows: ``scale * A dW^T ~ D``, ``D`` the
    run's contribution to the stream and ``scale`` the writer's constant multiplier before the add."""
    start_path = run.subs[0].norm or run.subs[0].module
    fit_eq, ridge_eq = (
        _accumulate(model, masked, done, proj, start_path, run.end_path, w, batch_size, scale)
        for w in (fit, ridge)
    )
    return solve_ridge(fit_eq, ridge_eq, refit=False)


def _accumulate(
    model: nn.Module,
    mask: BranchMask,
    masked: list[Sublayer],
    proj: nn.Linear,
    start_path: str,
    end_path: str,
    windows: torch.Tensor,
    batch_size: int,
    scale: float = 1.0,
) -> NormalEquations:
    stats = NormalEquations.zeros(proj.in_features, proj.out_features)
    cur: dict[str, Any] = {}

    def on_proj(_m: nn.Module, args: tuple[Any, ...]) -> None:
        cur["A"] = args[0]

    def on_start(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cur["x0"] = first_tensor(args, kwargs)

    def on_end(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cur["x1"] = first_tensor(args, kwargs)
        raise _Stop

    with mask(model, masked):
        handles = [
            proj.register_forward_pre_hook(on_proj),
            get_module(model, start_path).register_forward_pre_hook(on_start, with_kwargs=True),
            get_module(model, end_path).register_forward_pre_hook(on_end, with_kwargs=True),
        ]
        try:
            for start in range(0, windows.shape[0], batch_size):
                cur.clear()
                try:
                    model(input_ids=windows[start : start + batch_size], use_cache=False)
                except _Stop:
                    pass
                # token rows: some decoders (OPT) flatten the stream to [tokens, width] inside a layer
                x0, x1, a = (cur[k].reshape(-1, cur[k].shape[-1]) for k in ("x0", "x1", "A"))
                stats.add(a, (x1 - x0) / scale)
        finally:
            for h in handles:
                h.remove()
    return stats


def _ridge_fit(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """``dW`` of ``min ||A dW^T - D||^2 + lam' ||dW||^2``, ``lam'`` relative to ``G``'s mean diagonal."""
    reg = lam * G.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    solved: torch.Tensor = torch.linalg.solve(G + reg * eye, C)
    return solved.T  # [out, in]


def solve_ridge(
    fit: NormalEquations, hold: NormalEquations, *, refit: bool = True
) -> tuple[float, float, torch.Tensor]:
    """Ridge strength chosen on ``hold``, then the fit on both (on ``fit`` alone with ``refit=False``);
    returns (ridge, held-out gain, dW)."""
    best = (DEFAULT_RIDGE, float("nan"))  # too few windows to hold any out: default strength
    if hold.dd > 0:
        best = (RIDGE_GRID[-1], float("-inf"))
        for lam in RIDGE_GRID:
            gain = float(1 - hold.residual(_ridge_fit(fit.G, fit.C, lam)) / hold.dd)
            if gain > best[1]:
                best = (lam, gain)
    lam, gain = best
    both = fit + hold if refit else fit
    if gain <= 0:  # (False for nan) the fit does not generalise: leave the weights alone
        return lam, gain, torch.zeros(both.C.shape[1], both.C.shape[0], dtype=torch.float64)
    return lam, gain, _ridge_fit(both.G, both.C, lam)


# ---------------------------------------------------------------------------------------------------------
# Width statistics and the refit of narrowed output projections


@dataclass
class WidthStats:
    """Input statistics of every module a channel-group member lives in."""

    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> [in_features] float64
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # out_proj path -> [in, in] float64
    gram_hold: dict[str, torch.Tensor] = field(default_factory=dict)  # the held-out windows' part
    tokens: int = 0


def _member_modules(fams: list[ChannelGroup]) -> set[str]:
    return {split_param(m.param)[0] for f in fams for m in f.members}


#: the :meth:`~prunekit_core.scoring.calibration.ScoringContext.observed` key of :func:`width_collector`'s statistics
WIDTH_STATS = "prunekit.width_stats"


def _width_hooks(
    model: nn.Module, ir: ModelIR, families: list[str] | None, grams: bool, state: dict[str, Any]
) -> tuple[WidthStats, list[Any]]:
    fams = ir.channel_groups()
    chosen = list(fams) if families is None else families
    modules = _member_modules([fams[f][1] for f in chosen])
    outs: set[str] = {p for f in chosen if (p := fams[f][0].out_proj)} if grams else set()
    stats = WidthStats()

    def make_hook(path: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq = (x * x).sum(0)
            stats.sumsq[path] = stats.sumsq[path] + sq if path in stats.sumsq else sq
            if path in outs:
                g = x.T @ x
                key = stats.gram_hold if state["hold"] else stats.gram
                key[path] = key[path] + g if path in key else g

        return hook

    handles = [get_module(model, p).register_forward_pre_hook(make_hook(p)) for p in sorted(modules | outs)]
    return stats, handles


def width_collector(model: nn.Module, ir: ModelIR, windows: torch.Tensor) -> tuple[WidthStats, list[Any]]:
    """A :data:`~prunekit_core.scoring.calibration.Collector` of the width statistics of every family in ``ir``: the
    hooks of :func:`collect_width_stats` (no held-out part), for a caller that runs the windows."""
    stats, handles = _width_hooks(model, ir, None, True, {"hold": False})
    stats.tokens = int(windows.numel())
    return stats, handles


@torch.inference_mode()
def collect_width_stats(
    model: nn.Module,
    ir: ModelIR,
    windows: torch.Tensor,
    *,
    families: list[str] | None = None,
    grams: bool = True,
    batch_size: int = 8,
    hold_every: int = 0,
) -> WidthStats:
    """One pass over ``windows``: per-feature input energy for member modules, Grams for output projections.

    With ``hold_every=n`` the Gram of every n-th window also goes to ``gram_hold`` (ridge choice).
    """
    state: dict[str, Any] = {"hold": False}
    stats, handles = _width_hooks(model, ir, families, grams, state)
    try:
        n = windows.shape[0]
        if hold_every:
            order = [i for i in range(n) if i % hold_every != hold_every - 1]
            held = [i for i in range(n) if i % hold_every == hold_every - 1]
        else:
            order, held = list(range(n)), []
        for part, is_hold in ((order, False), (held, True)):
            state["hold"] = is_hold
            for start in range(0, len(part), batch_size):
                idx = part[start : start + batch_size]
                model(input_ids=windows[idx], use_cache=False)
        stats.tokens = int(windows.numel())
    finally:
        for h in handles:
            h.remove()
    return stats


def out_member(sub: Sublayer | Stage, fam: ChannelGroup) -> GroupMember | None:
    """The member of ``fam`` that is its unit's output projection, along its input axis (what a refit
    narrows), or ``None``."""
    out_proj = getattr(sub, "out_proj", None)  # a stage (conv neck, projector) has none: never refit
    if not out_proj:
        return None
    for m in fam.members:
        if m.param == f"{out_proj}.weight" and m.axis == 1:
            return m
    return None


def out_proj_path(sub: Sublayer | Stage) -> str:
    """The output projection of a unit whose family has an out-projection member (:func:`out_member`)."""
    path: str | None = getattr(sub, "out_proj", None)
    if not path:
        raise PlanError(f"{sub.id} has no output projection")
    return path


def refit_columns(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """The least-squares map from the kept inputs ``keep`` to ``W``'s output, ``W G[:, K] (G_KK + lam I)^-1``
    (``G`` the Gram of the inputs; the ridge is relative to ``G_KK``'s mean diagonal): ``[out, k]``."""
    Gk = G[keep][:, keep]
    reg = lam * Gk.diagonal().mean().clamp_min(1e-12)
    rhs = G[keep] @ W.T  # [k, out]
    solved: torch.Tensor = torch.linalg.solve(Gk + reg * torch.eye(len(keep), dtype=G.dtype), rhs)
    return solved.T  # [out, k]


def _output_error(W: torch.Tensor, Wk: torch.Tensor, G: torch.Tensor, keep: torch.Tensor) -> float:
    """``E||W a - Wk a_K||^2`` from the Gram ``G`` of ``a``."""
    cross = (W @ G[:, keep] * Wk).sum()
    return float((W @ G * W).sum() - 2 * cross + (Wk @ G[keep][:, keep] * Wk).sum())


@torch.no_grad()
def refit_narrowed(
    model: nn.Module, ir: ModelIR, cuts: dict[str, WidthCut], windows: torch.Tensor, *, batch_size: int = 8
) -> dict[str, float]:
    """Refit each narrowed sublayer's output projection on its kept input channels (before slicing).

    The projection's columns of kept channels get ``W G[:, K] (G_KK + lam I)^-1``: the least-squares map
    from the kept channels to the full branch output on the calibration tokens. The ridge strength is
    chosen on every fourth window; the plain slice is kept where the refit does not help held-out tokens.
    Returns the held-out fraction of the cut's output error the refit removed, per family.
    """
    fams = [f for f, c in cuts.items() if out_member(c.sublayer, c.family) is not None]
    if not fams:
        return {}
    stats = collect_width_stats(model, ir, windows, families=fams, batch_size=batch_size, hold_every=4)
    gains: dict[str, float] = {}
    for fid in fams:
        cut = cuts[fid]
        member = out_member(cut.sublayer, cut.family)
        assert member is not None
        out_proj = out_proj_path(cut.sublayer)
        proj = get_module(model, out_proj)
        W = module_tensor(proj, "weight").detach().double()
        keep = member_index(member, cut.family.count, cut.kept, W.shape[1])
        G, H = stats.gram[out_proj], stats.gram_hold.get(out_proj)
        plain = W[:, keep]
        if H is not None:
            base = _output_error(W, plain, H, keep)
            best = min(
                REFIT_RIDGE_GRID, key=lambda lam: _output_error(W, refit_columns(W, G, keep, lam), H, keep)
            )
            err = _output_error(W, refit_columns(W, G, keep, best), H, keep)
            gains[fid] = 1 - err / base if base > 0 else 0.0
            if err >= base:
                continue
            new = refit_columns(W, G + H, keep, best)
        else:
            new = refit_columns(W, G, keep, REFIT_RIDGE_GRID[1])
            gains[fid] = float("nan")
        weight = module_tensor(proj, "weight")
        weight[:, keep] = new.to(weight.dtype)
    return gains
