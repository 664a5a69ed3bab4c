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
statistics are recorded by the same hooks as :func:`prunekit_core.scoring.calibration.calibrate`, in the same order
per batch, so scores are bitwise equal to the in-memory pass. While each block is loaded, the
:class:`~prunekit_core.scoring.calibration.BlockObserver` s of the metrics that read weights or per-block statistics
(``magnitude``, ``wanda``, ``obs``, ``bi_lsq``, plugin metrics such as the expert metrics) see it: hooks on
before its batches run, scores of its units computed after, then it is emptied. Single-unit removal trials
run in passes over the blocks, and the greedy planner can commit removals between rounds of trials
(:class:`StreamingTrialRunner`). Every metric that needs no gradients
(``ImportanceMetric.streaming``) can be computed; ``taylor`` is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import ArchitectureAdapter, first_tensor, get_module, hf_model
from ..ir.errors import CalibrationError, CheckpointError, PlanError
from ..ir.model import ModelIR, Tower
from ..ir.plan import digest_samples, weight_sample
from .calibration import (
    BlockObserver,
    BlockView,
    Calibration,
    ScoringContext,
    TowerRecorder,
    block_ir,
    block_observers,
    hook_point,
    progress_bar,
    stream_loss,
)
from .metrics import ChannelMetric, ImportanceMetric, Scores

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
    from ..registry.plugins import metrics

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
    #: bytes of tower outputs the last streaming pass held for replay (a vision tower's, for its images)
    replay_bytes: int = 0
    _mapping: Any = field(default=None, repr=False)
    #: checkpoint key -> the model's parameter name it loads into (transformers' renamings: a LLaVA folder
    #: stores ``vision_tower.encoder.layers.0...`` for ``model.vision_tower.encoder.layers.0...``)
    _targets: dict[str, str] = field(default_factory=dict, repr=False)
    _samples: dict[str, Any] = field(default_factory=dict, repr=False)
    #: tower name -> what one of its blocks returns (a tensor, or a tuple whose first item is the stream)
    _templates: dict[str, Any] = field(default_factory=dict, repr=False)
    #: tower names in the order the model's forward reaches them (known after the first probe)
    _order: list[str] = field(default_factory=list, repr=False)

    @property
    def towers(self) -> list[Tower]:
        """The towers with blocks (a vision encoder, a language model, ...), in the IR's order."""
        return [t for t in self.ir.towers if t.blocks]

    @property
    def tower(self) -> Tower:
        """The tower that ends in the language-model head (the one removal trials measure the loss of)."""
        towers = [t for t in self.towers if t.final_norm and t.head] or self.towers
        if len(towers) != 1:
            raise CalibrationError(
                f"{self.ir.architecture} has {len(towers)} towers with a language-model head "
                f"({', '.join(t.name for t in towers)}); streaming removal trials need exactly one"
            )
        return towers[0]

    def calibration_inputs(self, windows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The adapter's :meth:`~prunekit_core.adapters.base.ArchitectureAdapter.calibration_inputs` on the
        skeleton (e.g. image placeholders and ``pixel_values``): the blocks pass their input through (each
        tower's first block is loaded once to learn what a block returns), so shapes are the model's."""
        with _probing(self, stop=False):
            return self.adapter.calibration_inputs(self.model, windows)

    def _prefixes(self) -> list[str]:
        return [t.blocks_path + "." for t in self.ir.towers if t.blocks]

    def _map_keys(self) -> None:
        """Where each checkpoint key loads, as transformers renames it (renamings, then one converter)."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = self._mapping or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = self.model.state_dict()
        prefix = hf_model(self.model).base_model_prefix
        for key in self.files:
            target, _ = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:
                target, _ = rename_source_key(key, [], [], prefix, meta)
            self._targets[key] = target

    def _keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.files if self._targets.get(k, k).startswith(prefix)]

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
                    hf_model(self.model),
                    sd,
                    LoadStateDictConfig(weight_mapping=self._mapping, dtype=self.dtype),
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
        self.load([k for k in self.files if not self._targets.get(k, k).startswith(tuple(prefixes))])
        if getattr(self.model.config, "tie_word_embeddings", False) or any(
            getattr(c, "tie_word_embeddings", False) for c in _sub_configs(self.model.config)
        ):
            hf_model(self.model).tie_weights()
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
        """The weights fingerprint of the checkpoint (as :func:`~prunekit_core.ir.plan.fingerprint` computes it
        in memory), once every block has been loaded once; ``None`` before."""
        names = set(self.model.state_dict())
        if not names <= set(self._samples):
            return None
        return digest_samples({n: self._samples[n] for n in names})

    def trial_runner(self, ctx: ScoringContext) -> StreamingTrialRunner:
        """The removal trials of ``ctx`` (on this skeleton), streamed: :attr:`Calibration.trial_factory` of
        a streaming pass, so that :meth:`ScoringContext.trials` streams too."""
        n = ctx.trial_windows
        return StreamingTrialRunner(
            self,
            ctx.calibration.windows[:n],
            loss_stride=ctx.loss_stride,
            candidates=lambda: ctx.candidates,  # the planner's pool of the moment
            inputs={k: v[:n] for k, v in ctx.calibration.inputs.items()},
        )

    def load_block(self, path: str) -> nn.Module:
        block = get_module(self.model, path)
        prefix = path + "."
        self.load(self._keys_under(prefix))
        self._check_loaded(block, f"block {path}")
        for name, t in block.state_dict().items():  # for the weights fingerprint, while they are here
            self._samples[f"{prefix}{name}"] = weight_sample(t)
        self.loaded_blocks += 1
        self.loaded_bytes += sum(p.numel() * p.element_size() for p in block.parameters())
        return block

    def unload_block(self, path: str) -> None:
        """Back to the meta device (parameters only: buffers such as rotary tables stay).

        The weights are freed by reference counting as they are replaced (no cycle holds them: a test
        checks it), so no garbage collection runs here: a full ``gc.collect()`` costs a quarter of a second
        once transformers is imported, per block and per pass of removal trials.
        """
        from accelerate.utils import set_module_tensor_to_device

        block = get_module(self.model, path)
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")
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

    from ..registry.plugins import select_adapter

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
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # "Unrecognized configuration class": a vision-language model is no causal LM
            from ..io.checkpoint import model_class

            cls = model_class((config.architectures or [None])[0], None)
            if cls is None:
                raise
            model = cls._from_config(config, dtype=dtype)
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
    if not sm.towers:
        raise CalibrationError(f"{ir.architecture} has no tower of blocks to stream")
    sm._map_keys()
    sm.load_outside_blocks()
    return sm


def _wrap(template: Any, x: torch.Tensor) -> Any:
    """``x`` in the shape of what a block returns (``template``: a tensor or a tuple led by the stream)."""
    return (x, *template[1:]) if isinstance(template, tuple) else x


def _stream_of(out: Any) -> torch.Tensor:
    stream: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return stream


@contextlib.contextmanager
def _forwards(blocks: list[nn.Module], make: Any) -> Iterator[None]:
    """Replace block ``i``'s forward by ``make(i)`` for the duration (hooks on the blocks still run)."""
    for i, b in enumerate(blocks):
        b.forward = make(i)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


@contextlib.contextmanager
def _probing(sm: StreamingModel, *, stop: bool) -> Iterator[None]:
    """Blocks pass their input through, so the skeleton's forward runs with the model's shapes.

    The first block of a tower whose return type is not known yet is loaded when the forward reaches it,
    runs for real, and is emptied again: what it returns is the template of its tower's pass-throughs. The
    order in which towers are reached is recorded. With ``stop``, the forward ends (``_Stop``) once every
    tower's template is known.
    """

    def reached(name: str) -> None:
        if name not in sm._order:
            sm._order.append(name)

    with contextlib.ExitStack() as stack:
        handles: list[Any] = []
        stack.callback(lambda: [h.remove() for h in handles])
        for tower in sm.towers:
            paths = [b.module for b in tower.blocks]
            blocks = [get_module(sm.model, p) for p in paths]

            def make(i: int, name: str = tower.name, path: str = paths[0]) -> Callable[..., Any]:
                def forward(*args: Any, **kwargs: Any) -> Any:
                    if name not in sm._templates:
                        raise CalibrationError(
                            f"a block of tower {name} ran before its first block ({path}) in the model's forward"
                        )
                    reached(name)
                    return _wrap(sm._templates[name], first_tensor(args, kwargs))

                return forward

            if tower.name in sm._templates:
                stack.enter_context(_forwards(blocks, make))
                continue
            stack.enter_context(_forwards(blocks[1:], lambda i, m=make: m(i + 1)))

            def load(_m: nn.Module, _a: Any, path: str = paths[0]) -> None:
                sm.load_block(path)

            def learn(_m: nn.Module, _a: Any, out: Any, name: str = tower.name, path: str = paths[0]) -> None:
                sm.unload_block(path)
                sm._templates[name] = out
                reached(name)
                if stop and all(t.name in sm._templates for t in sm.towers):
                    raise _Stop

            handles.append(blocks[0].register_forward_pre_hook(load))
            handles.append(blocks[0].register_forward_hook(learn))
        yield


def _learn_templates(sm: StreamingModel, ids: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
    """Run the skeleton once on one window so every tower's template and the towers' order are known."""
    if all(t.name in sm._templates for t in sm.towers) and len(sm._order) == len(sm.towers):
        return
    with _probing(sm, stop=True), contextlib.suppress(_Stop):
        sm.model(input_ids=ids[:1], use_cache=False, **{k: v[:1] for k, v in extra.items()})


class _TowerStreams:
    """The towers of a model streamed in the order its forward reaches them, over fixed batches.

    For the tower being streamed, :meth:`capture` runs the model's forward on every batch with that tower's
    blocks as pass-throughs that record how the model calls them, and stops at its last block: the first
    block's input per batch and each block's call arguments. The blocks of towers already streamed
    replay the outputs they produced (the model reads intermediate hidden states, e.g. LLaVA's
    ``vision_feature_layer=-2``, through hooks on the blocks, so every block's output is kept until the
    last tower is done). Everything outside blocks (patch embeddings, projector, text embeddings) runs
    as the model runs it. :meth:`stream` then loads one block at a time and runs every batch through it.
    """

    def __init__(
        self,
        sm: StreamingModel,
        batches: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
        *,
        observers: Sequence[BlockObserver] = (),
        windows: torch.Tensor | None = None,
    ) -> None:
        self.sm = sm
        self.batches = batches
        self.observers = list(observers)  # run on each block while it is loaded (every tower's)
        self.windows = windows if windows is not None else torch.cat([b for b, _ in batches])
        _learn_templates(sm, *batches[0])
        by_name = {t.name: t for t in sm.towers}
        #: towers the forward reaches, in that order (a vision tower without images is not reached)
        self.order = [by_name[n] for n in sm._order if n in by_name]
        self.replay: dict[str, list[list[torch.Tensor]]] = {}  # tower -> [block][batch] outputs
        self.cached_bytes = 0

    @contextlib.contextmanager
    def _replaying(self, current: list[int]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for name, outs in self.replay.items():
                tower = next(t for t in self.order if t.name == name)
                blocks = [get_module(self.sm.model, b.module) for b in tower.blocks]

                def make(
                    i: int, outs: list[list[torch.Tensor]] = outs, name: str = name
                ) -> Callable[..., Any]:
                    def forward(*args: Any, **kwargs: Any) -> Any:
                        x, out = first_tensor(args, kwargs), outs[i][current[0]]
                        if x.shape != out.shape:
                            raise CalibrationError(
                                f"block {i} of tower {name} was called with a {tuple(x.shape)} stream, not the "
                                f"{tuple(out.shape)} one streamed: the model's forward is not deterministic"
                            )
                        return _wrap(self.sm._templates[name], out)

                    return forward

                stack.enter_context(_forwards(blocks, make))
            yield

    def capture(self, tower: Tower) -> tuple[list[torch.Tensor], list[list[Any]]]:
        """The input of ``tower``'s first block per batch, and every block's call arguments per batch."""
        sm = self.sm
        blocks = [get_module(sm.model, b.module) for b in tower.blocks]
        template = sm._templates[tower.name]
        calls: list[list[Any]] = [[] for _ in blocks]
        inputs: list[torch.Tensor] = []

        def make(i: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                x = first_tensor(args, kwargs)
                kw = dict(kwargs)
                kw.pop("hidden_states", None)
                calls[i].append((args[1:], kw))
                if i == 0:
                    inputs.append(x)
                if i == len(blocks) - 1:
                    raise _Stop  # the towers after this one are not streamed yet
                return _wrap(template, x)

            return forward

        current = [0]
        with self._replaying(current), _forwards(blocks, make):
            for j, (ids, extra) in enumerate(self.batches):
                current[0] = j
                try:
                    sm.model(input_ids=ids, use_cache=False, **extra)
                except _Stop:
                    pass
        if len(inputs) != len(self.batches) or any(len(c) != len(self.batches) for c in calls):
            raise CalibrationError(
                f"the blocks of tower {tower.name} were not called once per batch by the model's forward"
            )
        return inputs, calls

    def stream(
        self,
        tower: Tower,
        xs: list[torch.Tensor],
        calls: list[list[Any]],
        *,
        rec: TowerRecorder | None = None,
        progress: bool = False,
    ) -> list[torch.Tensor]:
        """Run every batch through ``tower``'s blocks, one block loaded at a time (``xs`` in, streams out).

        ``rec`` observes the stream (the hooks of :func:`~prunekit_core.scoring.calibration.calibrate`, in the same
        order per batch). Each block's outputs are kept for replay when a later tower is still to come.
        """
        sm = self.sm
        paths = [b.module for b in tower.blocks]
        keep = tower is not self.order[-1]
        outs: list[list[torch.Tensor]] = []
        handles = (
            []
            if rec is None
            else [hook_point(sm.model, rec, p, path) for p, (_, path) in enumerate(rec.points)]
        )
        try:
            for i in progress_bar(range(len(paths)), progress, f"streaming {tower.name} blocks"):
                block = sm.load_block(paths[i])
                with _observing(sm, self.observers, tower, i, self.windows):
                    for j in range(len(xs)):
                        if rec is not None:
                            rec.select_batch(j)
                        args, kw = calls[i][j]
                        xs[j] = _stream_of(block(xs[j], *args, **kw))
                sm.unload_block(paths[i])
                calls[i] = []
                if keep:
                    outs.append(list(xs))
                    self.cached_bytes += sum(x.numel() * x.element_size() for x in xs)
            if rec is not None and tower.final_norm is not None:
                norm = get_module(sm.model, tower.final_norm)
                for j in range(len(xs)):
                    rec.select_batch(j)
                    norm(xs[j])
        finally:
            for h in handles:
                h.remove()
        if keep:
            self.replay[tower.name] = outs
        return xs

    @torch.inference_mode()
    def inputs_of(self, tower: Tower) -> tuple[list[torch.Tensor], list[list[Any]]]:
        """Stream every tower before ``tower`` (for replay), then capture ``tower``'s block inputs."""
        for t in self.order:
            if t.name == tower.name:
                return self.capture(t)
            if t.name not in self.replay:
                self.stream(t, *self.capture(t))
        raise CalibrationError(f"the model's forward did not reach tower {tower.name}")


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
    from ..registry.plugins import get_metric

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
    inputs: dict[str, torch.Tensor] | None = None,
    metrics: Sequence[str | ImportanceMetric] = (),
    observers: Sequence[BlockObserver] = (),
) -> Calibration:
    """:func:`~prunekit_core.scoring.calibration.calibrate` of ``sm``'s model, one block in memory at a time.

    ``inputs`` are further per-window model inputs (images: see :meth:`StreamingModel.calibration_inputs`).
    Towers are streamed in the order the model's forward reaches them; a tower already streamed replays its
    blocks' outputs while the next one's inputs are captured, so those outputs (every block's, for every
    calibration window) are held until the last tower starts.

    ``metrics`` that read a block's weights or statistics (``magnitude``, ``wanda``, ``obs``, ``bi_lsq``,
    a plugin's ``streaming`` channel metrics) are computed while each block is loaded, through their
    :class:`~prunekit_core.scoring.calibration.BlockObserver` s (plus any given in ``observers``); their scores go to
    the calibration's ``observed`` (read by :func:`stream_score`, :func:`stream_score_groups` and the
    planners).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise CalibrationError(
            f"calibration needs token windows [n, seq_len >= 2], got {tuple(windows.shape)}"
        )
    extra = dict(inputs or {})
    batches = [
        (windows[s : s + batch_size], {k: v[s : s + batch_size] for k, v in extra.items()})
        for s in range(0, windows.shape[0], batch_size)
    ]
    obs = [*block_observers(_metric_objects(metrics)), *observers]
    streams = _TowerStreams(sm, batches, observers=obs, windows=windows)
    cal = Calibration(windows=windows, inputs=extra)
    for tower in streams.order:
        rec = TowerRecorder(tower)
        for b, _ in batches:
            rec.start_batch(b.shape[0])
        streams.stream(tower, *streams.capture(tower), rec=rec, progress=progress)
        cal.towers[tower.name] = rec.result()
    cal.towers = {t.name: cal.towers[t.name] for t in sm.towers if t.name in cal.towers}  # IR order
    for o in obs:
        o.finish(sm.model, sm.adapter, sm.ir)
        cal.observed.update(o.results())
    # ScoringContext.trials() on the skeleton streams too; plans made on it carry the checkpoint's fingerprint
    cal.trial_factory = sm.trial_runner
    cal.weights_digest = sm.weights_digest()
    logger.info(
        "streamed %d blocks (%.1f MB of weights), %.1f MB of tower outputs held for replay",
        sm.loaded_blocks,
        sm.loaded_bytes / 1e6,
        streams.cached_bytes / 1e6,
    )
    sm.replay_bytes = streams.cached_bytes
    return cal


class StreamingTrialRunner:
    """Removal trials (``nri``, ``sleb``, the greedy planner's re-scoring), one block in memory at a time.

    The same losses as :class:`~prunekit_core.scoring.calibration.TrialRunner`, bitwise (the same operations on the
    same single batch of trial windows), computed in passes over the blocks. A pass runs the *committed
    stream* (the model with every removal committed so far: skipped blocks are not even loaded, masked
    branches stay masked) and carries one more stream per trial of a chunk of ``chunk`` units, forked from
    the committed stream at its unit's block. Memory is ``chunk + 1`` streams of the trial windows plus
    two saved block inputs of the committed stream, whatever the depth.

    What a pass costs: every block from its start to the last one is loaded once. A pass starts at the
    deepest saved committed block input at or before its first trial's block: block 0, or the input of
    the last trial's block of the previous pass (the trials are run in block order, so the chunks of one
    round of trials reach less and less of the model). A commit drops a saved input only when it lies
    after the committed unit's block. The loss of the committed model (``current_loss``) is measured by
    the first pass that needs it, carrying the committed stream to the end alongside its trials: a
    commit runs nothing itself, and the next round of trials forks from the committed stream. So a
    greedy step over ``P`` candidates costs ``ceil(P / chunk)`` passes (the first from block 0 unless
    the committed unit lies at or after its first trial's block), and no pass of its own for the commit.
    """

    def __init__(
        self,
        sm: StreamingModel,
        windows: torch.Tensor,
        *,
        loss_stride: int = 1,
        candidates: list[str] | Callable[[], list[str] | None] | None = None,
        chunk: int = 8,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.sm = sm
        self.tower = sm.tower
        if not self.tower.final_norm or not self.tower.head:
            raise CalibrationError(
                f"tower {self.tower.name} has no final norm/head; trials need a language-model head"
            )
        self.windows = windows
        self.loss_stride = max(1, loss_stride)
        #: the units a round of trials measures together (a planner's live pool: ``ctx.candidates``)
        self._candidates = candidates if callable(candidates) else (lambda: candidates)
        self.chunk = max(1, chunk)
        self.norm = get_module(sm.model, self.tower.final_norm)
        self.head = get_module(sm.model, self.tower.head)
        labels = windows[:, 1:]
        self.labels = labels[:, :: self.loss_stride] if self.loss_stride > 1 else labels
        self.trials = 0
        self.block_forwards = 0
        self.passes = 0
        self.skipped: set[str] = set()  # committed block removals
        self.masked: set[str] = set()  # committed sublayer removals
        self._units = sm.ir.sublayer_map()
        self._block_ids = {b.id for b in self.tower.blocks}
        self._losses: dict[str, float] = {}  # trial losses on top of the committed removals
        self._current: float | None = None
        self._base: float | None = None
        # towers before this one (a vision encoder) are streamed once over the trial windows' images
        streams = _TowerStreams(sm, [(windows, dict(inputs or {}))])
        x0, calls = streams.inputs_of(self.tower)
        del streams  # the replayed outputs are no longer needed
        self._calls = [c[0] for c in calls]
        self._saved: dict[int, torch.Tensor] = {0: x0[0]}  # block index -> committed stream entering it

    @property
    def current_loss(self) -> float:
        """Calibration loss with the committed removals (measured with the next trials when unknown)."""
        if self._current is None:
            self._compute(None)
        assert self._current is not None
        return self._current

    @property
    def base_loss(self) -> float:
        """Calibration loss of the model as loaded (no removal)."""
        if self._base is None:
            self.current_loss  # noqa: B018 - nothing is committed before the first loss is known
        assert self._base is not None
        return self._base

    def _start(self, unit: str) -> int:
        for i, b in enumerate(self.tower.blocks):
            if unit == b.id or unit.startswith(b.id + "."):
                return i
        raise PlanError(
            f"streaming removal trials measure units of the {self.tower.name} tower; {unit!r} is not in tower "
            f"{self.tower.name}: "
            f"restrict the plan with --scope {self.tower.name} (API: scope=[{self.tower.name!r}]), score "
            "other towers with bi, angular or sublayer_drop, or drop --streaming"
        )

    def _call(self, block: nn.Module, i: int, x: torch.Tensor, masks: list[str]) -> torch.Tensor:
        from ..surgery.apply import branches_masked

        args, kw = self._calls[i]
        self.block_forwards += 1
        with branches_masked(self.sm.model, [self._units[s] for s in masks]):
            out = block(x, *args, **kw)
        return _stream_of(out)

    @torch.inference_mode()
    def _pass(self, units: list[str]) -> dict[str, float]:
        """One pass over the blocks: the loss with each of ``units`` (in block order) removed on top of the
        committed removals, and the committed loss when it is not known yet."""
        self.passes += 1
        blocks = self.tower.blocks
        starts = {u: self._start(u) for u in units}
        need_current = self._current is None
        first = min(starts.values(), default=len(blocks))
        last = max(starts.values(), default=-1)
        begin = max(i for i in self._saved if i <= first)
        x = self._saved[begin]
        states: dict[str, torch.Tensor] = {}
        for i in range(begin, len(blocks)):
            b = blocks[i]
            for u in units:
                if starts[u] == i:
                    states[u] = x  # forks from the committed stream at its block
            if i == last:  # the next chunk's trials start here or later: resume from this block then
                self._saved = {0: self._saved[0], i: x}
            if b.id in self.skipped:
                continue  # a committed block removal: every stream flows past it, the block stays on disk
            committed = sorted(s for s in self.masked if s.startswith(b.id + "."))
            block = self.sm.load_block(b.module)
            try:
                for u, st in states.items():
                    if u == b.id:
                        continue  # the trial's removed block: its input flows on
                    extra = [u] if starts[u] == i and u not in self._block_ids else []
                    states[u] = self._call(block, i, st, committed + extra)
                if need_current or i < last:  # the committed stream is still needed
                    x = self._call(block, i, x, committed)
            finally:
                self.sm.unload_block(b.module)
        if need_current:
            self._current = stream_loss(self.norm, self.head, x, self.labels, self.loss_stride)
            if not (self.skipped or self.masked):
                self._base = self._current
        return {
            u: stream_loss(self.norm, self.head, st, self.labels, self.loss_stride)
            for u, st in states.items()
        }

    def _compute(self, unit: str | None) -> None:
        """Trials of ``unit`` and of every unmeasured candidate, in chunks; the committed loss if unknown."""
        pool = self._candidates()
        if unit is None and pool and any(self._removed(u) for u in pool):
            pool = None  # a finished round's pool (it holds a committed unit): the committed loss alone
        if pool is None and unit is not None:  # no planner pool: every removable unit of ``unit``'s kind
            if unit in self._block_ids:
                pool = [b.id for b in self.tower.blocks if b.removable]
            else:
                pool = [s.id for b in self.tower.blocks for s in b.sublayers if s.removable]
        wanted = dict.fromkeys([*(pool or []), *([unit] if unit else [])])
        todo = [u for u in wanted if u not in self._losses and not self._removed(u)]
        todo.sort(key=self._start)
        if not todo:
            self._pass([])
        for k in range(0, len(todo), self.chunk):
            self._losses.update(self._pass(todo[k : k + self.chunk]))

    def loss(self, remove: Iterable[str] = ()) -> float:
        """Calibration loss with the committed removals plus ``remove`` (one block or sublayer id)."""
        units = list(dict.fromkeys(remove))
        if not units:
            return self.current_loss
        if len(units) > 1:
            raise PlanError(
                "streaming removal trials remove one unit at a time on top of the committed removals "
                "(the rank and greedy planners, nri, sleb); drop --streaming to measure several at once"
            )
        self.trials += 1
        unit = units[0]
        if self._removed(unit):
            return self.current_loss  # already removed: nothing more to remove
        if unit not in self._losses:
            self._compute(unit)
        return self._losses[unit]

    def _removed(self, unit: str) -> bool:
        """Whether ``unit`` is committed already (itself, or the block it lies in)."""
        return unit in self.masked or self.tower.blocks[self._start(unit)].id in self.skipped

    def commit(self, remove: Iterable[str]) -> None:
        """Make removals permanent for later trials. Runs nothing: the next trials (or ``current_loss``)
        fork from the committed stream, which only changes from the earliest committed unit's block."""
        extra = set(remove)
        if not extra:
            return
        start = min(self._start(u) for u in extra)  # unknown ids: a clear error before anything changes
        if self._base is None and not (self.skipped or self.masked):
            self._pass([])  # the loss before any removal (base_loss)
        self.skipped |= extra & self._block_ids
        self.masked |= extra - self._block_ids
        self._saved = {i: x for i, x in self._saved.items() if i <= start}
        self._losses.clear()
        self._current = None

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
    must have been passed to :func:`stream_calibrate`).

    Removal trials (``nri``, ``sleb``) measure the language model's loss one block at a time; on a model
    with several towers they score the units of the tower with the head (the language model) only.
    """
    from ..registry.plugins import get_metric

    m = get_metric(metric)
    check_streaming_metric(m)
    _observed(m, calibration)
    ir = sm.ir
    if "trials" in m.needs and len(sm.towers) > 1:
        ir = ir.restricted([sm.tower.name])
    ctx = ScoringContext(model=sm.model, adapter=sm.adapter, ir=ir, calibration=calibration)
    return m.score(ctx, span=span)


def stream_score_groups(calibration: Calibration, metric: str) -> dict[str, torch.Tensor]:
    """Group scores of the channel metric ``metric``, computed block by block by :func:`stream_calibrate`
    (``metrics=[metric]``)."""
    from ..registry.plugins import get_metric

    m = get_metric(metric)
    check_streaming_metric(m)
    _observed(m, calibration)
    return dict(calibration.observed[m.name])


def streaming_folder(spec: str) -> Path:
    """The local safetensors folder a model spec streams from (a GGUF source: its dequantized cache,
    converted once like :func:`~prunekit_core.io.loading.load_model` does)."""
    from ..io import loading

    source = loading.resolve_model_source(spec)
    if source.is_gguf:
        return loading.gguf_folder(source)
    if source.kind != "hf_dir" or source.path is None:
        raise CheckpointError(
            f"--streaming reads a local folder of safetensors shards; {spec!r} is a hub id: download it "
            "first (e.g. huggingface-cli download) and pass the folder"
        )
    return source.path


def streaming_tokenizer(folder: Path) -> Any:
    """The tokenizer of a streamed folder, with a pad token (as :func:`~prunekit_core.io.loading.load_model`)."""
    from transformers import AutoTokenizer

    from ..io.loading import ensure_pad_token

    return ensure_pad_token(AutoTokenizer.from_pretrained(folder))
