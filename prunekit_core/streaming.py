"""Streaming calibration: score a model larger than memory, one block at a time.

The model is built as an empty skeleton (accelerate's ``init_empty_weights``: parameters on the meta
device, buffers real), and only what lies outside the tower's blocks (embeddings, final norm, head) is
loaded. The inputs of the first block are captured batch by batch with every block replaced by a
pass-through that records the keyword arguments (rotary embeddings, masks) the model calls it with. Then
each block in turn is loaded from the safetensors shards (``safe_open``, through transformers' own
checkpoint conversion so legacy key layouts load too), runs every batch of the cached residual stream,
and is emptied again. Memory is one block's weights plus the residual stream of the calibration windows,
whatever the depth.

Everything is driven by the IR (towers, blocks, module paths, stream points): no family code. The stream
statistics are recorded by the same hooks as :func:`prunekit_core.scoring.calibrate`, in the same order
per batch, so scores are bitwise equal to the in-memory pass. While each block is loaded, the
:class:`~prunekit_core.scoring.BlockObserver` s of the metrics that read weights or per-block statistics
(``magnitude``, ``wanda``, ``obs``, ``bi_lsq``, plugin metrics such as the expert metrics) see it: hooks on
before its batches run, scores of its units computed after, then it is emptied. Single-unit removal trials
run in passes over the blocks (:class:`StreamingTrialRunner`). Every metric that needs no gradients
(``ImportanceMetric.streaming``) can be computed; ``taylor`` is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import ArchitectureAdapter, get_module
from .errors import CalibrationError, CheckpointError, PlanError
from .ir import ModelIR, Tower
from .metrics import ChannelMetric, ImportanceMetric, Scores
from .plan import DIGEST_ATTR, digest_samples, weight_sample
from .scoring import (
    TRIALS_ATTR,
    BlockObserver,
    BlockView,
    Calibration,
    ScoringContext,
    _first_tensor,
    _progress,
    _TowerRecorder,
    block_ir,
    block_observers,
    stream_loss,
)

__all__ = [
    "StreamingModel",
    "check_streaming_metric",
    "open_streaming",
    "stream_calibrate",
    "stream_score",
    "stream_score_groups",
]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the first block's inputs are known."""


def check_streaming_metric(metric: ImportanceMetric) -> None:
    """Raise :class:`PlanError` unless ``metric`` can be computed from a streaming calibration pass."""
    if "gradients" in metric.needs:
        raise PlanError(
            f"metric {metric.name!r} needs gradients (a backward pass through the whole model), which "
            f"streaming mode does not run: drop --streaming, or use one of {', '.join(streaming_metrics())}"
        )
    if not metric.streaming:
        raise PlanError(
            f"metric {metric.name!r} is not available with --streaming (it reads more than the stream "
            "statistics, single-unit removal trials and one block's weights and statistics at a time): drop "
            f"--streaming, or use one of {', '.join(streaming_metrics())}"
        )


def streaming_metrics() -> list[str]:
    """The names of every registered metric a streaming pass can compute."""
    from .plugins import metrics

    return sorted(n for n, m in metrics().items() if m.streaming and "gradients" not in m.needs)


def _weight_index(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file of a Hugging Face folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(
        f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json): "
        "streaming reads tensors one block at a time from safetensors files; re-save the model with "
        "save_pretrained (safetensors is its default)"
    )


@dataclass
class StreamingModel:
    """An empty skeleton of a checkpoint, its IR, and where each tensor lives on disk."""

    folder: Path
    model: nn.Module
    adapter: ArchitectureAdapter
    ir: ModelIR
    files: dict[str, Path]
    dtype: torch.dtype
    loaded_blocks: int = 0
    loaded_bytes: int = 0
    _mapping: Any = field(default=None, repr=False)
    _samples: dict[str, Any] = field(default_factory=dict, repr=False)
    _template: Any = field(default=None, repr=False)

    @property
    def tower(self) -> Tower:
        towers = [t for t in self.ir.towers if t.blocks]
        if len(towers) != 1:
            raise CalibrationError(
                f"streaming supports models with one tower of blocks; {self.ir.architecture} has "
                f"{len(towers)} ({', '.join(t.name for t in towers)}): score it in memory (drop --streaming)"
            )
        return towers[0]

    def _prefixes(self) -> list[str]:
        return [t.blocks_path + "." for t in self.ir.towers if t.blocks]

    def load(self, keys: list[str]) -> None:
        """Materialize the parameters stored under checkpoint ``keys`` (converted by transformers)."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        with contextlib.ExitStack() as stack:
            sd: dict[str, Any] = {}
            for file, ks in by_file.items():
                f = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                for k in ks:
                    sd[k] = f.get_slice(k)
            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                info, _ = convert_and_load_state_dict_in_model(
                    self.model, sd, LoadStateDictConfig(weight_mapping=self._mapping, dtype=self.dtype)
                )
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
        errors = getattr(info, "conversion_errors", None) or getattr(info, "mismatched_keys", None)
        if errors:
            raise CheckpointError(
                f"could not load {sorted(errors)[:5]} from {self.folder}: the checkpoint does not match its "
                "config"
            )

    def _check_loaded(self, module: nn.Module, where: str) -> None:
        meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if meta:
            raise CheckpointError(
                f"{self.folder} has no weights for {where}: {', '.join(meta[:5])}"
                + (f", ... ({len(meta)} in all)" if len(meta) > 5 else "")
                + "; the checkpoint does not match its config (re-save it with save_pretrained)"
            )

    def load_outside_blocks(self) -> None:
        """Embeddings, final norms, head: everything outside the towers' block lists."""
        prefixes = self._prefixes()
        self.load([k for k in self.files if not k.startswith(tuple(prefixes))])
        if getattr(self.model.config, "tie_word_embeddings", False) or any(
            getattr(c, "tie_word_embeddings", False) for c in _sub_configs(self.model.config)
        ):
            self.model.tie_weights()
        outside = [
            n for n, p in self.model.named_parameters() if not n.startswith(tuple(prefixes)) and p.is_meta
        ]
        if outside:
            raise CheckpointError(
                f"{self.folder} has no weights for {', '.join(outside[:5])}; the checkpoint does not match "
                "its config (re-save it with save_pretrained)"
            )
        for name, t in self.model.state_dict().items():
            if not name.startswith(tuple(prefixes)):
                self._samples[name] = weight_sample(t)

    def weights_digest(self) -> str | None:
        """The weights fingerprint of the checkpoint (as :func:`~prunekit_core.plan.fingerprint` computes it
        in memory), once every block has been loaded once; ``None`` before."""
        names = set(self.model.state_dict())
        if not names <= set(self._samples):
            return None
        return digest_samples({n: self._samples[n] for n in names})

    def load_block(self, path: str) -> nn.Module:
        block = get_module(self.model, path)
        prefix = path + "."
        self.load([k for k in self.files if k.startswith(prefix)])
        self._check_loaded(block, f"block {path}")
        for name, t in block.state_dict().items():  # for the weights fingerprint, while they are here
            self._samples[f"{prefix}{name}"] = weight_sample(t)
        self.loaded_blocks += 1
        self.loaded_bytes += sum(p.numel() * p.element_size() for p in block.parameters())
        return block

    def unload_block(self, path: str) -> None:
        """Back to the meta device (parameters only: buffers such as rotary tables stay)."""
        from accelerate.utils import set_module_tensor_to_device

        block = get_module(self.model, path)
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")
        gc.collect()
        _release_free_memory()


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Block tensors under glibc's mmap threshold (which grows up to 32 MB as large chunks are freed) come
    from the heap; without a trim, the heap's high-water mark creeps up block after block and peak RSS
    grows with depth.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _sub_configs(config: Any) -> list[Any]:
    return [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]


def open_streaming(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> StreamingModel:
    """Build the empty skeleton of the Hugging Face folder ``folder`` and load what lies outside its blocks."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping

    from .plugins import select_adapter

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} is not a Hugging Face model folder (no config.json): streaming needs a local folder "
            "of safetensors shards"
        )
    if (folder / "prunekit.json").is_file():
        raise CheckpointError(
            f"{folder} is a pruned checkpoint (prunekit.json): streaming reads plain Hugging Face folders; "
            "score the original model, or load this one in memory (drop --streaming)"
        )
    files = _weight_index(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    adapter = select_adapter(model)
    ir = adapter.build_ir(model)
    sm = StreamingModel(
        folder=folder,
        model=model,
        adapter=adapter,
        ir=ir,
        files=files,
        dtype=dtype,
        _mapping=get_model_conversion_mapping(model),
    )
    sm.tower  # noqa: B018 - one tower of blocks, or a clear error now
    sm.load_outside_blocks()

    def trials(ctx: ScoringContext) -> StreamingTrialRunner:
        return StreamingTrialRunner(
            sm,
            ctx.calibration.windows[: ctx.trial_windows],
            loss_stride=ctx.loss_stride,
            candidates=ctx.candidates,
        )

    object.__setattr__(model, TRIALS_ATTR, trials)  # ScoringContext.trials() on the skeleton streams too
    return sm


@contextlib.contextmanager
def _pass_through(blocks: list[nn.Module], template: Any, calls: list[list[Any]]) -> Iterator[list[Any]]:
    """Replace every block's forward by one that records its call and returns its input unchanged."""
    inputs: list[Any] = []

    def make(i: int):  # noqa: ANN202
        def forward(*args: Any, **kwargs: Any) -> Any:
            x = _first_tensor(args, kwargs)
            kw = dict(kwargs)
            kw.pop("hidden_states", None)
            calls[i].append((args[1:], kw))
            if i == 0:
                inputs.append(x)
            return (x, *template[1:]) if isinstance(template, tuple) else x

        return forward

    for i, b in enumerate(blocks):
        b.forward = make(i)
    try:
        yield inputs
    finally:
        for b in blocks:
            del b.forward


def _block_calls(
    sm: StreamingModel, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[Any]]]:
    """The first block's input per batch, and the arguments the model calls every block with, per batch."""
    paths = [b.module for b in sm.tower.blocks]
    blocks = [get_module(sm.model, p) for p in paths]
    template = getattr(sm, "_template", None)
    if template is None:  # what a block returns (a tensor or a tuple): run the real first block once
        first = sm.load_block(paths[0])
        seen: list[Any] = []

        def grab(_m: nn.Module, _a: Any, out: Any) -> None:
            seen.append(out)
            raise _Stop

        h = first.register_forward_hook(grab)
        try:
            sm.model(input_ids=batches[0][:1], use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        sm.unload_block(paths[0])
        if not seen:
            raise CalibrationError(f"the first block ({paths[0]}) did not run in the model's forward")
        template = sm._template = seen[0]
    calls: list[list[Any]] = [[] for _ in blocks]
    with _pass_through(blocks, template, calls) as inputs:  # blocks pass their input through
        for batch in batches:
            sm.model(input_ids=batch, use_cache=False)
    if any(len(c) != len(batches) for c in calls):
        raise CalibrationError("some blocks were not called once per batch by the model's forward")
    return list(inputs), calls


@contextlib.contextmanager
def _observing(
    sm: StreamingModel, observers: list[BlockObserver], tower: Tower, i: int, windows: torch.Tensor
) -> Iterator[None]:
    """Every observer's hooks on block ``i`` of ``tower`` (loaded) for the duration of its batches; left
    while the block is still loaded, so observers read its weights and statistics then."""
    with contextlib.ExitStack() as stack:
        if observers:
            b = tower.blocks[i]
            view = BlockView(sm.model, sm.adapter, block_ir(sm.ir, b.id), tower, b, i, windows)
            for obs in observers:
                stack.enter_context(obs.observe(view))
        yield


def _metric_objects(metrics: Sequence[str | ImportanceMetric]) -> list[ImportanceMetric]:
    from .plugins import get_metric

    out = [get_metric(m) if isinstance(m, str) else m for m in metrics]
    for m in out:
        check_streaming_metric(m)
    return out


@torch.inference_mode()
def stream_calibrate(
    sm: StreamingModel,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    metrics: Sequence[str | ImportanceMetric] = (),
    observers: Sequence[BlockObserver] = (),
) -> Calibration:
    """:func:`~prunekit_core.scoring.calibrate` of ``sm``'s model, one block in memory at a time.

    ``metrics`` that read a block's weights or statistics (``magnitude``, ``wanda``, ``obs``, ``bi_lsq``,
    a plugin's ``streaming`` channel metrics) are computed while each block is loaded, through their
    :class:`~prunekit_core.scoring.BlockObserver` s (plus any given in ``observers``); their scores go to
    the calibration's ``observed`` (read by :func:`stream_score`, :func:`stream_score_groups` and the
    planners).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise CalibrationError(
            f"calibration needs token windows [n, seq_len >= 2], got {tuple(windows.shape)}"
        )
    tower = sm.tower
    paths = [b.module for b in tower.blocks]
    batches = [windows[s : s + batch_size] for s in range(0, windows.shape[0], batch_size)]
    xs, calls = _block_calls(sm, batches)
    blocks = [get_module(sm.model, p) for p in paths]
    obs = [*block_observers(_metric_objects(metrics)), *observers]

    # 3. block by block: load, run every batch with the stream hooks on, empty
    rec = _TowerRecorder(tower)
    for b in batches:
        rec.start_batch(b.shape[0])
    handles = [
        get_module(sm.model, path).register_forward_pre_hook(rec.hook(p), with_kwargs=True)
        for p, (_, path) in enumerate(rec.points)
    ]
    try:
        for i in _progress(range(len(blocks)), progress, "streaming blocks"):
            block = sm.load_block(paths[i])
            with _observing(sm, obs, tower, i, windows):
                for j in range(len(batches)):
                    rec.select_batch(j)
                    args, kw = calls[i][j]
                    out = block(xs[j], *args, **kw)
                    xs[j] = out[0] if isinstance(out, tuple) else out
            sm.unload_block(paths[i])
            calls[i] = []
        norm = get_module(sm.model, tower.final_norm)  # type: ignore[arg-type]
        for j in range(len(batches)):
            rec.select_batch(j)
            norm(xs[j])
    finally:
        for h in handles:
            h.remove()
    cal = Calibration(windows=windows)
    cal.towers[tower.name] = rec.result()
    for o in obs:
        o.finish(sm.model, sm.adapter, sm.ir)
        cal.observed.update(o.results())
    digest = sm.weights_digest()
    if digest is not None:  # plans made on the skeleton carry the checkpoint's fingerprint
        object.__setattr__(sm.model, DIGEST_ATTR, digest)
    logger.info("streamed %d blocks (%.1f MB of weights)", sm.loaded_blocks, sm.loaded_bytes / 1e6)
    return cal


class StreamingTrialRunner:
    """Single-unit removal losses (the trials of ``nri`` and ``sleb``), one block in memory at a time.

    Same losses as :class:`~prunekit_core.scoring.TrialRunner` (the same operations on the same single
    batch of trial windows), computed in passes over the blocks: each pass carries the residual stream of
    the unmasked model plus one stream per trial of a chunk of ``chunk`` units, which forks from the
    unmasked stream at its unit's block. Memory is ``chunk + 1`` streams of the trial windows, whatever the
    depth; the first request for a block (or a sublayer) computes the trials of every candidate of that
    kind. Committing removals (the greedy planner) is not supported: plan with the rank planner.
    """

    def __init__(
        self,
        sm: StreamingModel,
        windows: torch.Tensor,
        *,
        loss_stride: int = 1,
        candidates: list[str] | None = None,
        chunk: int = 8,
    ) -> None:
        self.sm = sm
        self.tower = sm.tower
        if not self.tower.final_norm or not self.tower.head:
            raise CalibrationError(
                f"tower {self.tower.name} has no final norm/head; trials need a language-model head"
            )
        self.windows = windows
        self.loss_stride = max(1, loss_stride)
        self.candidates = candidates
        self.chunk = max(1, chunk)
        self.norm = get_module(sm.model, self.tower.final_norm)
        self.head = get_module(sm.model, self.tower.head)
        labels = windows[:, 1:]
        self.labels = labels[:, :: self.loss_stride] if self.loss_stride > 1 else labels
        self.trials = 0
        self.block_forwards = 0
        self.passes = 0
        self._losses: dict[str, float] = {}
        self._x0, calls = _block_calls(sm, [windows])
        self._calls = [c[0] for c in calls]
        self.base_loss = self._pass([])[None]

    @property
    def current_loss(self) -> float:
        return self.base_loss

    def _start(self, unit: str) -> int:
        for i, b in enumerate(self.tower.blocks):
            if unit == b.id or unit.startswith(b.id + "."):
                return i
        raise KeyError(unit)

    def _call(self, block: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        args, kw = self._calls[i]
        self.block_forwards += 1
        out = block(x, *args, **kw)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def _pass(self, units: list[str]) -> dict[str | None, float]:
        """One pass over the blocks: the loss with each of ``units`` removed alone (``None``: nothing)."""
        from .surgery import branches_masked

        self.passes += 1
        subs = self.sm.ir.units()
        starts = {u: self._start(u) for u in units}
        last_start = max(starts.values(), default=len(self.tower.blocks))
        x = self._x0[0]
        states: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.tower.blocks):
            block = self.sm.load_block(b.module)
            for u in units:
                if starts[u] == i:
                    states[u] = x  # forks from the unmasked stream at its block
            for u, st in states.items():
                if u == b.id:
                    continue  # the removed block: its input flows on
                if starts[u] == i:  # a sublayer of this block: run the block with that branch masked
                    with branches_masked(self.sm.model, [subs[u]]):  # type: ignore[list-item]
                        states[u] = self._call(block, i, st)
                else:
                    states[u] = self._call(block, i, st)
            if not units or i < last_start:  # the unmasked stream is still needed
                x = self._call(block, i, x)
            self.sm.unload_block(b.module)
        out: dict[str | None, float] = {
            u: stream_loss(self.norm, self.head, st, self.labels, self.loss_stride)
            for u, st in states.items()
        }
        if not units:
            out[None] = stream_loss(self.norm, self.head, x, self.labels, self.loss_stride)
        return out

    def _compute(self, kind_of: str) -> None:
        block_ids = {b.id for b in self.tower.blocks}
        is_block = kind_of in block_ids
        blocks = self.tower.blocks
        if self.candidates is not None:
            pool = self.candidates
        elif is_block:
            pool = [b.id for b in blocks if b.removable]
        else:
            pool = [s.id for b in blocks for s in b.sublayers if s.removable]
        todo = [u for u in pool if u not in self._losses and (u in block_ids) == is_block]
        if kind_of not in todo and kind_of not in self._losses:
            todo.append(kind_of)
        todo.sort(key=self._start)
        for k in range(0, len(todo), self.chunk):
            self._losses.update(self._pass(todo[k : k + self.chunk]))  # type: ignore[arg-type]

    def loss(self, remove: list[str] | tuple[str, ...] = ()) -> float:
        units = list(remove)
        if not units:
            return self.base_loss
        if len(units) > 1:
            raise PlanError("streaming removal trials remove one unit at a time (rank planner, nri, sleb)")
        if units[0] not in self._losses:
            self._compute(units[0])
        self.trials += 1
        return self._losses[units[0]]

    def commit(self, remove: Any) -> None:
        raise PlanError(
            "the greedy planner commits removals between trials, which streaming does not support: "
            "plan with the rank planner (or drop --streaming)"
        )

    def replay(self, unit_id: str) -> float:
        raise PlanError("in-place trials (width planning) need the whole model: drop --streaming")


def _observed(m: ImportanceMetric, calibration: Calibration) -> None:
    if (
        isinstance(m, ChannelMetric) or m.block_observer() is not None
    ) and m.name not in calibration.observed:
        raise PlanError(
            f"metric {m.name!r} is computed block by block during the streaming pass: pass it to "
            f"stream_calibrate(..., metrics=[{m.name!r}])"
        )


def stream_score(
    sm: StreamingModel, calibration: Calibration, metric: str, *, span: int | None = None
) -> Scores:
    """Scores of ``metric`` from a streaming calibration (see module docs; metrics computed block by block
    must have been passed to :func:`stream_calibrate`)."""
    from .plugins import get_metric

    m = get_metric(metric)
    check_streaming_metric(m)
    _observed(m, calibration)
    ctx = ScoringContext(model=sm.model, adapter=sm.adapter, ir=sm.ir, calibration=calibration)
    return m.score(ctx, span=span)


def stream_score_groups(calibration: Calibration, metric: str) -> dict[str, torch.Tensor]:
    """Group scores of the channel metric ``metric``, computed block by block by :func:`stream_calibrate`
    (``metrics=[metric]``)."""
    from .plugins import get_metric

    m = get_metric(metric)
    check_streaming_metric(m)
    _observed(m, calibration)
    return dict(calibration.observed[m.name])


def streaming_folder(spec: str) -> Path:
    """The local safetensors folder a model spec streams from (a GGUF source: its dequantized cache,
    converted once like :func:`~prunekit_core.loading.load_model` does)."""
    from . import loading

    source = loading.resolve_model_source(spec)
    if source.is_gguf:
        assert source.path is not None and source.gguf_file is not None
        final_dir = loading.default_cache_dir() / loading._gguf_cache_key(source.path / source.gguf_file)
        if not (final_dir / "config.json").is_file():
            loading._convert_gguf(source, final_dir)
        return final_dir
    if source.kind != "hf_dir" or source.path is None:
        raise CheckpointError(
            f"--streaming reads a local folder of safetensors shards; {spec!r} is a hub id: download it "
            "first (e.g. huggingface-cli download) and pass the folder"
        )
    return source.path


def streaming_tokenizer(folder: Path) -> Any:
    """The tokenizer of a streamed folder, with a pad token (as :func:`~prunekit_core.loading.load_model`)."""
    from transformers import AutoTokenizer

    from .loading import _ensure_pad_token

    return _ensure_pad_token(AutoTokenizer.from_pretrained(folder))
