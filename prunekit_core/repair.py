"""Least-squares repair: fold what removed branches contributed into a surviving output projection.

For every run of consecutive removed branches on a residual stream, the nearest surviving branch before
the run that declares an ``out_proj`` (an ``nn.Linear`` writing into the stream, e.g. ``mlp.down_proj``)
absorbs the run's contribution: with ``A`` the inputs of that projection and ``D = x_after_run -
x_before_run`` on the calibration tokens, its weight gets ``dW = argmin ||A dW^T - D||^2 + lam ||dW||^2``.
Shapes never change, so a uniform plan still reloads with plain ``from_pretrained``.

Runs are processed front to back on the model with earlier runs already masked, so each fit sees the
stream its projection will really receive. The ridge strength is chosen per run on held-out calibration
tokens (every fourth window; with fewer than four windows a default strength) from a small grid, then refit on all tokens. Statistics are accumulated
batch by batch (``A^T A`` and ``A^T D``), so memory does not grow with the number of windows, and each
forward stops as soon as the run's end is observed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapter import get_module, module_attr
from .errors import CalibrationError, PlanError
from .ir import ModelIR, Sublayer
from .scoring import BlockObserver, BlockView, _first_tensor
from .surgery import Resolved, branches_masked

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_RIDGE = 0.1


@dataclass(frozen=True)
class RepairStep:
    """One run of removed branches and the projection that absorbed it."""

    removed: tuple[str, ...]
    writer: str
    ridge: float
    holdout_gain: float  # fraction of the held-out residual energy the fit explains


class _Stop(Exception):
    pass


@dataclass
class _Normal:
    """Normal equations of ``min ||A dW^T - D||^2``: ``A^T A``, ``A^T D`` and ``||D||^2``, in float64."""

    G: torch.Tensor
    C: torch.Tensor
    dd: torch.Tensor

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> _Normal:
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

    def __add__(self, other: _Normal) -> _Normal:
        return _Normal(self.G + other.G, self.C + other.C, self.dd + other.dd)

    def residual(self, dw: torch.Tensor) -> torch.Tensor:
        """``||A dW^T - D||^2 = tr(dW G dW^T) - 2 tr(dW C) + ||D||^2``."""
        return (dw @ self.G * dw).sum() - 2 * (dw * self.C.T).sum() + self.dd


def _runs(ir: ModelIR, removed: set[str]) -> list[tuple[Sublayer | None, list[Sublayer], str]]:
    """(writer, removed run, path whose input is the stream after the run) per run, per tower."""
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
            writer = next((s for s in reversed(subs[:i]) if s.out_proj and s.id not in removed), None)
            end_path = (subs[j].norm or subs[j].module) if j < len(subs) else tower.final_norm
            if end_path is None:
                raise PlanError(f"tower {tower.name} declares no final_norm; cannot repair its last branches")
            out.append((writer, subs[i:j], end_path))
            i = j
    return out


@torch.inference_mode()
def lsq_repair(
    model: nn.Module, ir: ModelIR, resolved: Resolved, windows: torch.Tensor, *, batch_size: int = 8
) -> list[RepairStep]:
    """Update surviving output projections in place so they absorb the removed branches' contribution.

    ``resolved`` are the removals (blocks count as all their sublayers). Call before the surgery.
    """
    blocks = ir.block_map()
    removed: set[str] = set(resolved.sublayers)
    for bid in resolved.blocks:
        removed |= {s.id for s in blocks[bid].sublayers}
    steps: list[RepairStep] = []
    done: list[Sublayer] = []
    for writer, run, end_path in _runs(ir, removed):
        if writer is None:
            log.info("no surviving projection before %s; left unrepaired", run[0].id)
            done.extend(run)
            continue
        proj = get_module(model, writer.out_proj or "")
        if not isinstance(proj, nn.Linear):
            raise PlanError(f"{writer.out_proj} is a {type(proj).__name__}; repair needs an nn.Linear")
        start_path = run[0].norm or run[0].module
        held = torch.arange(windows.shape[0]) % 4 == 3
        stats = {
            part: _accumulate(model, done, proj, start_path, end_path, windows[mask], batch_size)
            for part, mask in (("fit", ~held), ("hold", held))
        }
        ridge, gain, dw = _solve(stats["fit"], stats["hold"])
        with torch.no_grad():
            proj.weight += dw.to(proj.weight.dtype)
        steps.append(RepairStep(tuple(s.id for s in run), writer.out_proj or "", ridge, gain))
        log.info(
            "repaired %s into %s (ridge %g, held-out gain %.3f)", run[0].id, writer.out_proj, ridge, gain
        )
        done.extend(run)
    return steps


def _accumulate(
    model: nn.Module,
    masked: list[Sublayer],
    proj: nn.Linear,
    start_path: str,
    end_path: str,
    windows: torch.Tensor,
    batch_size: int,
) -> _Normal:
    stats = _Normal.zeros(proj.in_features, proj.out_features)
    cur: dict[str, Any] = {}

    def on_proj(_m: nn.Module, args: tuple[Any, ...]) -> None:
        cur["A"] = args[0]

    def on_start(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cur["x0"] = _first_tensor(args, kwargs)

    def on_end(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cur["x1"] = _first_tensor(args, kwargs)
        raise _Stop

    with branches_masked(model, masked):
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
                stats.add(cur["A"], cur["x1"] - cur["x0"])
        finally:
            for h in handles:
                h.remove()
    return stats


def _ridge_solve(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    reg = lam * G.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    solved: torch.Tensor = torch.linalg.solve(G + reg * eye, C)
    return solved.T  # [out, in]


def _solve(fit: _Normal, hold: _Normal) -> tuple[float, float, torch.Tensor]:
    """Ridge strength chosen on ``hold``, then the fit on both; returns (ridge, held-out gain, dW)."""
    best = (DEFAULT_RIDGE, float("nan"))  # too few windows to hold any out: default strength
    if hold.dd > 0:
        best = (RIDGE_GRID[-1], float("-inf"))
        for lam in RIDGE_GRID:
            gain = float(1 - hold.residual(_ridge_solve(fit.G, fit.C, lam)) / hold.dd)
            if gain > best[1]:
                best = (lam, gain)
    lam, gain = best
    both = fit + hold
    if gain <= 0:  # (False for nan) the fit does not generalise: leave the weights alone
        return lam, gain, torch.zeros(both.C.shape[1], both.C.shape[0], dtype=torch.float64)
    return lam, gain, _ridge_solve(both.G, both.C, lam)


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
    The ridge strength is chosen on held-out windows as in :func:`lsq_repair`. The value is
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
                part: _Normal.zeros(module_attr(w, "in_features"), module_attr(w, "out_features"))
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
                cur[i] = _first_tensor(args, kwargs)

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
                _, gain, dw = _solve(normals["fit"], normals["hold"])
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
            acc = {part: _Normal.zeros(d_in, view.tower.width.size) for part in ("fit", "hold")}
        dd = torch.zeros((), dtype=torch.float64)
        xx = torch.zeros((), dtype=torch.float64)
        feats: list[torch.Tensor] = []
        state: dict[str, Any] = {"x": None, "batch": 0, "row": 0}

        def on_start(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state["x"] = _first_tensor(args, kwargs)

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
            _, gain, dw = _solve(acc["fit"], acc["hold"])
            if gain > 0:
                resid = (acc["fit"] + acc["hold"]).residual(dw)
        self.values[block.id] = float(resid / xx.clamp_min(1e-30))
        self._feats = feats  # the next block folds into this block's writer

    def results(self) -> dict[str, Any]:
        return {self.name: dict(self.values)}
