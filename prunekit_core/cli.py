"""The ``prunekit`` command line: ``plugins``, ``inspect``, ``new-plugin``, ``score``, ``prune``, ``eval``, ``demo``, ``sweep``, ``report``.

Every command is a thin layer over the Python API (:mod:`prunekit_core`). What callers may rely on:

* ``--json`` prints exactly one JSON object on stdout and nothing else; progress and timings go to stderr.
* Every :class:`~prunekit_core.errors.PrunekitError` is printed as ``error: <message>`` on stderr with exit
  code 2 and no traceback; usage errors exit 2 as well.
* Inputs (ratio, files, text, model, output folder) are validated before any expensive work, and nothing
  is written when a command fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .defaults import LORA_PRECISIONS, check_ratio
from .errors import CalibrationError, ModelNotFoundError, PlanError, PrunekitError

if TYPE_CHECKING:
    from .defaults import Granularity, PlannerName, RepairName
    from .text import TextWindows

__all__ = ["build_parser", "cli_markdown", "main"]

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DEFAULT_SCORE_METRICS = ("bi", "sublayer_drop", "angular")

_TEXT_HELP = "an alias ({aliases}) or a path to a UTF-8 text file"
_MODEL_HELP = (
    "a model alias ({aliases}), a Hugging Face folder (config.json), a .gguf file, a folder written by "
    "`prunekit prune`, or a hub id org/name (needs internet)"
)


# --- output ----------------------------------------------------------------------------------------


class UI:
    """Where a command writes: results on stdout (tables or one JSON object), progress on stderr."""

    def __init__(self, *, json_mode: bool) -> None:
        from rich.console import Console

        self.json_mode = json_mode
        # piped output (files, tests, grep) gets wide tables instead of rows wrapped at 80 columns
        piped = not sys.stdout.isatty()
        self.out = Console(file=sys.stdout, highlight=False, width=160 if piped else None)
        self.err = Console(file=sys.stderr, highlight=False)

    def say(self, message: str = "") -> None:
        """A result line for people (suppressed with ``--json``)."""
        if not self.json_mode:
            self.out.print(message, markup=False)

    def table(self, table: Any) -> None:
        if not self.json_mode:
            self.out.print(table)

    def info(self, message: str) -> None:
        """Progress and timings: always on stderr, so stdout stays clean for ``--json``."""
        self.err.print(message, markup=False, highlight=False)

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()

    @contextmanager
    def step(self, label: str) -> Iterator[dict[str, float]]:
        """Run one step under a spinner and report how long it took (``timing['s']``)."""
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        with self.err.status(label + " ..."):
            yield timing
        timing["s"] = time.perf_counter() - t0
        self.info(f"{label}: {timing['s']:.1f} s")


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: they become null (the accompanying nll still says what happened)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _bars() -> bool:
    """Progress bars only on an interactive stderr (piped logs get the timing lines instead)."""
    return sys.stderr.isatty()


def _fmt_params(n: int) -> str:
    return f"{n:,}"


def _ppl_dict(res: Any) -> dict[str, Any]:
    return dataclasses.asdict(res)


# --- logging and third-party noise -------------------------------------------------------------------


if TYPE_CHECKING:  # generic in typeshed; at run time only from Python 3.11
    _StreamHandler = logging.StreamHandler[TextIO]
else:
    _StreamHandler = logging.StreamHandler


class _StderrHandler(_StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest swaps it between tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_LOGGERS = ("prunekit_core", "prunekit_llama")
#: third-party loggers that print at import or load time (torchao: "Failed to load .../_C_*.so"; torch's
#: _pytree: "... is an Enum subclass" when torchao registers its enums); shown only with -v
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "peft", "accelerate", "huggingface_hub")
#: read by transformers and huggingface_hub when they are first imported (the CLI imports them lazily)
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def _quiet_libraries(verbose: bool) -> Iterator[None]:
    """Silence third-party warnings, logs and progress bars unless ``-v``; route our logs to stderr.

    Imports nothing: a library imported while a command runs (torch, transformers, torchao are imported
    only by the commands that need them) finds its loggers and environment already quiet; one imported
    before (a test calling :func:`main` again) is quietened through its own API.
    """
    import os

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved_levels = []
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        saved_levels.append((lg, lg.level))
        lg.setLevel(logging.INFO if verbose else logging.WARNING)
        lg.addHandler(handler)
    saved_env: dict[str, str | None] = {}
    if not verbose:
        for name in _NOISY_LOGGERS:
            lg = logging.getLogger(name)
            saved_levels.append((lg, lg.level))
            lg.setLevel(logging.ERROR)
        for key, value in _QUIET_ENV.items():
            saved_env[key] = os.environ.get(key)
            os.environ[key] = value
    hf = sys.modules.get("transformers") is not None
    if hf:
        import transformers
        from transformers.utils import logging as hf_logging

        old_verbosity = transformers.logging.get_verbosity()
        bars_were_enabled = hf_logging.is_progress_bar_enabled()
        if verbose:
            transformers.logging.set_verbosity_warning()
        else:
            transformers.logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                from huggingface_hub.utils.tqdm import disable_progress_bars

                disable_progress_bars()
            except ImportError:  # pragma: no cover - hub is a transformers dependency
                pass
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in reversed(saved_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        if hf:
            transformers.logging.set_verbosity(old_verbosity)
            if bars_were_enabled:
                hf_logging.enable_progress_bar()


# --- shared validation ---------------------------------------------------------------------------------


def _check_text(spec: str) -> Path:
    """Resolve a text alias or file and make sure it is readable and not empty (cheap: no tokenizer)."""
    from .text import read_text, resolve_text

    path = resolve_text(spec)
    read_text(spec)
    return path


def _check_model(spec: str, *, tokenizer: bool = True) -> Any:
    """Resolve a model spec before anything is loaded: a path that does not exist fails at once (never a
    hub lookup), a folder without a tokenizer fails when the command reads text, and a hub id is looked up
    once, without retries."""
    from .sources import check_hub_model, check_tokenizer, resolve_model_source

    source = resolve_model_source(spec)
    if tokenizer:
        check_tokenizer(source)
    check_hub_model(source)
    return source


def _load_model(
    ui: UI, spec: str, args: argparse.Namespace | None = None, *, tokenizer: bool = True
) -> tuple[Any, Any, Any]:
    from .loading import load_model

    allow_pickle = bool(getattr(args, "allow_pickle", False))
    trust_remote_code = bool(getattr(args, "trust_remote_code", False))
    if allow_pickle:
        ui.info("--allow-pickle: pickled weights are read with torch.load(weights_only=True)")
    if trust_remote_code:
        ui.info("--trust-remote-code: model code shipped with the checkpoint will run")
    with ui.step(f"load {spec}"):
        try:
            return load_model(
                spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, tokenizer=tokenizer
            )
        except PrunekitError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(f"could not load model {spec!r}: {type(exc).__name__}: {exc}") from exc


def _windows(
    tok: Any, spec: str, *, seq_len: int, num_windows: int | None, max_tokens: int | None = None
) -> TextWindows:
    from .text import load_windows

    return load_windows(tok, spec, seq_len=seq_len, num_windows=num_windows, max_tokens=max_tokens)


def _multimodal(model: Any, ids: Any) -> tuple[Any, dict[str, Any]]:
    """Calibration windows and the further inputs (images) that reach every tower of ``model``."""
    from .plugins import select_adapter

    return select_adapter(model).calibration_inputs(model, ids)


def _images(model: Any, count: int = 8) -> Any:
    """Sample images for a vision-language model's image-feature fidelity, or ``None`` for a text model."""
    import torch

    if not callable(getattr(model, "get_image_features", None)):
        return None
    # windows long enough for any image's placeholder tokens; only the images are used
    _ids, extra = _multimodal(model, torch.zeros((count, 4096), dtype=torch.long))
    return extra.get("pixel_values")


def _scope(value: str) -> tuple[str, ...]:
    """--scope: ``all`` or tower names, comma-separated."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names:
        raise argparse.ArgumentTypeError("--scope needs 'all' or tower names, e.g. vision or text,vision")
    return () if "all" in names else names


def _positive(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {value!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {n}")
        return n

    return parse


def _seq_len(value: str) -> int:
    n = _positive("--seq-len")(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"--seq-len must be at least 2, got {n}")
    return n


# --- prunekit plugins -------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace, ui: UI) -> int:
    from rich.table import Table

    from .plugins import catalog, load_failures, plugins

    if args.load:  # build every adapter, metric and format, checking each catalog (imports torch)
        found, failed = plugins(), load_failures()
    else:  # from the plugins' catalogs: imports no torch
        found, failed = catalog()
    infos = [p.to_dict() for p in found]
    failures = [f.to_dict() for f in failed]
    if ui.json_mode:
        ui.emit_json({"plugins": infos, "failures": failures})
        return EXIT_OK
    table = Table(title="prunekit plugins")
    for col in ("plugin", "version", "builtin", "adapters", "metrics", "quant formats"):
        table.add_column(col)
    for p in infos:
        table.add_row(
            p["name"],
            p["version"] or "-",
            "yes" if p["builtin"] else "no",
            ", ".join(p["adapters"]) or "-",
            ", ".join(p["metrics"]) or "-",
            ", ".join(p["quant_formats"]) or "-",
        )
    ui.table(table)
    if failures:
        fail = Table(title="plugins that failed to load")
        for col in ("plugin", "module", "error"):
            fail.add_column(col)
        for f in failures:
            fail.add_row(f["name"], f["module"], f["error"])
        ui.table(fail)
    elif args.load:
        ui.say("no plugin failed to load")
    else:
        ui.say(
            "no entry-point module failed to import; `prunekit plugins --load` also imports the adapters and "
            "metrics each plugin registers (and imports torch)"
        )
    return EXIT_OK


# --- prunekit inspect -------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace, ui: UI) -> int:
    from .api import inspect
    from .plan import fingerprint
    from .plugins import rank_adapters

    _check_model(args.model, tokenizer=False)  # inspecting needs no tokenizer
    model, _tok, _src = _load_model(ui, args.model, args, tokenizer=False)
    ir = inspect(model)  # selects the best adapter (errors on no match or a tie)
    ranked = rank_adapters(model)
    fp = fingerprint(model, ir)
    if ui.json_mode:
        ui.emit_json(
            {
                **ir.model_dump(mode="json"),
                "block_params": ir.block_params(),
                "fingerprint": fp.model_dump(),
                "match": ranked[0].to_dict(),
                "candidates": [m.to_dict() for m in ranked],
            }
        )
        return EXIT_OK
    best, others = ranked[0], ranked[1:]
    also = "; also matched: " + ", ".join(f"{m.name} ({m.score:g})" for m in others) if others else ""
    ui.say(f"architecture: {ir.architecture} (model_type {ir.model_type})")
    ui.say(f"adapter:      {best.name} from plugin {best.plugin}, match score {best.score:g}{also}")
    ui.say(f"total params: {_fmt_params(ir.total_params)}")
    share = ir.block_params() / ir.total_params if ir.total_params else 0.0
    ui.say(f"block params: {_fmt_params(ir.block_params())} ({share:.1%} of total; the base of --ratio)")
    if len(ir.towers) > 1:
        for t in ir.towers:
            blocks = sum(b.params for b in t.blocks)
            hint = f" (--scope {t.name})" if t.blocks else " (stages only: nothing to remove)"
            ui.say(f"  tower {t.name}: {len(t.blocks)} blocks, {_fmt_params(blocks)} block params{hint}")
        for c in ir.connections:
            ui.say(f"  {c.source} -> {c.target} at width {c.dim}")
    ui.say(f"fingerprint:  structure {fp.structure}, weights {fp.weights}")
    ui.table(_ir_tree(ir))
    return EXIT_OK


def _ir_tree(ir: Any) -> Any:
    """The IR as a rich Tree: towers, their stages in order around the blocks, sublayers under blocks."""
    from rich.markup import escape
    from rich.tree import Tree

    root = Tree(escape(f"{ir.architecture}  {_fmt_params(ir.total_params)} params"))
    for tower in ir.towers:
        t = root.add(
            escape(
                f"tower {tower.name}: width {tower.width.size}, {len(tower.blocks)} blocks in {tower.blocks_path}"
            )
        )
        stages = list(tower.stages)
        late = [st for st in stages if st.kind in ("neck", "norm", "head")]
        for st in [st for st in stages if st not in late]:
            t.add(escape(_stage_line(st)))
        for b in tower.blocks:
            fixed = "" if b.removable else " (fixed)"
            node = t.add(escape(f"{b.id}  block{fixed}  {b.module}  {_fmt_params(b.params)}"))
            for sub in b.sublayers:
                extra = [f"norm {sub.norm}"] if sub.norm else []
                extra += [f"parts {', '.join(sub.parts)}"] if sub.parts else []
                extra += [f"{g.kind} x{g.count}" for g in sub.channel_groups]
                extra += ["KV cache"] if sub.uses_cache else []
                extra += [f"edge {sub.residual.source}->{sub.residual.target}"]
                kind = sub.kind + ("" if sub.removable else " (fixed)")
                line = f"{sub.id}  {kind}  {sub.module}  {_fmt_params(sub.params)}  [{'; '.join(extra)}]"
                node.add(escape(line))
        for st in late:
            t.add(escape(_stage_line(st)))
    return root


def _stage_line(st: Any) -> str:
    tied = f" (tied to {st.tied_to})" if st.tied_to else ""
    narrow = "; narrowed through " + ", ".join(f"{g.id} x{g.count}" for g in st.channel_groups)
    return (
        f"{st.id}  {st.kind}  {st.module}  {_fmt_params(st.params)}{tied}  "
        f"(never removed{narrow if st.channel_groups else ''})"
    )


# --- prunekit new-plugin ----------------------------------------------------------------------------


def _config_item(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def cmd_new_plugin(args: argparse.Namespace, ui: UI) -> int:
    from .scaffold import new_plugin

    skeleton = new_plugin(
        args.name, model_class=args.model_class, out=args.out, config=dict(args.config), force=args.force
    )
    if ui.json_mode:
        ui.emit_json(skeleton.to_dict())
        return EXIT_OK
    ui.say(f"wrote {skeleton.distribution} ({skeleton.model_class}) in {skeleton.path}:")
    for f in skeleton.files:
        ui.say(f"  {f}")
    ui.say("next:")
    ui.say(
        f"  pip install -e {skeleton.path}      # registers adapter {args.name!r} (entry point group prunekit)"
    )
    ui.say(
        f"  pytest {skeleton.path / 'tests'}     # the conformance suite on a tiny random {skeleton.model_class}"
    )
    return EXIT_OK


# --- prunekit score ---------------------------------------------------------------------------------


def cmd_score(args: argparse.Namespace, ui: UI) -> int:
    from rich.table import Table

    from .api import calibrate, inspect, score
    from .metrics import ChannelMetric
    from .plugins import get_metric

    names = list(dict.fromkeys(args.metric or DEFAULT_SCORE_METRICS))
    metrics = [get_metric(n) for n in names]
    channel = [m for m in metrics if isinstance(m, ChannelMetric)]
    if channel and len(channel) != len(metrics):
        raise PlanError(
            f"{channel[0].name} scores channel groups, {next(m for m in metrics if m not in channel).name} "
            "scores blocks or sublayers: score them in separate runs"
        )
    span = args.span if args.span is not None else 1
    if args.streaming:
        from .streaming import check_streaming_metric

        for m in metrics:
            check_streaming_metric(m)
    _check_text(args.calib)
    _check_model(args.model)
    if args.streaming:
        sm, tok = _open_streaming(ui, args.model)
        model, ir = sm.model, sm.ir
    else:
        model, tok, _src = _load_model(ui, args.model, args)
        ir = inspect(model)
    windows = _windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
    ui.info(f"calibration: {windows.num_windows} windows x {windows.seq_len} tokens of {args.calib}")
    if channel:
        return _score_channels(ui, sm if args.streaming else model, windows, channel, args.calib)
    if args.streaming:
        cal = _stream_calibrate(ui, sm, windows.ids, metrics)
    else:
        with ui.step("calibrate"):
            ids, extra = _multimodal(model, windows.ids)
            cal = calibrate(model, ids, inputs=extra)
    results: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for m in metrics:
        with ui.step(f"score {m.name}"):
            if args.streaming:
                from .streaming import stream_score

                s = stream_score(sm, cal, m.name, span=span if m.unit == "span" else None)
            else:
                s = score(model, cal, m.name, span=span if m.unit == "span" else None)
            if s.block_forwards is not None:
                ui.info(f"{m.name}: {s.block_forwards} block forwards (cached removal trials)")
        results[m.name] = s
        labels[m.name] = f"{m.name} (span {s.span})" if s.span else m.name
    if ui.json_mode:
        ui.emit_json({name: dict(s.values) for name, s in results.items()})
        return EXIT_OK
    table = Table(title=f"importance scores (higher = keep) on {windows.num_tokens} tokens of {args.calib}")
    table.add_column("unit")
    for name in results:
        table.add_column(labels[name], justify="right")
    order = [u for b in ir.blocks() for u in [b.id, *(s.id for s in b.sublayers)]]
    for uid in order:
        cells = []
        for s in results.values():
            v = s.values.get(uid)
            cells.append("" if v is None else f"{v:.4g}")
        if any(cells):
            table.add_row(uid, *cells)
    ui.table(table)
    for m in metrics:
        ui.say(f"{m.name}: {m.description}")
    return EXIT_OK


def _open_streaming(ui: UI, spec: str) -> tuple[Any, Any]:
    from .streaming import open_streaming, streaming_folder, streaming_tokenizer

    with ui.step(f"open {spec} (streaming: blocks stay on disk)"):
        folder = streaming_folder(spec)
        return open_streaming(folder), streaming_tokenizer(folder)


def _stream_calibrate(
    ui: UI,
    sm: Any,
    ids: Any,
    metrics: list[Any],
    observers: list[Any] | None = None,
    *,
    images: bool = True,
) -> Any:
    """``images``: put one image in every window of a vision-language model, as the in-memory calibration
    does (channel statistics, like :func:`~prunekit_core.width_scoring.collect_width_stats`, read the text
    windows alone)."""
    from .streaming import stream_calibrate

    with ui.step("calibrate (streaming, one block in memory at a time)"):
        extra: dict[str, Any] = {}
        if images:
            ids, extra = sm.calibration_inputs(ids)  # a vision-language model: one image per window
        # metrics that read a block's weights or statistics are computed while it is loaded
        cal = stream_calibrate(
            sm, ids, inputs=extra, progress=_bars(), metrics=metrics, observers=observers or []
        )
    ui.info(f"streamed {sm.loaded_blocks} block loads, {sm.loaded_bytes / 1e9:.2f} GB of weights read")
    if sm.replay_bytes:
        ui.info(f"held {sm.replay_bytes / 1e9:.2f} GB of earlier towers' block outputs for replay")
    return cal


def _score_channels(ui: UI, model: Any, windows: Any, metrics: list[Any], text: str) -> int:
    """``model``: a loaded model, or a :class:`~prunekit_core.streaming.StreamingModel` (block by block)."""
    from rich.table import Table

    from .api import score_groups
    from .scoring import Calibration
    from .streaming import StreamingModel, stream_score_groups

    if isinstance(model, StreamingModel):
        cal = _stream_calibrate(ui, model, windows.ids, metrics, images=False)  # as score_groups below
        results = {m.name: stream_score_groups(cal, m.name) for m in metrics}
    else:
        cal = Calibration(windows=windows.ids)
        with ui.step(f"score {', '.join(m.name for m in metrics)}"):  # one context: shared statistics
            results = score_groups(model, cal, [m.name for m in metrics])
    if ui.json_mode:
        ui.emit_json({n: {f: [float(v) for v in t] for f, t in r.items()} for n, r in results.items()})
        return EXIT_OK
    for name, res in results.items():
        table = Table(
            title=f"{name}: channel-group importance (higher = keep) on {windows.num_tokens} tokens of {text}"
        )
        for col in ("family", "groups", "min", "median", "max", "least important"):
            table.add_column(col, justify="left" if col in ("family", "least important") else "right")
        for fid, t in res.items():
            low = ", ".join(str(int(i)) for i in t.argsort()[:5])
            table.add_row(fid, str(len(t)), f"{t.min():.4g}", f"{t.median():.4g}", f"{t.max():.4g}", low)
        ui.table(table)
    for m in metrics:
        ui.say(f"{m.name}: {m.description}")
    return EXIT_OK


# --- prunekit prune ---------------------------------------------------------------------------------


def _check_out(out: Path, *, plan_only: bool, force: bool) -> None:
    """--out can be written: missing parent folders are fine (they are created when the result is)."""
    from .checkpoint import _check_target, check_parents
    from .errors import CheckpointError

    if not plan_only:
        _check_target(out.absolute(), force)
        return
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --force")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; with --plan-only, --out is the plan file to write")
    check_parents(out)


def _save_plan(plan: Any, out: Path) -> None:
    """Write the --plan-only file, creating its missing parent folders (removed again if the write fails)."""
    from .checkpoint import make_parents, remove_made

    made = make_parents(out)
    try:
        plan.save(out)
    except BaseException:
        remove_made(made)
        raise


def _heal_texts(args: argparse.Namespace) -> tuple[str, ...]:
    """The --lora-text texts, checked before anything is loaded (never the --eval text)."""
    import peft  # noqa: F401  (a missing install fails here, before anything is loaded)

    texts = tuple(t.strip() for t in args.lora_text.split(",") if t.strip())
    if not texts:
        raise CalibrationError("--lora-text names no text: give one or more texts, comma-separated")
    for t in texts:
        _check_text(t)
    if args.eval is not None and args.eval in texts:
        raise CalibrationError(f"--lora-text includes the evaluation text {args.eval!r}: heal on other texts")
    return texts


def _heal_lora(
    args: argparse.Namespace, ui: UI, model: Any, tok: Any, texts: tuple[str, ...], skip: dict[str, int]
) -> tuple[Any, dict[str, Any]]:
    """LoRA healing with the --lora-* options; returns the merged model and the recovery record."""
    from .recovery import heal_lora, training_windows

    heal = training_windows(
        tok, seq_len=args.lora_seq_len, texts=texts, exclude=(args.eval or "",), skip_tokens=skip
    )
    with ui.step(f"LoRA healing ({args.lora_steps} steps on {', '.join(texts)})"):
        model, report = heal_lora(
            model,
            heal,
            rank=args.lora_rank,
            lr=args.lora_lr,
            steps=args.lora_steps,
            batch_size=args.lora_batch,
            seed=args.seed,
            precision=args.lora_precision,
            progress=True,  # a bar on a terminal, else a line every 10 s: training is never silent
        )
    ui.say(
        f"LoRA healing: {report.steps} steps, {report.tokens:,} tokens, loss {report.loss_first:.3f} -> "
        f"{report.loss_last:.3f}, {report.wall_s:.1f} s ({report.steps_per_s:.2f} steps/s, {report.precision}, "
        f"{report.threads} thread{'s' if report.threads != 1 else ''}); merged into the weights"
    )
    return model, report.as_dict()


def cmd_prune(args: argparse.Namespace, ui: UI) -> int:
    from rich.table import Table

    from .api import calibrate, inspect
    from .checkpoint import save_pruned
    from .evaluate import count_parameters, perplexity
    from .plan import PrunePlan
    from .planning import (
        budget_by_tower,
        budget_params,
        check_budget,
        plan_pruning,
        resolve_method,
        uses_width,
    )
    from .scoring import Calibration
    from .surgery import apply_plan
    from .vision import feature_fidelity, image_features

    # cheap checks first: nothing is loaded, computed or written before all of them pass
    given_plan: PrunePlan | None = None
    if args.plan is not None:
        if args.plan_only:
            raise PlanError("--plan-only makes a plan; --plan applies an existing one: choose one")
        given_plan = PrunePlan.load(args.plan)
    else:
        if args.ratio is None:
            raise PlanError(
                "--ratio is required (a fraction of block parameters in (0, 1)) unless --plan is given"
            )
        check_ratio(args.ratio)
        if args.calib is None:
            raise CalibrationError("--calib TEXT is required to plan (or pass an existing plan with --plan)")
    # BEST unless a metric is named; a named metric runs as published (planning.resolve_method)
    repair_arg = args.repair
    if args.recover in ("none", "repair"):
        wanted = "none" if args.recover == "none" else "lsq"
        if repair_arg is not None and repair_arg != wanted:
            raise PlanError(
                f"--recover {args.recover} contradicts --repair {repair_arg}: pass one of them "
                "(--recover repair is --repair lsq; --recover none turns the repair off)"
            )
        repair_arg = wanted
    heal_texts = _heal_texts(args) if args.recover == "lora" else ()
    metric_name, planner, granularity, repair = resolve_method(
        args.metric, args.planner, args.granularity, repair_arg
    )
    if args.streaming:
        _check_streaming_prune(args, metric_name, planner, granularity, repair)
    if given_plan is None:
        _check_text(args.calib)
    elif given_plan.repair != "none":
        if args.calib is None:
            raise CalibrationError(
                f"the plan repairs weights (repair={given_plan.repair}) when applied: pass --calib TEXT "
                "(the calibration text it was made with)"
            )
        _check_text(args.calib)
    if args.eval is not None:
        _check_text(args.eval)
    out = Path(args.out).expanduser()
    _check_out(out, plan_only=args.plan_only, force=args.force)
    _check_model(args.model)

    streamed_plan: PrunePlan | None = None
    if args.streaming:  # plan from a streaming pass; the model is loaded afterwards only for surgery
        streamed_plan = _plan_streaming(args, ui, metric_name, planner, granularity, repair)
        if args.plan_only:
            _save_plan(streamed_plan, out)
            ui.say(f"plan written to {out} (streaming: the model was never loaded whole)")
            if ui.json_mode:
                ui.emit_json(
                    {
                        "model": args.model,
                        "out": str(out.absolute()),
                        "plan": streamed_plan.model_dump(mode="json"),
                        "removed": list(streamed_plan.remove),
                        "achieved_ratio": streamed_plan.achieved_ratio,
                        "written": "plan",
                    }
                )
            return EXIT_OK
        given_plan = streamed_plan
    model, tok, _src = _load_model(ui, args.model, args)
    ir = inspect(model)
    if given_plan is None and not uses_width(metric_name, granularity):
        check_budget(
            ir.restricted(args.scope), args.ratio, granularity
        )  # parameter counts: before calibration
    cal_windows = None
    if args.calib is not None and (given_plan is None or given_plan.repair != "none"):
        cal_windows = _windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
    eval_windows = None
    if args.eval is not None:
        eval_windows = _windows(
            tok, args.eval, seq_len=args.eval_seq_len, num_windows=None, max_tokens=args.eval_tokens
        )

    result: dict[str, Any] = {"model": args.model, "out": str(out.absolute())}
    params_before = count_parameters(model)
    ppl_before = None
    if eval_windows is not None:
        with ui.step(f"perplexity before on {args.eval}"):
            ppl_before = perplexity(model, eval_windows.ids, progress=_bars())
        ui.say(
            f"perplexity before: {ppl_before.perplexity:.3f} on {ppl_before.tokens} tokens of {args.eval} "
            f"(seq_len {ppl_before.seq_len})"
        )

    if given_plan is None:
        assert cal_windows is not None
        if granularity == "expert":
            target = None
            ui.say(
                f"budget: at least {args.ratio:g} of the experts of "
                + ("every MoE layer" if args.expert_allocation == "uniform" else "all MoE layers together")
            )
        else:
            scoped = ir.restricted(args.scope)
            target = budget_params(scoped, args.ratio)
            where = f" of tower(s) {', '.join(args.scope)}" if args.scope else ""
            ui.say(
                f"budget: at least {args.ratio:g} of the {_fmt_params(scoped.block_params())} block parameters"
                f"{where} (embeddings and head excluded) = {_fmt_params(target)} parameters"
            )
        ui.info(
            f"calibration: {cal_windows.num_windows} windows x {cal_windows.seq_len} tokens of {args.calib}; "
            f"planner {planner}, metric {metric_name}, granularity {granularity}, repair {repair}"
        )
        ids, extra = _multimodal(model, cal_windows.ids)  # a vision-language model: images in every window
        if uses_width(metric_name, granularity) or granularity == "expert":
            # width planners read the windows, not stream stats
            cal = Calibration(windows=ids, inputs=extra)
        else:
            with ui.step("calibrate"):
                cal = calibrate(model, ids, inputs=extra)
        with ui.step(f"plan ({planner}:{metric_name}, {granularity})"):
            plan = plan_pruning(
                model,
                cal,
                ratio=args.ratio,
                metric=metric_name,
                granularity=granularity,
                planner=planner,
                repair=repair,
                on_step=lambda msg: ui.info("  " + msg),
                round_to=args.round_to,
                width_allocation=args.width_allocation,
                expert_allocation=args.expert_allocation,
                top_k_policy=args.top_k,
                scope=args.scope,
                repair_optional=repair_arg is None,
            )
        if plan.repair != repair:  # a defaulted repair the plan's towers cannot take
            ui.say(next((n for n in plan.notes if "repair" in n), f"repair: {plan.repair}"))
        result["budget"] = {
            "ratio": args.ratio,
            "target_params": target,
            "block_params": ir.restricted(args.scope).block_params(),
            "excludes": "embeddings and head",
            "scope": list(args.scope) or "all",
        }
        if granularity == "expert":
            result["budget"]["unit"] = "experts per MoE layer"
    else:
        plan = given_plan
        ui.say(
            f"plan: {args.plan or 'streaming'} ({plan.method or 'no method recorded'}, {len(plan.remove)} units, "
            f"{len(plan.remove_groups)} narrowed channel-group families)"
        )

    units = ir.units()
    families = ir.all_channel_groups()
    title = f"plan: remove {len(plan.remove)} unit(s)"
    if plan.remove_groups:
        title += f", narrow {len(plan.remove_groups)} channel-group familie(s)"
    table = Table(title=title)
    for col in ("unit", "kind", "params", "score"):
        table.add_column(col, justify="right" if col in ("params", "score") else "left")
    for uid in plan.remove:
        unit = units.get(uid)
        kind = getattr(unit, "kind", "block") if unit is not None else "?"
        sc = plan.scores.get(uid)
        table.add_row(uid, kind, _fmt_params(unit.params) if unit else "?", "" if sc is None else f"{sc:.4g}")
    for fid, groups in plan.remove_groups.items():
        fam = families[fid][1] if fid in families else None
        kind = f"{fam.kind} -{len(groups)}/{fam.count}" if fam else "?"
        table.add_row(fid, kind, _fmt_params(len(groups) * fam.params_per_group) if fam else "?", "")
    ui.table(table)
    shape = "uniform (the config describes it)" if plan.is_uniform else "non-uniform"
    ui.say(
        f"achieved: {_fmt_params(plan.removed_params)} of {_fmt_params(plan.block_params)} block parameters "
        f"removed ({plan.achieved_ratio:.2%}); {shape}"
    )
    per_tower = budget_by_tower(ir, plan)
    if len(per_tower) > 1:
        for name, (gone, total) in per_tower.items():
            ui.say(
                f"  tower {name}: {_fmt_params(gone)} of {_fmt_params(total)} block parameters ({gone / total:.2%})"
            )
    result["by_tower"] = {n: {"removed": g, "block_params": t} for n, (g, t) in per_tower.items()}
    result["plan"] = plan.model_dump(mode="json")
    result["removed"] = list(plan.remove)
    result["achieved_ratio"] = plan.achieved_ratio
    result["uniform"] = plan.is_uniform

    if args.plan_only:
        _save_plan(plan, out)
        ui.say(f"plan written to {out}")
        result["written"] = "plan"
        if ui.json_mode:
            ui.emit_json(result)
        return EXIT_OK

    images = _images(model)
    feats_before = image_features(model, images) if images is not None else None
    with ui.step("apply plan" + (f" (repair {plan.repair})" if plan.repair != "none" else "")):
        # as applied: says whether the config alone describes the result
        plan = apply_plan(
            model, plan, repair_windows=cal_windows.ids if cal_windows is not None else None
        ).plan
    result["uniform"] = plan.is_uniform
    if args.recover == "lora":
        skip = {args.calib: cal_windows.num_tokens} if cal_windows is not None else {}
        model, result["recovery"] = _heal_lora(args, ui, model, tok, heal_texts, skip)
        plan = plan.model_copy(update={"recovery": result["recovery"]})  # the saved plan says how it was made
    params_after = count_parameters(model)
    ui.say(f"parameters: {_fmt_params(params_before.total)} -> {_fmt_params(params_after.total)}")
    if feats_before is not None:
        fidelity = feature_fidelity(feats_before, image_features(model, images))
        ui.say(
            f"image-feature fidelity: {fidelity:.4f} (mean cosine of the projector's outputs before/after, "
            f"{images.shape[0]} sample images)"
        )
        result["image_feature_fidelity"] = fidelity
    result["params_before"] = params_before.total
    result["params_after"] = params_after.total
    ppl_after = None
    if eval_windows is not None:
        with ui.step(f"perplexity after on {args.eval}"):
            ppl_after = perplexity(model, eval_windows.ids, progress=_bars())
        ui.say(
            f"perplexity after:  {ppl_after.perplexity:.3f} on {ppl_after.tokens} tokens of {args.eval} "
            f"(seq_len {ppl_after.seq_len})"
        )
    result["perplexity_before"] = _ppl_dict(ppl_before) if ppl_before else None
    result["perplexity_after"] = _ppl_dict(ppl_after) if ppl_after else None
    with ui.step(f"save {out}"):
        saved = save_pruned(model, out, tokenizer=tok, plan=plan, overwrite=args.force)
    auto = "AutoModelForCausalLM" if len(ir.towers) == 1 else type(model).__name__
    loader = f"{auto}.from_pretrained(dir)" if plan.is_uniform else "prunekit_core.load_pruned(dir)"
    ui.say(f"saved to {saved}; reload with {loader}")
    result["out"] = str(saved)
    result["written"] = "checkpoint"
    if ui.json_mode:
        ui.emit_json(result)
    return EXIT_OK


def _check_streaming_prune(
    args: argparse.Namespace, metric: str, planner: str, granularity: str, repair: str
) -> None:
    from .metrics import ChannelMetric
    from .plugins import get_metric
    from .streaming import check_streaming_metric, streaming_metrics

    if args.plan is not None:
        raise PlanError("--streaming makes a plan; --plan applies an existing one: drop --streaming")
    if args.metric is None:
        raise PlanError(
            f"--streaming needs a metric it can compute: pass --metric (one of {', '.join(streaming_metrics())}; "
            f"the default method, {metric} with repair {repair}, reads the whole model)"
        )
    m = get_metric(metric)
    check_streaming_metric(m)
    if repair != "none":
        raise PlanError(f"--streaming plans without repair; got repair {repair} (pass --repair none)")
    if planner != "rank" and (planner != "greedy" or granularity not in ("block", "sublayer")):
        raise PlanError(
            f"--streaming plans with the rank planner, or with the greedy one at block or sublayer granularity; "
            f"got planner {planner}, granularity {granularity} (pass --planner rank, or --granularity block or "
            "sublayer)"
        )
    if granularity == "mixed" and isinstance(m, ChannelMetric):
        raise PlanError(
            "the mixed planner with a channel metric measures its candidate plans on pruned copies of the "
            "whole model, which --streaming does not hold: use --granularity width, a block or sublayer "
            "metric at --granularity mixed, or drop --streaming"
        )
    if args.recover == "lora":
        raise PlanError("--streaming cannot heal with LoRA (it needs the whole model): drop one of them")


def _plan_streaming(
    args: argparse.Namespace,
    ui: UI,
    metric: str,
    planner: PlannerName,
    granularity: Granularity,
    repair: RepairName,
) -> Any:
    from .planning import budget_params, check_budget, plan_pruning, uses_width
    from .plugins import get_metric
    from .width_scoring import WidthCurveObserver

    sm, tok = _open_streaming(ui, args.model)
    if not uses_width(metric, granularity):
        check_budget(sm.ir.restricted(args.scope), args.ratio, granularity)  # before the streaming pass
    windows = _windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
    if granularity != "expert":
        scoped = sm.ir.restricted(args.scope)
        where = f" of tower(s) {', '.join(args.scope)}" if args.scope else ""
        ui.say(
            f"budget: at least {args.ratio:g} of the {_fmt_params(scoped.block_params())} block parameters"
            f"{where} (embeddings and head excluded) = {_fmt_params(budget_params(scoped, args.ratio))} "
            "parameters"
        )
    ui.info(
        f"calibration: {windows.num_windows} windows x {windows.seq_len} tokens of {args.calib}; "
        f"planner {planner}, metric {metric}, granularity {granularity}, streaming"
    )
    m = get_metric(metric)
    if uses_width(metric, granularity):  # the width cost model's curves, block by block
        curves = [WidthCurveObserver(m, repair=False)]  # --streaming plans without repair (checked above)
        cal = _stream_calibrate(ui, sm, windows.ids, [], curves, images=False)  # text windows, as in memory
    else:
        cal = _stream_calibrate(ui, sm, windows.ids, [m])
    loads = sm.loaded_blocks
    with ui.step(f"plan ({planner}:{metric}, {granularity})"):
        plan = plan_pruning(
            sm.model,
            cal,
            ratio=args.ratio,
            metric=metric,
            granularity=granularity,
            planner=planner,
            repair=repair,
            adapter=sm.adapter,
            round_to=args.round_to,
            width_allocation=args.width_allocation,
            expert_allocation=args.expert_allocation,
            top_k_policy=args.top_k,
            scope=args.scope,
            on_step=lambda msg: ui.info("  " + msg),
        )
    if sm.loaded_blocks > loads:
        ui.info(f"removal trials: {sm.loaded_blocks - loads} more block loads from disk")
    return plan


# --- prunekit recover --------------------------------------------------------------------------------


def cmd_recover(args: argparse.Namespace, ui: UI) -> int:
    from .checkpoint import PLAN_FILE, RECORD_FILE, save_pruned
    from .evaluate import perplexity
    from .plan import PrunePlan
    from .surgery import apply_plan

    # cheap checks first: nothing is loaded or written before all of them pass
    out = Path(args.out).expanduser()
    _check_out(out, plan_only=False, force=args.force)
    if args.eval is not None:
        _check_text(args.eval)
    if args.calib is not None:
        _check_text(args.calib)
    plan = None
    if args.method == "lora":
        if args.base is not None:
            raise PlanError("--base is for --method repair (it re-applies the plan to the unpruned model)")
        heal_texts = _heal_texts(args)
        _check_model(args.model)
    else:
        plan_file = Path(args.model).expanduser() / PLAN_FILE
        if not plan_file.is_file():
            raise PlanError(
                f"--method repair needs a prunekit output folder holding {PLAN_FILE}; {args.model} has none"
            )
        from .checkpoint import verify_checkpoint

        if (plan_file.parent / RECORD_FILE).is_file():
            verify_checkpoint(plan_file.parent)  # the plan must be the one saved with these weights
        plan = PrunePlan.load(plan_file)
        if plan.recovery:
            raise PlanError(
                f"{args.model} was already healed ({plan.recovery.get('method')}); the repair comes before "
                "LoRA: run prunekit prune --recover lora on the unpruned model instead"
            )
        if args.base is None or args.calib is None:
            raise PlanError(
                "--method repair refits from the unpruned model: pass --base MODEL (the model the plan was "
                "made for) and --calib TEXT (the calibration text)"
            )
        _check_model(args.base)

    result: dict[str, Any] = {"model": args.model, "method": args.method, "out": str(out.absolute())}
    if args.method == "lora":
        model, tok, src = _load_model(ui, args.model, args)
        skip = {args.calib: args.windows * args.seq_len} if args.calib is not None else {}
        model, result["recovery"] = _heal_lora(args, ui, model, tok, heal_texts, skip)
        from .checkpoint import read_plan

        if src.path is not None and (src.path / RECORD_FILE).is_file():
            plan = read_plan(src.path)  # a prunekit checkpoint: the plan load_pruned verified
        if plan is None:
            ui.say("note: the model has no prunekit plan, so the checkpoint does not record the healing")
        else:
            plan = plan.model_copy(update={"recovery": result["recovery"]})
    else:
        assert plan is not None and args.base is not None
        model, tok, _src = _load_model(ui, args.base, args)
        cal = _windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows)
        with ui.step("apply plan with the least-squares repair"):
            plan = apply_plan(model, plan.model_copy(update={"repair": "lsq"}), repair_windows=cal.ids).plan
        result["recovery"] = {"method": "repair", "calibration_tokens": cal.num_tokens}
    if args.eval is not None:
        windows = _windows(
            tok, args.eval, seq_len=args.eval_seq_len, num_windows=None, max_tokens=args.eval_tokens
        )
        with ui.step(f"perplexity on {args.eval}"):
            res = perplexity(model, windows.ids, progress=_bars())
        ui.say(f"perplexity after recovery: {res.perplexity:.3f} on {res.tokens} tokens of {args.eval}")
        result["perplexity_after"] = _ppl_dict(res)
    with ui.step(f"save {out}"):
        saved = save_pruned(model, out, tokenizer=tok, plan=plan, overwrite=args.force)
    ui.say(f"saved to {saved}")
    result["out"] = str(saved)
    if ui.json_mode:
        ui.emit_json(result)
    return EXIT_OK


# --- prunekit eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace, ui: UI) -> int:
    from .evaluate import count_parameters, perplexity, size_on_disk

    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise CalibrationError(
            f"--max-tokens {args.max_tokens} is smaller than one window of --seq-len {args.seq_len}"
        )
    _check_text(args.text)
    source = _check_model(args.model)
    model, tok, source = _load_model(ui, args.model, args)
    windows = _windows(
        tok, args.text, seq_len=args.seq_len, num_windows=args.windows, max_tokens=args.max_tokens
    )
    ui.info(f"evaluating {windows.num_windows} windows x {windows.seq_len} tokens of {args.text}")
    with ui.step("perplexity"):
        res = perplexity(model, windows.ids, batch_size=args.batch_size, progress=_bars())
    counts = count_parameters(model)
    size = size_on_disk(source.path) if source.kind == "hf_dir" and source.path is not None else None
    result = {
        "model": args.model,
        "text": args.text,
        **_ppl_dict(res),
        "params": {
            "total": counts.total,
            "embeddings": counts.embeddings,
            "head": counts.head,
            "body": counts.body,
            "tied": counts.tied,
        },
        "size_on_disk_bytes": size,
    }
    if ui.json_mode:
        ui.emit_json(result)
        return EXIT_OK
    ui.say(f"perplexity: {res.perplexity:.4f} (nll {res.nll:.4f})")
    ui.say(
        f"text: {args.text}; seq_len {res.seq_len}; {res.windows} windows; {res.tokens} predicted tokens "
        "(the first token of each window is context only)"
    )
    ui.say(
        f"params: total {_fmt_params(counts.total)}, embeddings {_fmt_params(counts.embeddings)}, "
        f"head {_fmt_params(counts.head)}{' (tied)' if counts.tied else ''}, body {_fmt_params(counts.body)}"
    )
    if size is not None:
        ui.say(f"size on disk: {size / 2**20:.1f} MiB")
    return EXIT_OK


# --- prunekit demo ----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, ui: UI) -> int:
    from .demo import run_demo

    check_ratio(args.ratio)
    result = run_demo(
        out=Path(args.out),
        ratio=args.ratio,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        calib_windows=args.calib_windows,
        calib_seq_len=args.calib_seq_len,
        log=ui.info,
        say=ui.say,
        status=ui.err.status,
    )
    if ui.json_mode:
        ui.emit_json(result)
    return EXIT_OK


# --- the parser ---------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps description paragraphs (blank-line separated) and keeps the examples epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return text
        return "\n\n".join(
            super(_HelpFormatter, self)._fill_text(p, width, indent) for p in text.split("\n\n")
        )


def _epilog(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_load_args(p: argparse.ArgumentParser) -> None:
    """The load policy flags: both off by default (safetensors only, no code from the checkpoint)."""
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a folder whose weights are pickled (pytorch_model.bin, *.pt, *.pth), read with "
        "torch.load(weights_only=True); without it only safetensors are loaded",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model or tokenizer code shipped with the checkpoint (config.json auto_map); only for "
        "sources you trust",
    )


def _add_calib_window_args(p: argparse.ArgumentParser) -> None:
    """--seq-len and --windows: the calibration windows (score, prune, recover)."""
    p.add_argument(
        "--seq-len",
        type=_seq_len,
        default=256,
        metavar="N",
        help="tokens per calibration window (default 256)",
    )
    p.add_argument(
        "--windows",
        type=_positive("--windows"),
        default=32,
        metavar="N",
        help="calibration windows (default 32)",
    )


def _add_eval_args(p: argparse.ArgumentParser, eval_help: str) -> None:
    """--eval, --eval-tokens and --eval-seq-len (prune, recover)."""
    p.add_argument("--eval", metavar="TEXT", help=eval_help)
    p.add_argument(
        "--eval-tokens",
        type=_positive("--eval-tokens"),
        default=8192,
        metavar="N",
        help="tokens of --eval text to evaluate, in whole windows (default 8192)",
    )
    p.add_argument(
        "--eval-seq-len",
        type=_seq_len,
        default=1024,
        metavar="N",
        help="tokens per evaluation window (default 1024)",
    )


def _add_lora_args(p: argparse.ArgumentParser, default_texts: tuple[str, ...]) -> None:
    p.add_argument(
        "--lora-text",
        default=",".join(default_texts),
        metavar="T1,T2",
        help="healing texts, comma-separated, never the --eval text; the calibration windows are skipped "
        f"(default {','.join(default_texts)})",
    )
    p.add_argument(
        "--lora-steps",
        type=_positive("--lora-steps"),
        default=110,
        metavar="N",
        help="LoRA steps (default 110; bench/lora_speed.py times a step on this machine)",
    )
    p.add_argument(
        "--lora-lr", type=float, default=1e-3, metavar="LR", help="LoRA learning rate (default 1e-3)"
    )
    p.add_argument(
        "--lora-rank", type=_positive("--lora-rank"), default=8, metavar="R", help="LoRA rank (default 8)"
    )
    p.add_argument(
        "--lora-batch",
        type=_positive("--lora-batch"),
        default=4,
        metavar="N",
        help="LoRA windows per step (default 4)",
    )
    p.add_argument(
        "--lora-seq-len", type=_seq_len, default=256, metavar="N", help="tokens per LoRA window (default 256)"
    )
    p.add_argument(
        "--lora-precision",
        choices=LORA_PRECISIONS,
        default="auto",
        help="LoRA training precision: auto (default) = bfloat16 autocast on a CPU with native bfloat16 "
        "matmul (avx512_bf16 or AMX; weights, adapters and optimiser stay fp32), fp32 elsewhere; fp32 trains "
        "as a CPU without bfloat16 does. The plan records which ran",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the LoRA initialisation and data order (default 0)"
    )


STREAMING_HELP = (
    "calibrate one block at a time, read from MODEL's safetensors shards: memory stays at one block plus "
    "the calibration activations, so models larger than memory can be scored: every metric that needs no "
    "gradients (bi, angular, sublayer_drop from the stream; nri and sleb by removal trials in passes "
    "over the blocks; magnitude, wanda, obs, bi_lsq and plugin metrics such as the expert metrics from each "
    "block's weights and statistics while it is loaded); not taylor; a vision-language model streams tower by "
    "tower with its calibration images (removal trials score the language model's units)"
)


def build_parser() -> argparse.ArgumentParser:
    from .defaults import (
        BEST,
        BEST_EXPERT,
        BEST_SUBLAYER,
        BEST_WIDTH,
        DEFAULT_HEAL_TEXTS,
        DEFAULT_ROUND_TO,
        GRANULARITIES,
        MODEL_ALIASES,
        TEXT_ALIASES,
    )

    text_help = _TEXT_HELP.format(aliases=", ".join(TEXT_ALIASES))
    model_help = _MODEL_HELP.format(aliases=", ".join(MODEL_ALIASES))
    fmt = _HelpFormatter

    parser = argparse.ArgumentParser(
        prog="prunekit",
        description=(
            "Structured pruning of LLMs: inspect a model's pruning IR, score its blocks and sublayers, prune to "
            "a parameter budget, evaluate perplexity, save and reload. Errors exit with code 2."
        ),
        formatter_class=fmt,
        epilog=_epilog(
            "prunekit demo",
            "prunekit plugins",
            "prunekit inspect smollm2-135m",
            "prunekit prune smollm2-135m --ratio 0.1 --calib c4 --eval wiki --out out/smollm2-10",
            "prunekit eval out/smollm2-10 --text wiki --max-tokens 8192 --json",
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show INFO logs and third-party warnings, logs and progress bars (torch, torchao, transformers)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout and nothing else (progress: stderr)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="same as prunekit -v"
    )

    p = sub.add_parser(
        "plugins",
        parents=[common],
        formatter_class=fmt,
        help="list installed plugins, what they register, and load failures",
        description=(
            "List every prunekit plugin (built-in and installed through the 'prunekit' entry-point group): "
            "name, version, the adapters, metrics and quantization formats it registers, and the plugins that "
            "failed to load (with the error). The list comes from each plugin's catalog (its prunekit_catalog "
            "hook), which needs no torch; --load builds everything the plugins register instead, as a command "
            "that uses a model does, and checks each catalog against it."
        ),
        epilog=_epilog("prunekit plugins", "prunekit plugins --json", "prunekit plugins --load"),
    )
    p.add_argument(
        "--load",
        action="store_true",
        help="import every plugin fully and build what it registers (slower: imports torch); a plugin whose "
        "registrations differ from its catalog is listed as failed",
    )
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser(
        "inspect",
        parents=[common],
        formatter_class=fmt,
        help="show the matched adapter and the model's pruning IR as a tree",
        description=(
            "Load MODEL and print which adapter describes it (with its match score, and the other adapters "
            "that also matched) and its pruning IR as a tree: total and block parameters, every block with "
            "its sublayers (unit ids, modules, pre-norms, parameters, channel groups, KV cache, residual "
            "edge) and the stages that are never removed. A model no family plugin covers is described by "
            "the built-in generic adapter (match score 1), which discovers blocks and sublayers with "
            "torch.export. --json prints the IR (ModelIR.model_dump()) plus the fingerprint, the selected "
            "match and every candidate."
        ),
        epilog=_epilog("prunekit inspect smollm2-135m", "prunekit inspect ./my-llama --json"),
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    _add_load_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "new-plugin",
        parents=[common],
        formatter_class=fmt,
        help="write a working skeleton plugin distribution for a model family",
        description=(
            "Write the plugin distribution prunekit-NAME for the transformers class --model-class: pyproject "
            "with the 'prunekit' entry point, an adapter and a conformance test. The adapter is filled in "
            "from the layout the generic adapter discovers in a tiny random model of that class (blocks, "
            "branches, pre-norms, stages), so the skeleton passes the conformance suite as written; refine "
            "it from there (docs/plugins/writing-a-plugin.md)."
        ),
        epilog=_epilog(
            "prunekit new-plugin gptj --model-class GPTJForCausalLM --config rotary_dim=8",
            "prunekit new-plugin olmo --model-class OlmoForCausalLM --out plugins/olmo",
        ),
    )
    p.add_argument("name", metavar="NAME", help="plugin and adapter name: a lowercase identifier, e.g. gptj")
    p.add_argument(
        "--model-class",
        required=True,
        metavar="CLASS",
        help="the transformers causal-LM class the plugin describes, e.g. GPTJForCausalLM",
    )
    p.add_argument("--out", type=Path, default=None, help="folder to write (default: ./prunekit-NAME)")
    p.add_argument(
        "--config",
        type=_config_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the tiny test model's config (JSON values; repeatable)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_new_plugin)

    p = sub.add_parser(
        "score",
        parents=[common],
        formatter_class=fmt,
        help="score blocks and sublayers with importance metrics",
        description=(
            "Calibrate MODEL on TEXT (one forward pass for all similarity metrics) and print the importance "
            "of every unit (higher = keep) for each metric, in unit order. Default metrics: "
            + ", ".join(DEFAULT_SCORE_METRICS)
            + " (angular over spans of --span blocks, default 1). Trial metrics (nri, sleb) measure the "
            "calibration loss with each unit removed. --json prints {metric: {unit: score}}.\n\n"
            "Channel metrics (magnitude, wanda, taylor, obs) score the groups of every channel-group family "
            "instead (KV groups, FFN channels): the table summarises each family and names its least "
            "important groups; --json prints {metric: {family: [score per group]}}."
        ),
        epilog=_epilog(
            "prunekit score smollm2-135m --calib c4",
            "prunekit score smollm2-135m --calib c4 --metric obs --metric wanda",
            "prunekit score smollm2-135m --calib c4 --metric bi --metric angular --span 4 --json",
            "prunekit score ./my-llama --calib notes.txt --seq-len 128 --windows 8 --metric nri",
            "prunekit score ./big-llama --calib c4 --metric bi --metric sublayer_drop --streaming",
        ),
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--calib", required=True, metavar="TEXT", help="calibration text: " + text_help)
    p.add_argument(
        "--metric",
        action="append",
        metavar="M",
        help="a metric name (repeat for several; see `prunekit plugins`); default: "
        + " ".join(DEFAULT_SCORE_METRICS),
    )
    _add_calib_window_args(p)
    p.add_argument(
        "--span",
        type=_positive("--span"),
        default=None,
        metavar="N",
        help="blocks per span for span metrics (default 1)",
    )
    _add_load_args(p)
    p.add_argument("--streaming", action="store_true", help=STREAMING_HELP)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "prune",
        parents=[common],
        formatter_class=fmt,
        help="plan and apply pruning to a parameter budget, evaluate, save",
        description=(
            "Remove at least --ratio of the parameters inside MODEL's blocks (embeddings and head excluded), "
            "choosing units with a metric and a planner, and save the pruned model to --out (safetensors, "
            "config, tokenizer, plan.json, prunekit.json). Plans that remove whole blocks only reload with "
            "plain transformers; any plan reloads with prunekit_core.load_pruned.\n\n"
            f"Defaults: metric {BEST['metric']}, planner {BEST['planner']}, granularity {BEST['granularity']}, "
            f"repair {BEST.get('repair', 'none')} (prunekit's best planner). With another --metric the planner defaults to greedy for trial "
            "metrics (nri, sleb) and rank otherwise, and the granularity to what the metric scores (block for "
            "bi/angular, sublayer for sublayer_drop).\n\n"
            "Inputs are checked before anything is loaded; nothing is written when a command fails."
        ),
        epilog=_epilog(
            "prunekit prune smollm2-135m --ratio 0.1 --calib c4 --out out/smollm2-10",
            "prunekit prune smollm2-135m --ratio 0.2 --calib c4 --granularity block --metric bi --out out/bi20",
            "prunekit prune smollm2-135m --ratio 0.1 --calib c4 --plan-only --out plan.json",
            "prunekit prune ./big-llama --ratio 0.2 --calib c4 --metric bi --streaming --plan-only --out plan.json",
            "prunekit prune ./my-mixtral --ratio 0.25 --calib c4 --granularity expert --out out/experts25",
            "prunekit prune smollm2-135m --plan plan.json --eval wiki --out out/from-plan --json",
        ),
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--ratio",
        type=float,
        metavar="R",
        help="fraction of block parameters to remove, strictly between 0 and 1 (with --granularity expert: "
        "of the experts of every MoE layer; required unless --plan)",
    )
    p.add_argument(
        "--calib",
        metavar="TEXT",
        help="calibration text (required, except with a --plan that does not repair weights): " + text_help,
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder for the pruned model (with --plan-only: the plan JSON file to write)",
    )
    p.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        help="what may be removed: whole blocks, single sublayers (attention/MLP/MoE; the default metric: "
        f"{BEST_SUBLAYER['metric']}, repair {BEST_SUBLAYER['repair']}), channel groups inside "
        "sublayers (width: KV groups with their query heads, FFN channels), mixed: blocks and sublayers, "
        "plus channel groups when the metric scores them (the default metric for width and mixed: "
        f"{BEST_WIDTH['metric']}, repair {BEST_WIDTH['repair']}), or expert: whole experts of MoE layers, "
        f"--ratio then being a fraction of each layer's experts (default metric {BEST_EXPERT['metric']})",
    )
    p.add_argument(
        "--round-to",
        type=_positive("--round-to"),
        default=DEFAULT_ROUND_TO,
        metavar="N",
        help="width: kept channels of every family are a multiple of N (along its narrowest member; "
        f"default {DEFAULT_ROUND_TO})",
    )
    p.add_argument(
        "--width-allocation",
        choices=("global", "uniform"),
        default=BEST_WIDTH["width_allocation"],
        help="width: uniform removes the same number of groups of each kind from every layer (plain "
        "from_pretrained reloads it); global spreads the budget over layers by estimated loss per parameter "
        f"(per-layer widths, reload with load_pruned). Default {BEST_WIDTH['width_allocation']}",
    )
    p.add_argument(
        "--expert-allocation",
        choices=("global", "uniform"),
        default=BEST_EXPERT["expert_allocation"],
        help="expert: uniform removes ceil(R x experts) from every MoE layer (plain from_pretrained reloads "
        "it); global removes as many in total where an expert's share of its layer's importance is lowest "
        f"(per-layer counts, reload with load_pruned). Default {BEST_EXPERT['expert_allocation']}",
    )
    p.add_argument(
        "--top-k",
        choices=("error", "clamp"),
        default="error",
        help="expert: a layer left with fewer experts than its router's top_k is an error, or clamp: that "
        "layer's top_k becomes the number of experts left (default error)",
    )
    p.add_argument(
        "--scope",
        type=_scope,
        default=(),
        metavar="TOWERS",
        help="towers the plan may touch: all (default), or tower names, comma-separated (a vision-language "
        "model has vision and text; see prunekit inspect). --ratio is then a fraction of those towers' "
        "block parameters; the budget is reported per tower",
    )
    p.add_argument("--metric", metavar="M", help=f"importance metric (default {BEST['metric']})")
    p.add_argument(
        "--planner",
        choices=("rank", "greedy"),
        help="rank: score once, drop the least important; greedy: re-measure after each removal (trial metrics)",
    )
    p.add_argument(
        "--repair",
        choices=("none", "lsq"),
        help="lsq: fold what removed branches contributed into surviving output projections, fitted by least "
        f"squares on the calibration text (default {BEST.get('repair', 'none')} with the default metric, none "
        "when --metric is given)",
    )
    p.add_argument(
        "--recover",
        choices=("none", "repair", "lora"),
        help="recovery after surgery: none; repair = the least-squares fold of --repair lsq (no added "
        "parameters); lora = the plan's repair, then LoRA fine-tuning (peft) on --lora-text, merged into the "
        "weights (a plain transformers model; recorded in plan.json). Default: as --repair",
    )
    _add_lora_args(p, DEFAULT_HEAL_TEXTS)
    _add_calib_window_args(p)
    p.add_argument("--plan-only", action="store_true", help="write only the plan JSON to --out (a file path)")
    p.add_argument(
        "--streaming",
        action="store_true",
        help=STREAMING_HELP
        + "; plans with a named --metric and no repair: the rank planner at granularity block, sublayer, "
        "mixed (block/sublayer metrics), width (channel metrics; uniform or global allocation; not the "
        "channels inside fused experts) or expert, or the greedy planner at block or sublayer granularity "
        "(nri, sleb: each round of trials forks from the committed removals, a pass over the blocks per 8 "
        "trials). With --plan-only the model is never loaded whole; otherwise it is loaded after planning for "
        "the surgery",
    )
    p.add_argument(
        "--plan",
        metavar="PLAN.json",
        help="apply this plan instead of planning (checked against the model's fingerprint)",
    )
    _add_eval_args(p, "also report perplexity before and after on this text: " + text_help)
    p.add_argument(
        "--force", action="store_true", help="replace --out if it exists (a previous prunekit output)"
    )
    _add_load_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "recover",
        parents=[common],
        formatter_class=fmt,
        help="heal a pruned model: LoRA fine-tuning merged into the weights, or the least-squares repair",
        description=(
            "Recover quality after pruning. --method lora fine-tunes LoRA adapters (peft) on every linear layer "
            "inside MODEL's blocks on --lora-text (never the --eval text) and merges them into the weights: the "
            "result is a plain transformers model, and its plan.json records the healing. --method repair "
            "re-applies MODEL's plan to the unpruned --base model with the least-squares repair fitted on "
            "--calib (it must come before any LoRA healing).\n\n"
            "Inputs are checked before anything is loaded; nothing is written when a command fails."
        ),
        epilog=_epilog(
            "prunekit recover out/smollm2-20 --out out/smollm2-20-healed --calib c4 --eval wiki",
            "prunekit recover out/smollm2-20 --method repair --base smollm2-135m --calib c4 --out out/rep20",
        ),
    )
    p.add_argument(
        "model", metavar="MODEL", help="the pruned model: a prunekit output folder (or " + model_help + ")"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the recovered model")
    p.add_argument(
        "--method", choices=("lora", "repair"), default="lora", help="recovery method (default lora)"
    )
    p.add_argument("--base", metavar="MODEL", help="repair: the unpruned model the plan was made for")
    p.add_argument(
        "--calib",
        metavar="TEXT",
        help="the calibration text: repair fits on it; lora skips its calibration windows (--windows x --seq-len "
        "tokens) when it is also a healing text",
    )
    _add_calib_window_args(p)
    _add_lora_args(p, DEFAULT_HEAL_TEXTS)
    _add_eval_args(p, "report perplexity after recovery on this text: " + text_help)
    p.add_argument(
        "--force", action="store_true", help="replace --out if it exists (a previous prunekit output)"
    )
    _add_load_args(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser(
        "eval",
        parents=[common],
        formatter_class=fmt,
        help="perplexity, parameter counts and size on disk of a model or pruned folder",
        description=(
            "Perplexity of MODEL_OR_DIR on TEXT over non-overlapping windows of --seq-len tokens (each window "
            "is an independent sequence; its first token is context only), plus parameter counts and, for a "
            "folder, its size on disk. By default the whole text is used; cap it with --max-tokens or --windows."
        ),
        epilog=_epilog(
            "prunekit eval smollm2-135m --text wiki --max-tokens 8192",
            "prunekit eval out/smollm2-10 --text wiki --seq-len 1024 --windows 8 --json",
        ),
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help=model_help)
    p.add_argument("--text", required=True, metavar="TEXT", help="evaluation text: " + text_help)
    p.add_argument(
        "--seq-len", type=_seq_len, default=1024, metavar="N", help="tokens per window (default 1024)"
    )
    p.add_argument(
        "--max-tokens",
        type=_positive("--max-tokens"),
        default=None,
        metavar="N",
        help="evaluate at most N tokens, in whole windows (default: the whole text)",
    )
    p.add_argument(
        "--windows", type=_positive("--windows"), default=None, metavar="N", help="evaluate at most N windows"
    )
    p.add_argument(
        "--batch-size",
        type=_positive("--batch-size"),
        default=4,
        metavar="N",
        help="windows per forward pass (default 4; speed only)",
    )
    _add_load_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=fmt,
        help="prune SmolLM2-135M by 10%% end to end (a few minutes on a laptop CPU)",
        description=(
            "On the real SmolLM2-135M-Instruct (alias smollm2-135m, dequantized from its Q4_1 GGUF): calibrate on c4, measure perplexity on wiki, prune "
            "--ratio of the block parameters with prunekit's best planner, measure again, save to --out, reload "
            "the result (plain transformers for a whole-block plan, prunekit_core.load_pruned otherwise) and "
            "check its logits, and write scores.png (per-block BI and per-sublayer drop scores, removed units "
            "highlighted; the title names the method that chose them). Timings are printed per step. --out is replaced only when it holds a previous "
            "prunekit output."
        ),
        epilog=_epilog("prunekit demo", "prunekit demo --out /tmp/demo --ratio 0.2 --eval-windows 4 --json"),
    )
    p.add_argument(
        "--out",
        default="prunekit-demo-out",
        metavar="DIR",
        help="output folder (default ./prunekit-demo-out)",
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=0.1,
        metavar="R",
        help="fraction of block parameters to remove (default 0.1)",
    )
    p.add_argument(
        "--eval-windows",
        type=_positive("--eval-windows"),
        default=8,
        metavar="N",
        help="wiki windows to evaluate (default 8)",
    )
    p.add_argument(
        "--eval-seq-len",
        type=_seq_len,
        default=1024,
        metavar="N",
        help="tokens per evaluation window (default 1024)",
    )
    p.add_argument(
        "--calib-windows",
        type=_positive("--calib-windows"),
        default=32,
        metavar="N",
        help="c4 calibration windows (default 32)",
    )
    p.add_argument(
        "--calib-seq-len",
        type=_seq_len,
        default=256,
        metavar="N",
        help="tokens per calibration window (default 256)",
    )
    p.set_defaults(func=cmd_demo)

    _add_sweep_parsers(sub, common, fmt)
    return parser


# --- sweep and report ----------------------------------------------------------------------------------


def _add_sweep_parsers(sub: Any, common: argparse.ArgumentParser, fmt: Any) -> None:
    from .defaults import EXECUTORS

    p = sub.add_parser(
        "sweep",
        parents=[common],
        formatter_class=fmt,
        help="run a grid of pruning methods x ratios x quantization formats into a SQLite store",
        description=(
            "Run every cell of CONFIG (YAML or JSON: model, calibration, evaluation, methods, ratios, formats, "
            "quantize) not yet in --results. Each finished cell is one row, committed as it finishes: a sweep "
            "killed at any moment resumes, without losing or duplicating a row, when started again. Ratio 0 "
            "runs once (the unpruned model). See docs/sweep.md."
        ),
        epilog=_epilog(
            "prunekit sweep sweep.yaml --results out/sweep.sqlite",
            "prunekit sweep sweep.yaml --results out/sweep.sqlite --executor serial",
            "prunekit sweep sweep.yaml --results out/sweep.sqlite --executor ray --ray-address auto",
            "prunekit report out/sweep.sqlite --out out/report",
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="sweep config, .yaml/.yml or .json")
    p.add_argument(
        "--results", required=True, metavar="PATH", help="SQLite results store (created or resumed)"
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: a process pool on this machine (default); serial: this process, one cell after another; "
        "ray: a Ray cluster (pip install 'prunekit-core[ray]')",
    )
    p.add_argument(
        "--workers",
        type=_positive("--workers"),
        default=None,
        metavar="N",
        help="local/ray: parallel cells (default: one per CPU core, each single-threaded)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="ray: cluster address (default: start a local Ray)",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "report",
        parents=[common],
        formatter_class=fmt,
        help="write a Markdown report and a PNG plot (bits per parameter vs perplexity) from a sweep",
        description=(
            "Read a results store written by `prunekit sweep` and write OUT/report.md (every cell, the Pareto "
            "front of bits per parameter against perplexity) and OUT/pareto.png (one marker per format, one "
            "color per pruning method and ratio)."
        ),
        epilog=_epilog("prunekit report out/sweep.sqlite --out out/report"),
    )
    p.add_argument("results", metavar="RESULTS", help="SQLite results store")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and pareto.png")
    p.add_argument("--title", default="", help="report and plot title")
    p.set_defaults(func=cmd_report)


def cmd_sweep(args: argparse.Namespace, ui: UI) -> int:
    from .sweep import load_sweep_config, plan_cells, run_sweep

    config = load_sweep_config(args.config)
    _check_model(config.model)  # a missing folder fails here, not in every worker
    cells = plan_cells(config)
    ui.info(
        f"sweep: {len(cells)} cells ({len(config.ratios)} ratios, {len(config.methods)} methods, "
        f"{len(config.formats)} formats) on {config.model}; evaluation {config.evaluation.windows} x "
        f"{config.evaluation.seq_len} tokens of {config.evaluation.text}; executor {args.executor}"
    )

    def on_row(row: dict[str, Any], done: int, total: int) -> None:
        ppl = row["perplexity"]
        ppl_s = f"{ppl:.2f}" if ppl is not None else "inf/nan"
        ui.info(
            f"[{done}/{total}] {row['cell']}: perplexity {ppl_s}, {row['bits_per_param']:.3f} bits/param "
            f"({row['seconds']:.1f} s)"
        )

    summary = run_sweep(
        config,
        args.results,
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
        on_row=on_row,
    )
    ui.info(
        f"sweep: {summary['written']} new rows, {summary['skipped']} already in {args.results}; "
        f"{summary['wall_s']:.1f} s"
    )
    if ui.json_mode:
        ui.emit_json(summary)
    else:
        ui.say(
            f"results: {args.results} ({summary['cells']} cells); next: prunekit report {args.results} --out DIR"
        )
    return EXIT_OK


def cmd_report(args: argparse.Namespace, ui: UI) -> int:
    from .report import write_report

    paths = write_report(args.results, args.out, title=args.title)
    if ui.json_mode:
        ui.emit_json({k: str(v) for k, v in paths.items()})
    else:
        ui.say(f"report: {paths['report']}\nplot: {paths['plot']}")
    return EXIT_OK


def subcommand_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """The parser of every subcommand, by name (docs and tests walk them)."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_markdown() -> str:
    """The generated part of docs/cli.md: ``--help`` of the tool and of every subcommand."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help to $COLUMNS: keep the docs stable
    try:
        parser = build_parser()
        parts = ["## prunekit\n", "```text", parser.format_help().rstrip(), "```\n"]
        for name, sp in subcommand_parsers(parser).items():
            parts += [f"## prunekit {name}\n", "```text", sp.format_help().rstrip(), "```\n"]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


# --- entry point ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 error or usage error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_ERROR
    verbose = bool(getattr(args, "verbose", False))
    ui = UI(json_mode=bool(getattr(args, "json", False)))
    try:
        with _quiet_libraries(verbose):
            return int(args.func(args, ui))
    except PrunekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
