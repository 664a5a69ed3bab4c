"""Stream refit: fold a removal's error into several surviving writers, each matched to the unpruned stream.

The least-squares repair (:mod:`.repair`) folds each run of removed branches into one projection, the
surviving writer just before the run. What that one fold cannot explain reaches every later block. The
stream refit spreads the correction over the writers around each gap: the writer before the gap and the
next ``depth`` surviving writers after it. Front to back, each writer ``W`` (an ``out_proj`` whose
contribution reaches the stream linearly, ``sub.write.linear``) gets

    dW = argmin || A dW^T - (x_teacher - x_student) / scale ||^2 + lam ||dW||^2

with ``A`` the inputs of ``W`` in the pruned model (with every earlier writer already refitted),
``x_student`` the pruned model's stream at the point after ``W``'s add (the input of the next surviving
branch, or of the final norm), ``x_teacher`` the unpruned model's stream at that same point and ``scale``
the branch's constant multiplier (``sub.write.scale``). So each writer absorbs the error the stream carries
at its output, and later writers absorb what earlier ones could not: closed-form, layer-wise reconstruction
in the spirit of sequential pruning-by-reconstruction methods, with no gradient training.

``objective="cosine"`` weights every token by ``1 / ||x_teacher||^2``: the fit then minimises the relative
error of each token's stream, which is what a following RMSNorm sees (it discards each token's scale). This
is the closed-form counterpart of ReplaceMe's cosine-distance objective (arXiv 2505.02819), which the paper
fits by gradient descent on a linear map; a weighted least-squares solve needs no iterations.

The ridge strength of every fit is chosen on held-out calibration windows (every fourth window) from a small
grid, and a writer whose best fit does not lower the held-out error is left alone. Shapes never change: the
result reloads with plain ``from_pretrained``. A tower whose branches do not sit one after another on the
stream (parallel attention and MLP) is left to the one-writer repair.

Cost: the pruned model is run block by block from cached streams (earlier blocks are masked and the cached
stream is injected at the block's input), so every writer costs about two block passes over the
calibration windows, not a forward pass of the model.

This module is part of surgery: it imports nothing of scoring or planning. The branch masking comes from
its caller (:func:`~prunekit_core.apply_plan` passes ``surgery.branches_masked``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..adapters.base import first_tensor, get_module
from ..ir.errors import PlanError
from ..ir.model import ModelIR, Sublayer, Tower

log = logging.getLogger(__name__)

RefitObjective = Literal["lsq", "cosine"]
#: ridge strengths (relative to the mean diagonal of the writer's input Gram) chosen from on held-out windows
REFIT_RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)
#: surviving writers after each gap that :func:`stream_refit` refits by default
DEFAULT_DEPTH = 4

BranchMask = Callable[[nn.Module, list[Sublayer]], AbstractContextManager[None]]


@dataclass(frozen=True)
class RefitStep:
    """One writer the stream refit considered."""

    sublayer: str
    writer: str
    ridge: float
    holdout_gain: float  # fraction of the held-out stream error (at the writer's output) the fit removed
    applied: bool


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class _Writer:
    index: int  # position of the sublayer in its tower
    sub: Sublayer
    block: int  # position of its block in the tower
    end: int  # index of the next surviving sublayer (len(subs): the final norm)


def _sequential(tower: Tower) -> bool:
    subs = [s for b in tower.blocks for s in b.sublayers]
    return all(s.residual.target == s.residual.source + 1 for s in subs) and all(
        a.residual.target == b.residual.source for a, b in zip(subs, subs[1:], strict=False)
    )


def refit_writers(tower: Tower, removed: Collection[str], depth: int | None) -> list[_Writer]:
    """The writers :func:`stream_refit` fits in ``tower``, front to back: for every run of removed
    branches, the surviving branch just before it and the next ``depth`` surviving branches after it
    (``None``: every one after the first run), where their writer is a foldable ``out_proj``."""
    subs = [s for b in tower.blocks for s in b.sublayers]
    block_of = [bi for bi, b in enumerate(tower.blocks) for _ in b.sublayers]
    alive = [i for i, s in enumerate(subs) if s.id not in removed]
    chosen: set[int] = set()
    i = 0
    while i < len(subs):
        if subs[i].id not in removed:
            i += 1
            continue
        j = i
        while j < len(subs) and subs[j].id in removed:
            j += 1
        if i > 0 and subs[i - 1].id not in removed:
            chosen.add(i - 1)
        after = [k for k in alive if k >= j]
        chosen.update(after if depth is None else after[:depth])
        i = j
    out = []
    for k in sorted(chosen):
        s = subs[k]
        if not s.out_proj or not s.write.linear or s.write.scale == 0:
            continue
        end = next((m for m in alive if m > k), len(subs))
        out.append(_Writer(k, s, block_of[k], end))
    return out


def _replace_first(args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor) -> Any:
    if args and isinstance(args[0], torch.Tensor):
        return (x, *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": x}
    raise PlanError("stream refit: could not find the hidden states among a block's inputs")


class _Runner:
    """Runs the model from a cached stream at a block's input up to a point, batch by batch."""

    def __init__(
        self, model: nn.Module, tower: Tower, windows: torch.Tensor, masked: BranchMask, batch_size: int
    ) -> None:
        self.model, self.tower, self.windows, self.masked = model, tower, windows, masked
        self.batch_size = batch_size
        self.subs = [s for b in tower.blocks for s in b.sublayers]
        self.first = [sum(len(b.sublayers) for b in tower.blocks[:bi]) for bi in range(len(tower.blocks))]

    def point_path(self, i: int) -> str:
        """The module whose input is the stream before sublayer ``i`` (``len(subs)``: the final norm)."""
        if i == len(self.subs):
            assert self.tower.final_norm is not None
            return self.tower.final_norm
        return self.subs[i].norm or self.subs[i].module

    def run(
        self,
        block: int,
        stream: torch.Tensor | None,
        masked: list[Sublayer],
        capture: dict[str, str],
        stop: str,
    ) -> dict[str, torch.Tensor]:
        """Inject ``stream`` (all windows) at block ``block``'s input (``None``: run from the embeddings),
        mask ``masked`` and every branch of earlier blocks, capture the inputs of ``capture``'s modules
        (name -> path) and stop at ``stop``'s input; returns name -> [windows, seq, d]."""
        before = [s for b in self.tower.blocks[:block] for s in b.sublayers] if stream is not None else []
        ids = {s.id for s in before}
        mask = before + [s for s in masked if s.id not in ids]
        got: dict[str, list[torch.Tensor]] = {name: [] for name in capture}
        cur: dict[str, Any] = {}

        def injector(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return _replace_first(args, kwargs, cur["x"])

        by_path: dict[str, list[str]] = {}
        for name, path in capture.items():
            by_path.setdefault(path, []).append(name)
        by_path.setdefault(stop, [])

        def catcher(names: list[str], raise_stop: bool) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = first_tensor(args, kwargs).detach().clone()
                for name in names:
                    got[name].append(x)
                if raise_stop:
                    raise _Stop

            return hook

        with self.masked(self.model, mask):
            handles = []
            try:
                if stream is not None:
                    blk = get_module(self.model, self.tower.blocks[block].module)
                    handles.append(blk.register_forward_pre_hook(injector, with_kwargs=True))
                for path, names in by_path.items():
                    m = get_module(self.model, path)
                    handles.append(
                        m.register_forward_pre_hook(catcher(names, path == stop), with_kwargs=True)
                    )
                for start in range(0, self.windows.shape[0], self.batch_size):
                    sl = slice(start, start + self.batch_size)
                    if stream is not None:
                        cur["x"] = stream[sl]
                    try:
                        self.model(input_ids=self.windows[sl], use_cache=False)
                    except _Stop:
                        pass
            finally:
                for h in handles:
                    h.remove()
        return {name: torch.cat(parts) for name, parts in got.items()}


def _solve(
    A: torch.Tensor, D: torch.Tensor, w: torch.Tensor, held: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    """Ridge ``dW`` of ``min sum_t w_t ||A_t dW^T - D_t||^2``: strength chosen on the ``held`` rows, then
    refit on all rows; returns (ridge, held-out gain, dW [out, in]) with a zero dW when nothing helps."""
    f64 = torch.float64
    sw = w.sqrt().to(f64)[:, None]
    A, D = A.to(f64) * sw, D.to(f64) * sw
    fa, fd, ha, hd = A[~held], D[~held], A[held], D[held]
    G, C = fa.T @ fa, fa.T @ fd
    Gh, Ch, dd = ha.T @ ha, ha.T @ hd, (hd * hd).sum()
    eye = torch.eye(G.shape[0], dtype=f64)

    def fit(G_: torch.Tensor, C_: torch.Tensor, lam: float) -> torch.Tensor:
        reg = lam * G_.diagonal().mean().clamp_min(1e-12)
        out: torch.Tensor = torch.linalg.solve(G_ + reg * eye, C_)
        return out  # [in, out]

    best = (REFIT_RIDGE_GRID[-1], float("-inf"))
    if held.any() and dd > 0:
        for lam in REFIT_RIDGE_GRID:
            X = fit(G, C, lam)
            res = (X * (Gh @ X)).sum() - 2 * (X * Ch).sum() + dd
            gain = float(1 - res / dd)
            if gain > best[1]:
                best = (lam, gain)
    lam, gain = best
    if not gain > 0:
        return lam, gain, torch.zeros(D.shape[1], A.shape[1], dtype=f64)
    return lam, gain, fit(G + Gh, C + Ch, lam).T


@torch.inference_mode()
def stream_refit(
    model: nn.Module,
    ir: ModelIR,
    resolved: Any,
    windows: torch.Tensor,
    *,
    masked: BranchMask,
    depth: int | None = DEFAULT_DEPTH,
    objective: RefitObjective = "lsq",
    batch_size: int = 8,
) -> list[RefitStep]:
    """Refit the writers around every gap a plan leaves, in place, before the surgery (see the module doc).

    ``resolved`` has ``blocks`` and ``sublayers`` (:class:`~prunekit_core.surgery.apply.Resolved`).
    ``masked(model, branches)`` removes branches for the duration of a context
    (:func:`~prunekit_core.surgery.apply.branches_masked`). ``depth``: surviving writers refitted after
    each gap (``None``: all of them). ``objective``: ``lsq`` (stream error) or ``cosine`` (relative error
    per token). Returns one :class:`RefitStep` per writer considered.
    """
    blocks = ir.block_map()
    removed: set[str] = set(resolved.sublayers)
    for bid in resolved.blocks:
        removed |= {s.id for s in blocks[bid].sublayers}
    held = (
        (torch.arange(windows.shape[0]) % 4 == 3)
        if windows.shape[0] >= 4
        else torch.zeros(0, dtype=torch.bool)
    )
    steps: list[RefitStep] = []
    for tower in ir.towers:
        subs = [s for b in tower.blocks for s in b.sublayers]
        if not any(s.id in removed for s in subs):
            continue
        if tower.final_norm is None:
            raise PlanError(
                f"the stream refit fits on the token windows' pass through the language model; tower "
                f"{tower.name!r} is read from its hidden states and is not refitted. Use --repair none (API: "
                "repair='none') for plans that remove its units, or --scope text"
            )
        if not _sequential(tower):
            log.info("tower %s: branches in parallel on the stream; the stream refit leaves it", tower.name)
            continue
        writers = refit_writers(tower, removed, depth)
        steps += _refit_tower(model, tower, windows, masked, removed, writers, objective, held, batch_size)
    return steps


def _refit_tower(
    model: nn.Module,
    tower: Tower,
    windows: torch.Tensor,
    masked: BranchMask,
    removed: set[str],
    writers: list[_Writer],
    objective: RefitObjective,
    held_windows: torch.Tensor,
    batch_size: int,
) -> list[RefitStep]:
    run = _Runner(model, tower, windows, masked, batch_size)
    subs = run.subs
    gone = [s for s in subs if s.id in removed]
    n_blocks = len(tower.blocks)

    def block_input(bi: int) -> int:
        return run.first[bi] if bi < n_blocks else len(subs)

    if not writers:
        return []
    # teacher: the unpruned model's stream at every writer's end point, from one pass (the blocks are run
    # whole here, not from injected streams, so a block may read anything its forward reads)
    # the pruned stream starts at the first block that differs from the unpruned one: the first gap, or the
    # first writer if that comes earlier (a writer before the gap may be unfoldable: an MoE, a post-norm)
    first_gone = min(bi for bi, b in enumerate(tower.blocks) for x in b.sublayers if x.id in removed)
    start_block = min(writers[0].block, first_gone)
    need = sorted({w.end for w in writers} | {block_input(start_block)})
    paths = {str(p): run.point_path(p) for p in need}
    got_t = run.run(0, None, [], paths, run.point_path(need[-1]))
    teacher = {int(k): v for k, v in got_t.items()}
    # the pruned model's stream at block s_block's input: equal to the teacher's up to the first writer
    s_block = start_block
    s_stream: torch.Tensor | None = teacher.pop(block_input(s_block)) if s_block > 0 else None
    steps: list[RefitStep] = []
    held = (
        held_windows[:, None].expand(windows.shape[0], windows.shape[1]).reshape(-1)
        if held_windows.numel()
        else None
    )
    for w in writers:
        if s_block < w.block:
            path = run.point_path(block_input(w.block))
            s_stream = run.run(s_block, s_stream, gone, {"x": path}, path)["x"]
            s_block = w.block
        proj = get_module(model, w.sub.out_proj or "")
        if not isinstance(proj, nn.Linear):
            raise PlanError(
                f"{w.sub.out_proj} is a {type(proj).__name__}; the stream refit needs an nn.Linear"
            )
        end_path = run.point_path(w.end)
        got = run.run(s_block, s_stream, gone, {"A": w.sub.out_proj or "", "end": end_path}, end_path)
        A = got["A"].reshape(-1, proj.in_features)
        target = teacher[w.end].reshape(-1, proj.out_features)
        D = (target - got["end"].reshape(-1, proj.out_features)) / w.sub.write.scale
        weight = (
            1.0 / (target.double() * target.double()).sum(-1).clamp_min(1e-12)
            if objective == "cosine"
            else torch.ones(A.shape[0], dtype=torch.float64)
        )
        hold = held if held is not None else torch.zeros(A.shape[0], dtype=torch.bool)
        lam, gain, dw = _solve(A, D, weight, hold)
        applied = bool(gain > 0)
        if applied:
            proj.weight += dw.to(proj.weight.dtype)
        steps.append(RefitStep(w.sub.id, w.sub.out_proj or "", lam, gain, applied))
        log.info(
            "refit %s (ridge %g, held-out gain %.3f%s)",
            w.sub.out_proj,
            lam,
            gain,
            "" if applied else ", left",
        )
        if not any(v.end == w.end for v in writers if v.index > w.index):
            teacher.pop(w.end, None)
    return steps
