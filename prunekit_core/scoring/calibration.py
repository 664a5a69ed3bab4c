"""Calibration: one forward pass for every similarity metric, and cheap removal trials.

:func:`calibrate` runs the model once over the calibration windows with hooks on the residual stream. At
every point where a branch reads the stream (the input of its pre-norm) and at the end of the stack (the
input of the final norm) it records, on the fly, the mean cosine similarity between consecutive points,
between the two ends of every block, and the last-token states at block boundaries. Memory stays at one
batch of activations whatever the depth.

:class:`TrialRunner` measures calibration loss with branches masked. It caches the input of every block
once and replays only the blocks after the first masked one, with the keyword arguments (rotary
embeddings, masks) captured from the real forward, so a trial never re-runs the prefix or copies the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import ArchitectureAdapter, first_tensor, get_module
from ..ir.errors import CalibrationError, PlanError
from ..ir.model import Block, ModelIR, Sublayer, Tower
from ..ir.plan import Fingerprint, fingerprint
from ..surgery.apply import branches_masked
from ..surgery.repair import WIDTH_STATS, WidthStats, width_collector
from ..surgery.width import group_slices

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .metrics import ChannelMetric, ImportanceMetric


@dataclass
class StreamStats:
    """Statistics of one tower's residual stream over the calibration tokens."""

    tower: str
    point_after: list[str]  # point p+1 is the stream after sublayer ``point_after[p]``
    sub_cos: dict[str, float]  # sublayer id -> mean cos(x_in, x_in + branch)
    block_cos: dict[str, float]  # block id -> mean cos(x_in, x_out)
    boundary_last: torch.Tensor  # [windows, blocks + 1, hidden] last-token stream at block boundaries
    tokens: int


@dataclass
class Calibration:
    """Everything the activation metrics need, from one pass; plus the windows for trials."""

    windows: torch.Tensor
    towers: dict[str, StreamStats] = field(default_factory=dict)
    #: further per-window model inputs the windows were run with (e.g. ``pixel_values``)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: results of :class:`BlockObserver` s by metric name: scores a streaming pass computed while each
    #: block was loaded (``{family id: group scores}`` of a channel metric, ``{unit id: score}`` otherwise)
    observed: dict[str, Any] = field(default_factory=dict)
    #: set by a streaming pass (:func:`~prunekit_core.scoring.streaming.stream_calibrate`), whose model is an empty
    #: skeleton with its blocks' weights on disk: builds the removal-trial runner that streams them
    #: (``f(ctx) -> runner``, what :meth:`ScoringContext.trials` returns)
    trial_factory: Callable[[ScoringContext], Any] | None = None
    #: set by a streaming pass: the weights fingerprint of the checkpoint the skeleton reads, sampled block
    #: by block (plans made on the skeleton carry it: :meth:`ScoringContext.fingerprint`)
    weights_digest: str | None = None

    @property
    def tokens(self) -> int:
        return int(self.windows.numel())


def _stream_points(tower: Tower) -> list[tuple[Sublayer | None, str]]:
    """Module whose first input is the stream at each point, in order (last: the final norm)."""
    pts: list[tuple[Sublayer | None, str]] = []
    for b in tower.blocks:
        for s in b.sublayers:
            pts.append((s, s.norm or s.module))
    if tower.final_norm is None:
        if not tower.blocks:
            raise CalibrationError(f"tower {tower.name} has no blocks and no final_norm; nothing to observe")
        # a tower read from its hidden states (a vision encoder): the stream ends at the last block's output
        pts.append((None, tower.blocks[-1].module))
    else:
        pts.append((None, tower.final_norm))
    return pts


def _remove_all(handles: Iterable[RemovableHandle]) -> None:
    for h in handles:
        h.remove()


def _cos(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Sum over tokens of cos(a, b) from the streams and their norms (as F.cosine_similarity, eps 1e-8),
    without recomputing norms: one dot product per token."""
    dot: torch.Tensor = torch.linalg.vecdot(a[0], b[0])
    return (dot / (a[1] * b[1]).clamp_min(1e-8)).double().sum()


class TowerRecorder:
    """Accumulates one tower's stream statistics from pre-hooks at its stream points."""

    def __init__(self, tower: Tower) -> None:
        self.tower = tower
        self.points = _stream_points(tower)
        self.sub_ids = [s.id for s, _ in self.points[:-1] if s is not None]
        bounds: list[int] = []
        idx = 0
        for b in tower.blocks:
            bounds.append(idx)
            idx += len(b.sublayers)
        bounds.append(idx)
        self.block_of_point = {pt: bi for bi, pt in enumerate(bounds)}
        self.n_bounds = len(bounds)
        self.sub_sum = torch.zeros(len(self.points) - 1, dtype=torch.float64)
        self.blk_sum = torch.zeros(len(tower.blocks), dtype=torch.float64)
        self.lasts: list[torch.Tensor] = []
        # (stream, its per-token norms): each point's norm is computed once and reused by the next point
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.block_in: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ntok = 0  # positions seen on this stream (a vision tower sees patches, not text tokens)
        self.batch = -1
        self._saved: list[tuple[Any, Any]] = []

    def start_batch(self, batch: int) -> None:
        if self.batch >= 0:
            self._saved[self.batch] = (self.prev, self.block_in)
        self.prev = None
        self.block_in = None
        self.lasts.append(torch.zeros(batch, self.n_bounds, self.tower.width.size))
        self._saved.append((None, None))
        self.batch = len(self.lasts) - 1

    def select_batch(self, j: int) -> None:
        """Continue batch ``j`` (streaming runs every batch through one block before the next block)."""
        self._saved[self.batch] = (self.prev, self.block_in)
        self.prev, self.block_in = self._saved[j]
        self.batch = j

    def hook(self, p: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def fn(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_tensor(args, kwargs).float()
            lasts = self.lasts[self.batch]
            x = x.reshape(lasts.shape[0], -1, x.shape[-1])  # some models flatten tokens (OPT)
            if p == 0:
                self.ntok += x.shape[0] * x.shape[1]
            cur = (x, torch.linalg.vector_norm(x, dim=-1))
            if self.prev is not None:
                self.sub_sum[p - 1] += _cos(self.prev, cur)
            self.prev = cur
            bi = self.block_of_point.get(p)
            if bi is not None:
                lasts[:, bi] = x[:, -1]
                if bi > 0 and self.block_in is not None:
                    self.blk_sum[bi - 1] += _cos(self.block_in, cur)
                self.block_in = cur

        return fn

    def result(self) -> StreamStats:
        ntok = self.ntok
        return StreamStats(
            tower=self.tower.name,
            point_after=self.sub_ids,
            sub_cos={sid: float(self.sub_sum[i] / ntok) for i, sid in enumerate(self.sub_ids)},
            block_cos={b.id: float(self.blk_sum[i] / ntok) for i, b in enumerate(self.tower.blocks)},
            boundary_last=torch.cat(self.lasts),
            tokens=ntok,
        )


def hook_point(model: nn.Module, rec: TowerRecorder, p: int, path: str) -> Any:
    """Observe stream point ``p``: the input of a norm/branch, or the output of a tower's last block."""
    module = get_module(model, path)
    if p == len(rec.points) - 1 and rec.tower.final_norm is None:
        fn = rec.hook(p)
        return module.register_forward_hook(
            lambda m, _a, out: fn(m, (out[0] if isinstance(out, tuple) else out,), {})
        )
    return module.register_forward_pre_hook(rec.hook(p), with_kwargs=True)


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    ir: ModelIR,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    inputs: dict[str, torch.Tensor] | None = None,
) -> Calibration:
    """Run ``windows`` ([n, seq_len] token ids) through ``model`` once and collect stream statistics.

    ``inputs`` are further per-window model inputs, batched along their first axis with the windows (a
    multimodal model's ``pixel_values``, one image per window): every tower's stream is observed.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise CalibrationError(
            f"calibration needs token windows [n, seq_len >= 2], got {tuple(windows.shape)}"
        )
    recorders = [TowerRecorder(t) for t in ir.towers if t.blocks]
    handles = [hook_point(model, rec, p, path) for rec in recorders for p, (_, path) in enumerate(rec.points)]
    try:
        for start in progress_bar(range(0, windows.shape[0], batch_size), progress, "calibrating"):
            batch = windows[start : start + batch_size]
            extra = {k: v[start : start + batch_size] for k, v in (inputs or {}).items()}
            for rec in recorders:
                rec.start_batch(batch.shape[0])
            model(input_ids=batch, use_cache=False, **extra)
    finally:
        for h in handles:
            h.remove()
    cal = Calibration(windows=windows, inputs=dict(inputs or {}))
    for rec in recorders:
        if rec.ntok:  # a tower the inputs did not reach (a vision tower without images) has no statistics
            cal.towers[rec.tower.name] = rec.result()
    return cal


def progress_bar(it: Iterable[Any], enabled: bool, label: str) -> Iterable[Any]:
    """``it``, with a rich progress bar labelled ``label`` when ``enabled``."""
    if not enabled:
        return it
    from rich.progress import track

    seq = list(it)
    return track(seq, description=label, transient=True)


def stream_loss(
    norm: nn.Module, head: nn.Module, x: torch.Tensor, labels: torch.Tensor, stride: int
) -> float:
    """Next-token loss of the stream end ``x`` on every ``stride``-th position (``labels`` already strided):
    the loss every trial runner measures."""
    h = norm(x[:, :-1])
    if stride > 1:
        h = h[:, ::stride]
    logits = head(h).float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))


class TrialRunner:
    """Calibration loss of ``model`` with some blocks skipped and some branches masked.

    Block inputs are cached for the text tower of a causal LM (the head consumes its stream), so a trial
    there replays only the blocks after the first removal. Units of other towers (a vision encoder that
    feeds the language model through image tokens) are measured by a full forward with ``inputs`` (the
    images) and those units bypassed or masked; once one of them is committed, every later trial runs the
    full forward, since the cached text inputs no longer hold.
    ``loss_positions`` subsamples the positions whose next-token loss is measured (the LM head over a
    49k vocabulary costs as much as several blocks); every position still flows through attention.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        windows: torch.Tensor,
        *,
        tower: str = "text",
        loss_stride: int = 1,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.extra = dict(inputs or {})  # further per-window inputs (images) for the capture pass
        self.adapter = adapter
        self.ir = adapter.build_ir(model)
        self.tower = self.ir.tower(tower)
        if not self.tower.final_norm or not self.tower.head:
            raise CalibrationError(f"tower {tower} has no final norm/head; trials need a language-model head")
        self.windows = windows
        self.loss_stride = max(1, loss_stride)
        self.blocks = [get_module(model, b.module) for b in self.tower.blocks]
        self.norm = get_module(model, self.tower.final_norm)
        self.head = get_module(model, self.tower.head)
        self.skipped: set[str] = set()
        self.masked: set[str] = set()
        self.foreign = False  # a committed unit outside the cached tower: trials run full forwards
        self.trials = 0
        self.block_forwards = 0  # block calls, the capture pass included: the cost of every trial
        self._capture()

    # The cached state ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _capture(self) -> None:
        """One real forward: the input and keyword arguments of every block."""
        inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        kwargs_of: list[dict[str, Any] | None] = [None] * len(self.blocks)

        def make_hook(i: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                inputs[i] = first_tensor(args, kwargs)
                self.block_forwards += 1
                kw = dict(kwargs)
                kw.pop("hidden_states", None)
                kwargs_of[i] = {"__args__": args[1:], **kw}

            return hook

        final: list[torch.Tensor] = []

        def grab_final(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_tensor(args, kwargs)
            final.append(x.reshape(self.windows.shape[0], -1, x.shape[-1]))

        handles = [
            b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)
        ]
        handles.append(self.norm.register_forward_pre_hook(grab_final, with_kwargs=True))
        try:
            self.model(input_ids=self.windows, use_cache=False, **self.extra)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in inputs):
            raise CalibrationError("some blocks did not run during the trial capture pass")
        # every block ran (checked above): its hook filled both lists
        self.inputs: list[torch.Tensor] = [x for x in inputs if x is not None]
        self.kwargs: list[dict[str, Any]] = [k for k in kwargs_of if k is not None]
        labels = self.windows[:, 1:]
        self.labels = labels[:, :: self.loss_stride] if self.loss_stride > 1 else labels
        # the capture pass ran the whole model: its stream end gives the base loss, no second pass
        self.base_loss = self._loss(final[-1]) if final else self._run_from(0, set(), set())

    def _call_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        kw = dict(self.kwargs[i])
        args = kw.pop("__args__")
        self.block_forwards += 1
        out = self.blocks[i](x, *args, **kw)
        y: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return y

    def _subs(self, ids: Iterable[str]) -> list[Sublayer]:
        subs = self.ir.sublayer_map()
        return [subs[i] for i in ids]

    @torch.inference_mode()
    def _run_from(self, start: int, skipped: set[str], masked: set[str]) -> float:
        x = self.inputs[start]
        with branches_masked(self.model, self._subs(masked)):
            for i in range(start, len(self.blocks)):
                if self.tower.blocks[i].id in skipped:
                    continue
                x = self._call_block(i, x)
        return self._loss(x)

    def _loss(self, x: torch.Tensor) -> float:
        return stream_loss(self.norm, self.head, x, self.labels, self.loss_stride)

    # Public -------------------------------------------------------------------------------------------

    def block_index(self, unit_id: str) -> int:
        for i, b in enumerate(self.tower.blocks):
            if unit_id == b.id or unit_id.startswith(b.id + "."):
                return i
        raise KeyError(f"{unit_id} is not in tower {self.tower.name}")

    def _local(self, unit_id: str) -> bool:
        return any(unit_id == b.id or unit_id.startswith(b.id + ".") for b in self.tower.blocks)

    def _split(self, units: set[str]) -> tuple[set[str], set[str]]:
        """(blocks, sublayers) among ``units``, in any tower; unknown ids are an error."""
        known = self.ir.units()
        unknown = sorted(u for u in units if u not in known)
        if unknown:
            raise PlanError(f"removal trials got unknown unit ids {unknown[:3]}")
        blocks = {u for u in units if u in {b.id for b in self.ir.blocks()}}
        return blocks, units - blocks

    @torch.inference_mode()
    def _full_loss(self, units: set[str]) -> float:
        """Calibration loss of a full forward (with ``inputs``) with ``units`` bypassed or masked."""
        blocks, subs = self._split(units)
        known = self.ir.units()

        def bypass(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            return (x, *out[1:]) if isinstance(out, tuple) else x

        handles = [
            get_module(self.model, known[b].module).register_forward_hook(bypass, with_kwargs=True)
            for b in blocks
        ]
        try:
            with branches_masked(self.model, self._subs(subs)):
                logits = self.model(input_ids=self.windows, use_cache=False, **self.extra).logits
        finally:
            for h in handles:
                h.remove()
        logits = logits[:, :-1]
        if self.loss_stride > 1:
            logits = logits[:, :: self.loss_stride]
        logits = logits.float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.labels.reshape(-1)))

    def loss(self, remove: Iterable[str] = (), *, start: str | None = None) -> float:
        """Calibration loss with the committed removals plus ``remove`` (block or sublayer ids).

        ``start``: a unit from whose block on the caller edited weights in place; the replay starts there
        (or at the first removal, whichever comes first)."""
        extra = set(remove)
        if not extra and start is None:
            return self.current_loss
        self.trials += 1
        firsts = [*extra, *([start] if start else [])]
        if self.foreign or not all(self._local(u) for u in firsts):
            return self._full_loss(self.skipped | self.masked | extra)
        blocks, subs = self._split(extra)
        first = min(self.block_index(u) for u in firsts)
        return self._run_from(first, self.skipped | blocks, self.masked | subs)

    def replay(self, unit_id: str) -> float:
        """Calibration loss after an in-place change inside ``unit_id``'s block (e.g. a weight temporarily
        edited by a caller), with the committed removals; replays only from that block."""
        self.trials += 1
        if self.foreign or not self._local(unit_id):
            return self._full_loss(self.skipped | self.masked)
        return self._run_from(self.block_index(unit_id), self.skipped, self.masked)

    def commit(self, remove: Iterable[str]) -> None:
        """Make removals permanent for later trials and refresh the cached block inputs after them."""
        extra = set(remove)
        if not extra:
            return
        blocks, subs = self._split(extra)
        self.skipped |= blocks
        self.masked |= subs
        if self.foreign or not all(self._local(u) for u in extra):
            self.foreign = True
            self._current = self._full_loss(self.skipped | self.masked)
            return
        start = min(self.block_index(u) for u in extra)
        self._refresh_from(start)

    @torch.inference_mode()
    def _refresh_from(self, start: int) -> None:
        x = self.inputs[start]
        with branches_masked(self.model, self._subs(self.masked)):
            for i in range(start, len(self.blocks)):
                self.inputs[i] = x
                if self.tower.blocks[i].id in self.skipped:
                    continue
                x = self._call_block(i, x)
        self._current = self._loss(x)

    @property
    def current_loss(self) -> float:
        return getattr(self, "_current", self.base_loss)


class _StopForward(Exception):
    """Ends a forward pass at the stream's end (the final norm's input)."""


class NaiveTrialRunner:
    """The reference for :class:`TrialRunner`: one full model evaluation per trial (embeddings, every
    kept block, head), no cached inputs. Same interface and same loss; used by tests and ``bench/perf.py``
    to check and measure what the cache saves."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        windows: torch.Tensor,
        *,
        tower: str = "text",
        loss_stride: int = 1,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.extra = dict(inputs or {})  # further per-window inputs (images), as TrialRunner takes them
        self.ir = adapter.build_ir(model)
        self.tower = self.ir.tower(tower)
        self.windows = windows
        self.loss_stride = max(1, loss_stride)
        labels = windows[:, 1:]
        self.labels = labels[:, :: self.loss_stride] if self.loss_stride > 1 else labels
        self.norm = get_module(model, self.tower.final_norm or "")
        self.head = get_module(model, self.tower.head or "")
        self.trials = 0
        self.block_forwards = 0
        self.skipped: set[str] = set()
        self.masked: set[str] = set()
        self._current = self._evaluate(set(), set())
        self.base_loss = self._current

    @torch.inference_mode()
    def _evaluate(self, skipped: set[str], masked: set[str]) -> float:
        """Loss of the full model with blocks ``skipped`` (bypassed) and branches ``masked``."""
        subs = self.ir.sublayer_map()
        ids = {b.id: i for i, b in enumerate(self.tower.blocks)}
        blocks = [get_module(self.model, b.module) for b in self.tower.blocks]
        out: list[torch.Tensor] = []
        template: list[Any] = []

        def bypass(*args: Any, **kwargs: Any) -> Any:  # a skipped block: its input, as the block returns
            x = first_tensor(args, kwargs)
            return (x, *self._template[1:]) if isinstance(self._template, tuple) else x

        def count(_m: nn.Module, _a: Any, _k: Any) -> None:
            self.block_forwards += 1

        def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
            out.append(args[0])
            raise _StopForward  # the head runs below on the loss positions only, as in TrialRunner

        handles = [b.register_forward_pre_hook(count, with_kwargs=True) for b in blocks]
        handles.append(self.norm.register_forward_pre_hook(grab))
        if not hasattr(self, "_template"):
            handles.append(blocks[0].register_forward_hook(lambda _m, _a, r: template.append(r)))
        for u in skipped:
            blocks[ids[u]].forward = bypass
        try:
            with branches_masked(self.model, [subs[u] for u in masked]):
                self.model(input_ids=self.windows, use_cache=False, **self.extra)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            for u in skipped:
                del blocks[ids[u]].forward
        if template:
            self._template = template[0]
        self.block_forwards -= len(skipped)  # bypassed blocks ran no computation
        return stream_loss(self.norm, self.head, out[-1], self.labels, self.loss_stride)

    def _split(self, ids: set[str]) -> tuple[set[str], set[str]]:
        blocks = {u for u in ids if u in {b.id for b in self.tower.blocks}}
        return blocks, ids - blocks

    def loss(self, remove: Iterable[str] = (), *, start: str | None = None) -> float:
        extra = set(remove)
        if not extra and start is None:
            return self._current
        self.trials += 1
        blocks, subs = self._split(extra)
        return self._evaluate(self.skipped | blocks, self.masked | subs)

    def commit(self, remove: Iterable[str]) -> None:
        blocks, subs = self._split(set(remove))
        self.skipped |= blocks
        self.masked |= subs
        self._current = self._evaluate(self.skipped, self.masked)

    @property
    def current_loss(self) -> float:
        return self._current


@dataclass
class ScoringContext:
    """What a metric may use. ``candidates`` limits trial metrics to some units (planners set it)."""

    model: nn.Module
    adapter: ArchitectureAdapter
    ir: ModelIR
    calibration: Calibration
    candidates: list[str] | None = None
    trial_windows: int = 8
    loss_stride: int = 4
    naive_trials: bool = False
    _trials: TrialRunner | NaiveTrialRunner | None = None
    #: a per-block context of a streaming pass: statistics come only from the hooks that ran with the block
    frozen: bool = False
    _taylor: dict[str, torch.Tensor] | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frozen or self.calibration.trial_factory is not None:
            return
        if any(p.is_meta for p in self.model.parameters()):
            raise PlanError(
                "the model's weights are on the meta device (a streaming skeleton from open_streaming): score "
                "or plan it with the calibration of its streaming pass (stream_calibrate; --streaming on the "
                "command line), not with one made without it"
            )

    def cached(self, key: str, compute: Any) -> Any:
        """``compute()``, run once per context and shared by every metric that asks for ``key``.

        Plugin metrics that need their own calibration statistics collect them here in one pass for all
        of them (e.g. routing statistics for every expert metric).
        """
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def streaming(self) -> bool:
        """Whether ``model`` is a streaming skeleton (:func:`~prunekit_core.scoring.streaming.open_streaming`) and the
        calibration its streaming pass: the blocks' weights stay on disk, and only a streaming pass sees
        them, one block at a time."""
        return self.calibration.trial_factory is not None

    def fingerprint(self, ir: ModelIR | None = None) -> Fingerprint:
        """The fingerprint of the model a plan made here is for (of a streaming skeleton: of the checkpoint
        it reads, with the weights digest its streaming pass sampled)."""
        return fingerprint(self.model, ir or self.ir, weights=self.calibration.weights_digest)

    def trials(self) -> TrialRunner | NaiveTrialRunner:
        """The shared removal-trial runner (built on first use from the first ``trial_windows`` windows);
        :class:`NaiveTrialRunner` when ``naive_trials`` is set (reference and benchmarks); a streaming pass's
        runner (:attr:`Calibration.trial_factory`) on a streaming skeleton."""
        factory = self.calibration.trial_factory
        if self._trials is None and factory is not None:
            self._trials = factory(self)
        if self._trials is None:
            cls = NaiveTrialRunner if self.naive_trials else TrialRunner
            self._trials = cls(
                self.model,
                self.adapter,
                self.calibration.windows[: self.trial_windows],
                loss_stride=self.loss_stride,
                inputs={k: v[: self.trial_windows] for k, v in self.calibration.inputs.items()},
            )
        return self._trials

    def observed(self, key: str, collector: Collector) -> Any:
        """The statistics ``collector`` accumulates over the calibration windows, shared by every metric that
        asks for ``key``: one forward pass over the windows (batches of 8) with its hooks on, run once per
        context. In a streaming pass's per-block context (:class:`BlockScorer`) the hooks were on while the
        block ran, and only that block's modules were observed."""
        if key not in self._cache:
            if self.streaming:  # blocks on disk
                raise PlanError(
                    f"statistics {key!r} are collected while each block is loaded in a streaming pass; this "
                    "step reads them for the whole model: pass the metric (or the planner's observer) to "
                    "stream_calibrate, or drop --streaming"
                )
            if self.frozen:
                raise CalibrationError(
                    f"statistics {key!r} were not collected while this block ran: the metric must name "
                    "their collector in collectors()"
                )
            stats, handles = collector(self.model, self.ir, self.calibration.windows)
            windows = self.calibration.windows
            try:
                with torch.inference_mode():
                    for start in range(0, windows.shape[0], 8):
                        self.model(input_ids=windows[start : start + 8], use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            self._cache[key] = stats
        return self._cache[key]

    def group_scores(self, metric: Any) -> dict[str, torch.Tensor]:
        """``metric.score_groups(self)``, or what a streaming pass computed for it block by block."""
        if metric.name in self.calibration.observed:
            return dict(self.calibration.observed[metric.name])
        if self.streaming:  # no weights here
            raise PlanError(
                f"metric {metric.name!r} reads weights or per-block statistics, which a streaming pass computes "
                f"while each block is loaded: pass it to stream_calibrate(..., metrics=[{metric.name!r}])"
            )
        scores: dict[str, torch.Tensor] = metric.score_groups(self)
        return scores

    def width_stats(self) -> WidthStats:
        """Input statistics of every channel-group member (one pass over the calibration windows)."""
        stats: WidthStats = self.observed(WIDTH_STATS, width_collector)
        return stats

    def taylor_grads(self) -> dict[str, torch.Tensor]:
        """Calibration-loss gradients of every channel-group member parameter (one backward pass)."""
        if self._taylor is None:
            self._taylor = taylor_grads(self.model, self.ir, self.calibration.windows)
        return self._taylor

    def all_stats(self) -> list[StreamStats]:
        """The statistics of every tower the calibration pass observed, in the IR's tower order."""
        if not self.calibration.towers:
            raise CalibrationError("no calibration statistics; run calibrate() first")
        return [self.calibration.towers[t.name] for t in self.ir.towers if t.name in self.calibration.towers]

    def stats(self, tower: str = "text") -> StreamStats:
        if tower not in self.calibration.towers:
            raise CalibrationError(f"no calibration statistics for tower {tower!r}; run calibrate() first")
        return self.calibration.towers[tower]


def taylor_grads(
    model: nn.Module, ir: ModelIR, windows: torch.Tensor, *, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Gradient of the mean calibration loss w.r.t. every channel-group member parameter."""
    params: dict[str, torch.Tensor] = {}
    for _, fam in ir.channel_groups().values():
        for member, t in group_slices(model, fam):
            params[member.param] = t
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in params.values():
            t.requires_grad_(True)
            t.grad = None
        n = windows.shape[0]
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size]
                out = model(input_ids=batch, labels=batch, use_cache=False)
                (out.loss * batch.shape[0] / n).backward()
        for name, t in params.items():
            if t.grad is not None:
                grads[name] += t.grad.double()
                t.grad = None
    finally:
        for n_, p in model.named_parameters():
            p.requires_grad_(saved[n_])
    return grads


# ---------------------------------------------------------------------------------------------------------
# Block by block: metrics that read a block's weights or statistics, computed while the block is loaded

#: registers hooks on ``model``'s modules named in ``ir`` (the whole model, or one block's families in a
#: streaming pass) that accumulate statistics into the returned object while ``windows`` run; the caller
#: runs the windows and removes the handles
Collector = Callable[[nn.Module, ModelIR, torch.Tensor], "tuple[Any, list[RemovableHandle]]"]


@dataclass
class BlockView:
    """One block of a calibration pass, while its weights are loaded.

    ``ir`` is the model's IR with the channel-group families of every other block (and of the stages)
    taken out, so a metric's ``score_groups`` on a context over it scores only this block's families.
    """

    model: nn.Module
    adapter: ArchitectureAdapter
    ir: ModelIR
    tower: Tower
    block: Block
    index: int
    windows: torch.Tensor


def block_ir(ir: ModelIR, block_id: str | None) -> ModelIR:
    """``ir`` with only the channel-group families of block ``block_id`` (``None``: of the stages only)."""
    towers = []
    for t in ir.towers:
        blocks = tuple(
            b
            if b.id == block_id
            else b.model_copy(
                update={"sublayers": tuple(s.model_copy(update={"channel_groups": ()}) for s in b.sublayers)}
            )
            for b in t.blocks
        )
        stages = (
            t.stages
            if block_id is None
            else tuple(st.model_copy(update={"channel_groups": ()}) for st in t.stages)
        )
        towers.append(t.model_copy(update={"blocks": blocks, "stages": stages}))
    return ir.model_copy(update={"towers": tuple(towers)})


class BlockObserver(ABC):
    """Sees every block of a calibration pass in order, while the block is loaded.

    ``observe(view)`` is entered before the block runs the calibration batches (register hooks there) and
    left after them, with the block still loaded (read its weights and the statistics then). A streaming
    pass keeps one block in memory, so whatever an observer keeps across blocks must not grow with the
    block's weights. ``results()`` gives, by metric name, what goes to :attr:`Calibration.observed`.
    """

    @abstractmethod
    def observe(self, view: BlockView) -> AbstractContextManager[None]:
        """Hooks on while the block runs its batches; scores of the block's units when left."""

    def finish(self, model: nn.Module, adapter: ArchitectureAdapter, ir: ModelIR) -> None:  # noqa: B027
        """After the last block (weights outside the blocks are loaded): e.g. the stages' families."""

    @abstractmethod
    def results(self) -> dict[str, Any]:
        """Metric name -> scores (what ``score_groups`` or ``score(...).values`` returns)."""


class BlockScorer(BlockObserver):
    """Channel metrics (``score_groups``) one block at a time: their statistics collectors are on while
    the block runs, then each metric scores the block's families on a context over the block's IR.
    Collectors are shared by key between metrics, as in an in-memory :class:`ScoringContext`."""

    def __init__(self, metrics: Sequence[ChannelMetric]) -> None:
        self.metrics = list(metrics)
        self.collectors: dict[str, Collector] = {}
        for m in self.metrics:
            self.collectors.update(m.collectors())
        self.scores: dict[str, dict[str, torch.Tensor]] = {m.name: {} for m in self.metrics}

    def _context(
        self, model: nn.Module, adapter: ArchitectureAdapter, ir: ModelIR, windows: torch.Tensor
    ) -> ScoringContext:
        return ScoringContext(
            model=model, adapter=adapter, ir=ir, calibration=Calibration(windows=windows), frozen=True
        )

    def _score(self, ctx: ScoringContext) -> None:
        for m in self.metrics:
            self.scores[m.name].update(m.score_groups(ctx))

    @contextmanager
    def observe(self, view: BlockView) -> Iterator[None]:
        ctx = self._context(view.model, view.adapter, view.ir, view.windows)
        with ExitStack() as stack:
            for key, collector in self.collectors.items():
                stats, handles = collector(view.model, view.ir, view.windows)
                ctx._cache[key] = stats
                stack.callback(_remove_all, handles)
            yield
        self._score(ctx)

    def finish(self, model: nn.Module, adapter: ArchitectureAdapter, ir: ModelIR) -> None:
        if not ir.stage_channel_groups():
            return
        outside = block_ir(ir, None)
        ctx = self._context(model, adapter, outside, torch.zeros(0, 0, dtype=torch.long))
        for key, collector in self.collectors.items():  # nothing ran: statistics stay empty
            stats, handles = collector(model, outside, ctx.calibration.windows)
            for h in handles:
                h.remove()
            ctx._cache[key] = stats
        self._score(ctx)

    def results(self) -> dict[str, Any]:
        return dict(self.scores)


def block_observers(metrics: Sequence[ImportanceMetric]) -> list[BlockObserver]:
    """The observers that compute ``metrics`` block by block: one :class:`BlockScorer` for every channel
    metric that can (``streaming``), plus each other metric's own ``block_observer()``."""
    from .metrics import ChannelMetric

    channel = [m for m in metrics if isinstance(m, ChannelMetric) and m.streaming]
    out: list[BlockObserver] = [BlockScorer(channel)] if channel else []
    for m in metrics:
        if not isinstance(m, ChannelMetric) and (obs := m.block_observer()) is not None:
            out.append(obs)
    return out
