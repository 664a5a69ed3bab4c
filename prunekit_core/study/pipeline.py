"""One prune from start to end: :func:`prune` loads, calibrates, plans, applies the plan with its repair,
heals, evaluates and saves, and returns a :class:`PruneResult`.

``prunekit prune``, ``prunekit demo``, the sweep's cells and the benchmarks all run this function, so the
policy they share lives here and nowhere else:

* cheap checks first: options, texts, the model spec and the output are checked before anything is
  loaded, computed or written;
* width, mixed-with-a-channel-metric and expert planners read the calibration windows, not the stream
  statistics, so they skip the calibration pass;
* a plan that repairs (``repair="lsq"``) is applied with the calibration windows; LoRA healing
  (``recover="lora"``) never reads the evaluation text and skips the calibration tokens of a text it
  shares with the calibration;
* ``streaming=True`` plans from a pass that holds one block in memory at a time (the model is loaded
  whole only for the surgery, or never with ``plan_only=True``).

:func:`~prunekit_core.study.commands.recover` is the second half run on its own (``prunekit recover``): heal an already pruned model with
LoRA, or re-apply its plan to the unpruned model with the least-squares repair (which comes before any
LoRA healing), then evaluate and save; it returns a :class:`RecoverResult`. It shares the checks, the
loading and the LoRA healing (the same rules about texts) with :func:`prune`.

What a caller may rely on: nothing is set on the model (the applied plan, its healing record and every
measurement are in the :class:`PruneResult`), and the checkpoint is written
with the plan passed explicitly. Progress and results are reported as they happen through a
:class:`Reporter` (silent by default; the command line prints through one).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from ..ir.defaults import DEFAULT_HEAL_TEXTS, DEFAULT_ROUND_TO, check_ratio
from ..ir.errors import CalibrationError, CheckpointError, ModelNotFoundError, PlanError, PrunekitError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.text import TextWindows
    from ..ir.defaults import Granularity, PlannerName, RepairName
    from ..ir.model import ModelIR
    from ..ir.plan import PrunePlan
    from ..scoring.calibration import Calibration
    from ..scoring.streaming import StreamingModel
    from .evaluate import PerplexityResult
    from .recovery import LoraReport

    #: a text spec (alias or path), token windows ``[n, seq_len]``, or windows cut from a text
    Windows: TypeAlias = "str | torch.Tensor | TextWindows"

__all__ = [
    "Clock",
    "apply_as_applied",
    "load_timed",
    "ppl_dict",
    "PruneResult",
    "Reporter",
    "check_heal_texts",
    "check_model_spec",
    "check_out",
    "check_text",
    "heal_with_lora",
    "load_model_spec",
    "open_streaming_spec",
    "prune",
    "stream_calibration",
    "write_plan",
]

Recover = Literal["none", "repair", "lora"]


class Reporter:
    """Where :func:`prune` reports while it runs. This base class says nothing; override what you show.

    ``say`` gets result lines (budget, plan, perplexities), ``info`` progress lines, ``table`` the plan's
    table, and ``step`` wraps each long stage (a spinner, a timing line). ``bars``: progress bars for
    calibration and evaluation; ``training_progress``: LoRA healing's bar or periodic line.
    """

    bars: bool = False
    training_progress: bool = False

    def say(self, message: str) -> None:
        """A result line."""

    def info(self, message: str) -> None:
        """A progress line."""

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table (the plan: unit, kind, params, score)."""

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Wraps one long stage, named ``label``."""
        yield


@dataclass
class PruneResult:
    """What :func:`prune` did.

    ``model``: the pruned (and healed) model; the unpruned one with ``plan_only``, ``None`` when a
    streaming ``plan_only`` run never loaded it. ``plan``: the plan as applied (``width_uniform`` as the
    surgery found it, the healing record in ``recovery``), or as made with ``plan_only``. ``report``: the
    JSON-serialisable summary ``prunekit prune --json`` prints. ``timings``: seconds per stage that ran
    (``load``, ``calibrate``, ``plan``, ``apply``, ``recover``, ``perplexity_before``,
    ``perplexity_after``, ``save``). ``out``: the folder (or, with ``plan_only``, the plan file) written.
    """

    model: nn.Module | None
    tokenizer: Any
    plan: PrunePlan
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None
    recovery: LoraReport | None = None
    out: Path | None = None


# --- cheap checks (nothing loaded) -------------------------------------------------------------------


def check_text(spec: str) -> Path:
    """Resolve a text alias or file and make sure it is readable and not empty (cheap: no tokenizer)."""
    from ..io.text import read_text, resolve_text

    path = resolve_text(spec)
    read_text(spec)
    return path


def check_model_spec(spec: str, *, tokenizer: bool = True) -> Any:
    """Resolve a model spec before anything is loaded: a path that does not exist fails at once (never a
    hub lookup), a folder without a tokenizer fails when ``tokenizer`` is needed, and a hub id is looked
    up once, without retries. Returns the :class:`~prunekit_core.io.sources.ModelSource`."""
    from ..io.sources import check_hub_model, check_tokenizer, resolve_model_source

    source = resolve_model_source(spec)
    if tokenizer:
        check_tokenizer(source)
    check_hub_model(source)
    return source


def check_out(out: Path, *, plan_only: bool, force: bool) -> None:
    """``out`` can be written: missing parent folders are fine (they are created when the result is)."""
    from ..io.checkpoint import check_parents, check_target

    if not plan_only:
        check_target(out.absolute(), force)
        return
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --force")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; with --plan-only, --out is the plan file to write")
    check_parents(out)


def write_plan(plan: PrunePlan, out: Path) -> None:
    """:func:`~prunekit_core.io.checkpoint.save_plan`, creating the file's missing parent folders (removed
    again if the write fails)."""
    from ..io.checkpoint import make_parents, remove_made, save_plan

    made = make_parents(out)
    try:
        save_plan(plan, out)
    except BaseException:
        remove_made(made)
        raise


def load_model_spec(
    spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, tokenizer: bool = True
) -> tuple[Any, Any, Any]:
    """:func:`~prunekit_core.io.loading.load_model`, with a file or format it cannot read reported as
    :class:`~prunekit_core.ir.errors.ModelNotFoundError` naming the spec."""
    from ..io.loading import load_model

    try:
        return load_model(
            spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, tokenizer=tokenizer
        )
    except PrunekitError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"could not load model {spec!r}: {type(exc).__name__}: {exc}") from exc


def check_heal_texts(texts: Sequence[str], eval_name: str | None) -> tuple[str, ...]:
    """The LoRA healing texts, checked before anything is loaded (never the evaluation text ``eval_name``)."""
    import peft  # noqa: F401  (a missing install fails here, before anything is loaded)

    names = tuple(t.strip() for t in texts if t.strip())
    if not names:
        raise CalibrationError("--lora-text names no text: give one or more texts, comma-separated")
    for t in names:
        check_text(t)
    if eval_name is not None and eval_name in names:
        raise CalibrationError(f"--lora-text includes the evaluation text {eval_name!r}: heal on other texts")
    return names


def _check_streaming(
    *,
    given_plan: bool,
    metric_named: bool,
    metric: str,
    planner: str,
    granularity: str,
    repair: str,
    recover: str | None,
) -> None:
    from ..registry.plugins import get_metric
    from ..scoring.metrics import ChannelMetric
    from ..scoring.streaming import check_streaming_metric, streaming_metrics

    if given_plan:
        raise PlanError("--streaming makes a plan; --plan applies an existing one: drop --streaming")
    if not metric_named:
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
    if recover == "lora":
        raise PlanError("--streaming cannot heal with LoRA (it needs the whole model): drop one of them")


# --- small helpers ------------------------------------------------------------------------------------


def fmt_params(n: int) -> str:
    return f"{n:,}"


def ppl_dict(res: PerplexityResult) -> dict[str, Any]:
    return dataclasses.asdict(res)


def multimodal_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration windows and the further inputs (images) that reach every tower of ``model``."""
    from ..registry.plugins import select_adapter

    return select_adapter(model).calibration_inputs(model, ids)


def sample_images(model: nn.Module, count: int = 8) -> torch.Tensor | None:
    """Sample images for a vision-language model's image-feature fidelity, or ``None`` for a text model."""
    import torch

    if not callable(getattr(model, "get_image_features", None)):
        return None
    # windows long enough for any image's placeholder tokens; only the images are used
    _ids, extra = multimodal_inputs(model, torch.zeros((count, 4096), dtype=torch.long))
    return cast("torch.Tensor | None", extra.get("pixel_values"))


def plan_table(plan: PrunePlan, ir: ModelIR) -> tuple[str, list[str], list[list[str]]]:
    """Title, columns and rows of the plan's table: every removed unit and narrowed family."""
    units = ir.units()
    families = ir.all_channel_groups()
    title = f"plan: remove {len(plan.remove)} unit(s)"
    if plan.remove_groups:
        title += f", narrow {len(plan.remove_groups)} channel-group familie(s)"
    rows: list[list[str]] = []
    for uid in plan.remove:
        unit = units.get(uid)
        kind = getattr(unit, "kind", "block") if unit is not None else "?"
        sc = plan.scores.get(uid)
        rows.append([uid, kind, fmt_params(unit.params) if unit else "?", "" if sc is None else f"{sc:.4g}"])
    for fid, groups in plan.remove_groups.items():
        fam = families[fid][1] if fid in families else None
        kind = f"{fam.kind} -{len(groups)}/{fam.count}" if fam else "?"
        rows.append([fid, kind, fmt_params(len(groups) * fam.params_per_group) if fam else "?", ""])
    return title, ["unit", "kind", "params", "score"], rows


def candidates_table(plan: PrunePlan) -> tuple[str, list[str], list[list[str]]]:
    """Title, columns and rows of the default method's candidates: what each removes, its held-out loss,
    its ratio to ShortGPT BI's, and which one was chosen."""
    from ..planning.select import label

    bi = next((c.heldout_loss for c in plan.candidates if label(c) == "bi"), None)
    rows: list[list[str]] = []
    for c in plan.candidates:
        loss = c.heldout_loss
        removed = ", ".join(u.replace("text.blocks.", "") for u in c.remove) or "-"
        rows.append(
            [
                label(c),
                removed,
                fmt_params(c.removed_params),
                "-" if loss is None else f"{loss:.4f}",
                "-" if loss is None or not bi else f"{loss / bi:.3f}",
                "chosen" if c.chosen else c.note,
            ]
        )
    sel = plan.selection
    where = f" ({sel.heldout_windows} windows, {sel.heldout_tokens} tokens)" if sel else ""
    title = f"default method: candidate plans at the budget, loss on held-out calibration windows{where}"
    return title, ["candidate", "removes", "params", "held-out loss", "vs BI", ""], rows


def _heldout_split(
    calib: Windows, heldout: torch.Tensor | TextWindows | None, tok: Any, *, seq_len: int, windows: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The calibration windows (they score the units and fit the repair), the held-out windows the default
    method compares its candidates on (disjoint from them), and how they were split, for the plan."""
    from ..io.text import TextWindows
    from ..ir.defaults import DEFAULT_HELDOUT_WINDOWS
    from ..planning.select import heldout_count

    name = _text_name(calib)
    if heldout is not None:
        held = heldout.ids if isinstance(heldout, TextWindows) else heldout
        ids = _windows_of(calib, tok, seq_len=seq_len, num_windows=windows)
        return ids, held, f"{held.shape[0]} windows given apart from the {ids.shape[0]} calibration windows"
    if isinstance(calib, str):
        ids = _windows_of(calib, tok, seq_len=seq_len, num_windows=windows + DEFAULT_HELDOUT_WINDOWS)
        if ids.shape[0] > windows:
            m = int(ids.shape[0])
            return (
                ids[:windows],
                ids[windows:],
                f"windows {windows}-{m - 1} of {name} (tokens {windows * seq_len}-{m * seq_len - 1}), after the "
                f"{windows} calibration windows that scored the units and fitted the repair",
            )
    else:
        ids = calib.ids if isinstance(calib, TextWindows) else calib
    n = int(ids.shape[0])
    k = heldout_count(n)
    return (
        ids[: n - k],
        ids[n - k :],
        f"the last {k} of the {n} calibration windows of {name}; the first {n - k} scored the units and "
        "fitted the repair",
    )


class Clock:
    """Per-stage timings; a labelled stage also goes through the reporter's ``step``."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, label: str | None = None) -> Iterator[None]:
        t0 = time.perf_counter()
        if label is None:
            yield
        else:
            with self.reporter.step(label):
                yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _windows_of(
    data: Windows,
    tokenizer: Any,
    *,
    seq_len: int,
    num_windows: int | None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    from ..io.text import TextWindows, load_windows

    if isinstance(data, TextWindows):
        return data.ids
    if not isinstance(data, str):
        return data

    if tokenizer is None:
        raise CalibrationError(
            f"text {data!r} needs a tokenizer: pass tokenizer= with a model object, or token windows instead"
        )
    return load_windows(tokenizer, data, seq_len=seq_len, num_windows=num_windows, max_tokens=max_tokens).ids


def _text_name(data: Windows | None) -> str:
    """How the reports name a text: its spec, or the spec the windows were cut from."""
    name = _text_spec(data)
    return name if name is not None else "the given windows"


def _text_spec(data: Windows | None) -> str | None:
    """The text spec of ``data`` (a spec, or windows cut from one), or ``None`` for bare token windows."""
    from ..io.text import TextWindows

    if isinstance(data, str):
        return data
    if isinstance(data, TextWindows):
        return data.source
    return None


# --- the pipeline -------------------------------------------------------------------------------------


def prune(
    model: str | os.PathLike[str] | nn.Module,
    *,
    tokenizer: Any = None,
    ratio: float | None = None,
    calib: Windows | None = None,
    plan: PrunePlan | str | os.PathLike[str] | None = None,
    metric: str | None = None,
    planner: PlannerName | None = None,
    granularity: Granularity | None = None,
    repair: RepairName | None = None,
    recover: Recover | None = None,
    calibration: Calibration | None = None,
    heldout: torch.Tensor | TextWindows | None = None,
    seq_len: int = 256,
    windows: int = 32,
    eval: Windows | None = None,
    eval_seq_len: int = 1024,
    eval_tokens: int | None = 8192,
    scope: Sequence[str] = (),
    round_to: int = DEFAULT_ROUND_TO,
    width_allocation: Literal["global", "uniform"] = "uniform",
    expert_allocation: Literal["global", "uniform"] = "uniform",
    top_k: Literal["error", "clamp"] = "error",
    streaming: bool = False,
    lora_texts: Sequence[str] = DEFAULT_HEAL_TEXTS,
    lora_steps: int = 110,
    lora_lr: float = 1e-3,
    lora_rank: int = 8,
    lora_batch: int = 4,
    lora_seq_len: int = 256,
    lora_precision: str = "auto",
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    plan_only: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
) -> PruneResult:
    """Prune ``model`` to a parameter budget: what ``prunekit prune`` does, as one call.

    ``model`` is a model spec (an alias, a Hugging Face folder, a ``.gguf`` file, a prunekit output, a hub
    id), loaded with its tokenizer, or a loaded ``nn.Module`` (pruned in place; pass ``tokenizer`` when
    ``calib`` or ``eval`` are texts). ``calib`` and ``eval`` are text specs (an alias such as ``c4`` or a
    path; cut into ``windows`` x ``seq_len``, and ``eval_tokens`` in windows of ``eval_seq_len``), token
    windows ``[n, seq_len]``, or :class:`~prunekit_core.io.text.TextWindows` (windows that name their text).

    Either ``ratio`` and ``calib`` (make a plan: ``metric``, ``planner``, ``granularity`` and ``repair``
    as in :func:`~prunekit_core.plan_pruning`; unset, prunekit's best) or ``plan`` (a
    :class:`~prunekit_core.PrunePlan` or its JSON file; ``calib`` only when it repairs). ``calibration``:
    a calibration pass already made on ``calib``'s windows (reused instead of running another).
    With no metric named, the self-validating default compares candidate plans on held-out windows of the
    calibration text: ``heldout`` (token windows disjoint from ``calib``'s), or else the
    :data:`~prunekit_core.ir.defaults.DEFAULT_HELDOUT_WINDOWS` windows that follow the calibration windows
    in a ``calib`` text, or else the last quarter of the given windows (the calibration and the repair
    then use the others).
    ``recover``: ``none`` (no repair), ``repair`` (the least-squares repair), ``lora`` (the plan's
    repair, then LoRA healing on ``lora_texts`` with the ``lora_*`` settings, merged into the weights);
    unset, as ``repair``. ``streaming``: plan block by block from the model's safetensors (a spec, a named
    streaming ``metric``, no repair). ``out``: the folder to save to (with ``plan_only``, the plan file);
    unset, nothing is written. ``overwrite`` replaces a previous prunekit output.

    Raises a :class:`~prunekit_core.ir.errors.PrunekitError` naming the problem and the fix, before anything
    is loaded or written when the inputs are inconsistent.
    """
    from ..io.checkpoint import load_plan
    from ..ir.plan import PrunePlan
    from ..planning.planner import resolve_method, self_validating

    rep = reporter if reporter is not None else Reporter()
    clock = Clock(rep)

    # cheap checks first: nothing is loaded, computed or written before all of them pass
    spec = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if spec is None and not _is_module(model):
        raise TypeError(
            f"prune(model=...) takes a model spec (str or path) or a torch.nn.Module; got {type(model).__name__}"
        )
    for name, data in (("calib", calib), ("eval", eval)):
        if data is not None and not isinstance(data, str) and not _is_windows(data):
            raise TypeError(
                f"prune({name}=...) takes a text spec (str), token windows (a torch.Tensor [n, seq_len]) or "
                f"TextWindows; got {type(data).__name__}"
            )
    given_plan: PrunePlan | None = None
    plan_source = "streaming"
    if plan is not None:
        if plan_only:
            raise PlanError("--plan-only makes a plan; --plan applies an existing one: choose one")
        if isinstance(plan, PrunePlan):
            given_plan, plan_source = plan, "given"
        else:
            given_plan, plan_source = load_plan(Path(plan)), os.fspath(plan)
    else:
        if ratio is None:
            raise PlanError(
                "--ratio is required (a fraction of block parameters in (0, 1)) unless --plan is given"
            )
        check_ratio(ratio)
        if calib is None:
            raise CalibrationError("--calib TEXT is required to plan (or pass an existing plan with --plan)")
    # BEST unless a metric is named; a named metric runs as published (planning.resolve_method)
    repair_arg = repair
    if recover is not None and recover not in ("none", "repair", "lora"):
        raise PlanError(f"recover must be none, repair or lora; got {recover!r}")
    if recover in ("none", "repair"):
        wanted: RepairName = "none" if recover == "none" else "lsq"
        if repair_arg is not None and repair_arg != wanted:
            raise PlanError(
                f"--recover {recover} contradicts --repair {repair_arg}: pass one of them "
                "(--recover repair is --repair lsq; --recover none turns the repair off)"
            )
        repair_arg = wanted
    heal_texts = check_heal_texts(lora_texts, _text_spec(eval)) if recover == "lora" else ()
    metric_name, planner_name, gran, repair_name = resolve_method(metric, planner, granularity, repair_arg)
    if streaming:
        if spec is None:
            raise PlanError(
                "streaming reads the model from its safetensors files: pass a model spec (a folder), not a "
                "loaded module"
            )
        if calib is not None and not isinstance(calib, str):
            raise CalibrationError(
                "streaming tokenizes the calibration text with the model's own tokenizer: pass calib as a "
                "text spec (an alias such as c4, or a path), not token windows"
            )
        _check_streaming(
            given_plan=given_plan is not None,
            metric_named=metric is not None,
            metric=metric_name,
            planner=planner_name,
            granularity=gran,
            repair=repair_name,
            recover=recover,
        )
    if given_plan is None:
        if isinstance(calib, str):
            check_text(calib)
    elif given_plan.repair != "none":
        if calib is None:
            raise CalibrationError(
                f"the plan repairs weights (repair={given_plan.repair}) when applied: pass --calib TEXT "
                "(the calibration text it was made with)"
            )
        if isinstance(calib, str):
            check_text(calib)
    if isinstance(eval, str):
        check_text(eval)
    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None:
        check_out(out_path, plan_only=plan_only, force=overwrite)
    texts_given = any(isinstance(d, str) for d in (calib, eval)) or recover == "lora"
    if spec is not None:
        check_model_spec(spec)
    elif texts_given and tokenizer is None:
        raise CalibrationError(
            "texts (calib, eval or LoRA healing texts) need a tokenizer: pass tokenizer= with a model "
            "object, or token windows as calib and eval"
        )
    model_name = spec if spec is not None else type(model).__name__
    report: dict[str, Any] = {
        "model": model_name,
        "out": str(out_path.absolute()) if out_path is not None else None,
    }

    if streaming:  # plan from a streaming pass; the model is loaded afterwards only for surgery
        assert spec is not None and ratio is not None and isinstance(calib, str)  # checked above
        streamed = _plan_streaming(
            spec,
            rep,
            clock,
            ratio=ratio,
            calib=calib,
            seq_len=seq_len,
            windows=windows,
            metric=metric_name,
            planner=planner_name,
            granularity=gran,
            repair=repair_name,
            scope=tuple(scope),
            round_to=round_to,
            width_allocation=width_allocation,
            expert_allocation=expert_allocation,
            top_k=top_k,
        )
        if plan_only:
            if out_path is not None:
                write_plan(streamed, out_path)
                rep.say(f"plan written to {out_path} (streaming: the model was never loaded whole)")
            report.update(
                plan=streamed.model_dump(mode="json"),
                removed=list(streamed.remove),
                achieved_ratio=streamed.achieved_ratio,
                written="plan" if out_path is not None else None,
            )
            return PruneResult(
                model=None, tokenizer=None, plan=streamed, report=report, timings=clock.timings, out=out_path
            )
        given_plan = streamed

    net: nn.Module
    if spec is not None:
        net, tokenizer, _src = load_timed(rep, clock, spec, allow_pickle, trust_remote_code)
    else:
        net = cast("nn.Module", model)
    return _prune_loaded(
        net,
        tokenizer,
        rep,
        clock,
        report,
        given_plan=given_plan,
        plan_source=plan_source,
        ratio=ratio,
        calib=calib,
        calibration=calibration,
        heldout=heldout,
        self_validate=given_plan is None and self_validating(metric, planner, granularity),
        asked_granularity=granularity,
        seq_len=seq_len,
        windows=windows,
        eval_data=eval,
        eval_seq_len=eval_seq_len,
        eval_tokens=eval_tokens,
        metric=metric_name,
        planner=planner_name,
        granularity=gran,
        repair=repair_name,
        repair_optional=repair_arg is None,
        recover=recover,
        scope=tuple(scope),
        round_to=round_to,
        width_allocation=width_allocation,
        expert_allocation=expert_allocation,
        top_k=top_k,
        heal=dict(
            texts=heal_texts,
            steps=lora_steps,
            lr=lora_lr,
            rank=lora_rank,
            batch_size=lora_batch,
            seq_len=lora_seq_len,
            precision=lora_precision,
            seed=seed,
        ),
        out=out_path,
        plan_only=plan_only,
        overwrite=overwrite,
    )


def _is_module(obj: object) -> bool:
    from torch import nn

    return isinstance(obj, nn.Module)


def _is_windows(obj: object) -> bool:
    import torch

    from ..io.text import TextWindows

    return isinstance(obj, TextWindows) or (isinstance(obj, torch.Tensor) and obj.dim() == 2)


def _prune_loaded(
    model: nn.Module,
    tok: Any,
    rep: Reporter,
    clock: Clock,
    report: dict[str, Any],
    *,
    given_plan: PrunePlan | None,
    plan_source: str,
    ratio: float | None,
    calib: Windows | None,
    calibration: Calibration | None,
    heldout: torch.Tensor | TextWindows | None,
    self_validate: bool,
    asked_granularity: Granularity | None,
    seq_len: int,
    windows: int,
    eval_data: Windows | None,
    eval_seq_len: int,
    eval_tokens: int | None,
    metric: str,
    planner: PlannerName,
    granularity: Granularity,
    repair: RepairName,
    repair_optional: bool,
    recover: Recover | None,
    scope: tuple[str, ...],
    round_to: int,
    width_allocation: Literal["global", "uniform"],
    expert_allocation: Literal["global", "uniform"],
    top_k: Literal["error", "clamp"],
    heal: dict[str, Any],
    out: Path | None,
    plan_only: bool,
    overwrite: bool,
) -> PruneResult:
    from ..adapters.vision import feature_fidelity, image_features
    from ..io.checkpoint import save_pruned
    from ..planning.planner import budget_by_tower, budget_params, check_budget, plan_pruning, uses_width
    from ..scoring.api import calibrate, inspect
    from ..scoring.calibration import Calibration
    from .evaluate import count_parameters, perplexity

    ir = inspect(model)
    if given_plan is None and not uses_width(metric, granularity):
        assert ratio is not None  # checked in prune
        check_budget(ir.restricted(scope), ratio, granularity)  # parameter counts: before calibration
    cal_ids = None
    held_ids: torch.Tensor | None = None
    split = ""
    if self_validate:
        assert calib is not None  # checked in prune
        cal_ids, held_ids, split = _heldout_split(calib, heldout, tok, seq_len=seq_len, windows=windows)
        if calibration is not None and calibration.windows.shape[0] != cal_ids.shape[0]:
            rep.info("the given calibration pass read the held-out windows: calibrating again without them")
            calibration = None
    elif calib is not None and (given_plan is None or given_plan.repair != "none"):
        cal_ids = _windows_of(calib, tok, seq_len=seq_len, num_windows=windows)
    eval_ids = None
    if eval_data is not None:
        # a text: eval_tokens of it, in whole windows of eval_seq_len (no window count)
        eval_ids = _windows_of(eval_data, tok, seq_len=eval_seq_len, num_windows=None, max_tokens=eval_tokens)
    eval_name = _text_name(eval_data)
    calib_name = _text_name(calib)

    params_before = count_parameters(model)
    ppl_before = None
    if eval_ids is not None:
        with clock.stage("perplexity_before", f"perplexity before on {eval_name}"):
            ppl_before = perplexity(model, eval_ids, progress=rep.bars)
        rep.say(
            f"perplexity before: {ppl_before.perplexity:.3f} on {ppl_before.tokens} tokens of {eval_name} "
            f"(seq_len {ppl_before.seq_len})"
        )

    cal: Calibration | None = calibration
    if given_plan is None:
        assert cal_ids is not None and ratio is not None  # checked in prune
        if granularity == "expert":
            target = None
            rep.say(
                f"budget: at least {ratio:g} of the experts of "
                + ("every MoE layer" if expert_allocation == "uniform" else "all MoE layers together")
            )
        else:
            scoped = ir.restricted(scope)
            target = budget_params(scoped, ratio)
            where = f" of tower(s) {', '.join(scope)}" if scope else ""
            rep.say(
                f"budget: at least {ratio:g} of the {fmt_params(scoped.block_params())} block parameters"
                f"{where} (embeddings and head excluded) = {fmt_params(target)} parameters"
            )
        how = (
            f"planner {planner}, metric {metric}, granularity {granularity}, repair {repair}"
            if not self_validate
            else f"the default method: candidate plans compared on held-out windows ({split})"
        )
        rep.info(
            f"calibration: {cal_ids.shape[0]} windows x {cal_ids.shape[1]} tokens of {calib_name}; {how}"
        )
        if cal is None:
            ids, extra = multimodal_inputs(model, cal_ids)  # a vision-language model: images in every window
            if uses_width(metric, granularity) or granularity == "expert":
                # width and expert planners read the windows, not stream statistics: no calibration pass
                cal = Calibration(windows=ids, inputs=extra)
            else:
                with clock.stage("calibrate", "calibrate"):
                    cal = calibrate(model, ids, inputs=extra)
        label = "the default method's candidates" if self_validate else f"{planner}:{metric}, {granularity}"
        with clock.stage("plan", f"plan ({label})"):
            plan = plan_pruning(
                model,
                cal,
                ratio=ratio,
                metric=None if self_validate else metric,
                granularity=asked_granularity if self_validate else granularity,
                planner=None if self_validate else planner,
                repair=repair,
                heldout=held_ids,
                heldout_split=split or None,
                repair_windows=cal_ids,
                on_step=lambda msg: rep.info("  " + msg),
                round_to=round_to,
                width_allocation=width_allocation,
                expert_allocation=expert_allocation,
                top_k_policy=top_k,
                scope=scope,
                repair_optional=repair_optional,
            )
        if plan.candidates:  # the default method: every candidate and its held-out loss
            rep.table(*candidates_table(plan))
            for dropped in dict.fromkeys(c.note.split("; ")[0] for c in plan.candidates):
                if dropped.startswith("no least-squares repair"):  # the repair a tower cannot take
                    rep.say(dropped)
            assert plan.selection is not None  # recorded with the candidates
            rep.say(f"chosen: {plan.selection.reason}")
        elif plan.repair != repair:  # a defaulted repair the plan's towers cannot take
            rep.say(next((n for n in plan.notes if "repair" in n), f"repair: {plan.repair}"))
        report["budget"] = {
            "ratio": ratio,
            "target_params": target,
            "block_params": ir.restricted(scope).block_params(),
            "excludes": "embeddings and head",
            "scope": list(scope) or "all",
        }
        if granularity == "expert":
            report["budget"]["unit"] = "experts per MoE layer"
    else:
        plan = given_plan
        rep.say(
            f"plan: {plan_source} ({plan.method or 'no method recorded'}, {len(plan.remove)} units, "
            f"{len(plan.remove_groups)} narrowed channel-group families)"
        )

    rep.table(*plan_table(plan, ir))
    shape = "uniform (the config describes it)" if plan.is_uniform else "non-uniform"
    rep.say(
        f"achieved: {fmt_params(plan.removed_params)} of {fmt_params(plan.block_params)} block parameters "
        f"removed ({plan.achieved_ratio:.2%}); {shape}"
    )
    per_tower = budget_by_tower(ir, plan)
    if len(per_tower) > 1:
        for name, (gone, total) in per_tower.items():
            rep.say(
                f"  tower {name}: {fmt_params(gone)} of {fmt_params(total)} block parameters ({gone / total:.2%})"
            )
    report["by_tower"] = {n: {"removed": g, "block_params": t} for n, (g, t) in per_tower.items()}
    report["plan"] = plan.model_dump(mode="json")
    report["removed"] = list(plan.remove)
    report["achieved_ratio"] = plan.achieved_ratio
    report["uniform"] = plan.is_uniform
    result = PruneResult(
        model=model,
        tokenizer=tok,
        plan=plan,
        report=report,
        timings=clock.timings,
        calibration=cal,
        perplexity_before=ppl_before,
    )

    if plan_only:
        if out is not None:
            write_plan(plan, out)
            rep.say(f"plan written to {out}")
            report["written"] = "plan"
            result.out = out
        else:
            report["written"] = None
        return result

    images = sample_images(model)
    feats_before = image_features(model, images) if images is not None else None
    with clock.stage("apply", "apply plan" + (f" (repair {plan.repair})" if plan.repair != "none" else "")):
        plan = apply_as_applied(
            model, plan, cal_ids
        )  # as applied: says whether the config alone describes the result
    for note in plan.notes[len(result.plan.notes) :]:
        rep.say(note)  # what the repair did with each run: folded, undone or declined, and why
    report["plan"] = plan.model_dump(mode="json")  # as applied: with the repair's notes
    report["uniform"] = plan.is_uniform
    if recover == "lora":
        calib_spec = _text_spec(calib)
        skip = {calib_spec: int(cal_ids.numel())} if calib_spec is not None and cal_ids is not None else {}
        with clock.stage("recover"):
            model, lora = heal_with_lora(
                model, tok, **heal, eval_text=_text_spec(eval_data), skip=skip, reporter=rep
            )
        report["recovery"] = lora.as_dict()
        plan = plan.model_copy(update={"recovery": lora.as_dict()})  # the checkpoint says how it was made
        result.model, result.recovery = model, lora
    result.plan = plan
    params_after = count_parameters(model)
    rep.say(f"parameters: {fmt_params(params_before.total)} -> {fmt_params(params_after.total)}")
    if feats_before is not None:
        assert images is not None
        fidelity = feature_fidelity(feats_before, image_features(model, images))
        rep.say(
            f"image-feature fidelity: {fidelity:.4f} (mean cosine of the projector's outputs before/after, "
            f"{images.shape[0]} sample images)"
        )
        report["image_feature_fidelity"] = fidelity
    report["params_before"] = params_before.total
    report["params_after"] = params_after.total
    ppl_after = None
    if eval_ids is not None:
        with clock.stage("perplexity_after", f"perplexity after on {eval_name}"):
            ppl_after = perplexity(model, eval_ids, progress=rep.bars)
        rep.say(
            f"perplexity after:  {ppl_after.perplexity:.3f} on {ppl_after.tokens} tokens of {eval_name} "
            f"(seq_len {ppl_after.seq_len})"
        )
    result.perplexity_after = ppl_after
    report["perplexity_before"] = ppl_dict(ppl_before) if ppl_before else None
    report["perplexity_after"] = ppl_dict(ppl_after) if ppl_after else None
    if out is None:
        report["written"] = None
        return result
    with clock.stage("save", f"save {out}"):
        saved = save_pruned(model, out, tokenizer=tok, plan=plan, overwrite=overwrite)
    auto = "AutoModelForCausalLM" if len(ir.towers) == 1 else type(model).__name__
    loader = f"{auto}.from_pretrained(dir)" if plan.is_uniform else "prunekit_core.load_pruned(dir)"
    rep.say(f"saved to {saved}; reload with {loader}")
    report["out"] = str(saved)
    report["written"] = "checkpoint"
    result.out = saved
    return result


def apply_as_applied(model: nn.Module, plan: PrunePlan, repair_windows: torch.Tensor | None) -> PrunePlan:
    """Apply ``plan`` in place; returns the plan as applied (``width_uniform`` as the surgery found it)."""
    from ..surgery.apply import apply_plan

    return apply_plan(model, plan, repair_windows=repair_windows).plan


def heal_with_lora(
    model: nn.Module,
    tok: Any,
    *,
    texts: tuple[str, ...],
    steps: int,
    lr: float,
    rank: int,
    batch_size: int,
    seq_len: int,
    precision: str,
    seed: int,
    eval_text: str | None,
    skip: dict[str, int],
    reporter: Reporter | None = None,
) -> tuple[nn.Module, LoraReport]:
    """LoRA healing on windows of ``texts`` (never ``eval_text``; the first ``skip[text]`` tokens of a text
    left out: the calibration windows); returns the merged model and the report."""
    from .recovery import heal_lora, training_windows

    rep = reporter if reporter is not None else Reporter()
    windows = training_windows(
        tok, seq_len=seq_len, texts=texts, exclude=(eval_text or "",), skip_tokens=skip
    )
    with rep.step(f"LoRA healing ({steps} steps on {', '.join(texts)})"):
        model, report = heal_lora(
            model,
            windows,
            rank=rank,
            lr=lr,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            precision=precision,
            progress=rep.training_progress,
        )
    rep.say(
        f"LoRA healing: {report.steps} steps, {report.tokens:,} tokens, loss {report.loss_first:.3f} -> "
        f"{report.loss_last:.3f}, {report.wall_s:.1f} s ({report.steps_per_s:.2f} steps/s, {report.precision}, "
        f"{report.threads} thread{'s' if report.threads != 1 else ''}); merged into the weights"
    )
    return model, report


def load_timed(
    rep: Reporter, clock: Clock, spec: str, allow_pickle: bool, trust_remote_code: bool
) -> tuple[nn.Module, Any, Any]:
    """:func:`load_model_spec` under the ``load`` stage, with the load policy's notes."""
    if allow_pickle:
        rep.info("--allow-pickle: pickled weights are read with torch.load(weights_only=True)")
    if trust_remote_code:
        rep.info("--trust-remote-code: model code shipped with the checkpoint will run")
    with clock.stage("load", f"load {spec}"):
        return load_model_spec(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


# --- streaming ------------------------------------------------------------------------------------------


def open_streaming_spec(rep: Reporter, spec: str) -> tuple[StreamingModel, Any]:
    """Open ``spec`` for streaming (blocks stay on disk) and its tokenizer."""
    from ..scoring.streaming import open_streaming, streaming_folder, streaming_tokenizer

    with rep.step(f"open {spec} (streaming: blocks stay on disk)"):
        folder = streaming_folder(spec)
        return open_streaming(folder), streaming_tokenizer(folder)


def stream_calibration(
    rep: Reporter,
    sm: StreamingModel,
    ids: torch.Tensor,
    metrics: list[Any],
    observers: list[Any] | None = None,
    *,
    images: bool = True,
) -> Calibration:
    """A streaming calibration pass. ``images``: put one image in every window of a vision-language model,
    as the in-memory calibration does (channel statistics, like
    :func:`~prunekit_core.planning.width.collect_width_stats`, read the text windows alone)."""
    from ..scoring.streaming import stream_calibrate

    with rep.step("calibrate (streaming, one block in memory at a time)"):
        extra: dict[str, Any] = {}
        if images:
            ids, extra = sm.calibration_inputs(ids)  # a vision-language model: one image per window
        # metrics that read a block's weights or statistics are computed while it is loaded
        cal = stream_calibrate(
            sm, ids, inputs=extra, progress=rep.bars, metrics=metrics, observers=observers or []
        )
    rep.info(f"streamed {sm.loaded_blocks} block loads, {sm.loaded_bytes / 1e9:.2f} GB of weights read")
    if sm.replay_bytes:
        rep.info(f"held {sm.replay_bytes / 1e9:.2f} GB of earlier towers' block outputs for replay")
    return cal


def _plan_streaming(
    spec: str,
    rep: Reporter,
    clock: Clock,
    *,
    ratio: float,
    calib: str,
    seq_len: int,
    windows: int,
    metric: str,
    planner: PlannerName,
    granularity: Granularity,
    repair: RepairName,
    scope: tuple[str, ...],
    round_to: int,
    width_allocation: Literal["global", "uniform"],
    expert_allocation: Literal["global", "uniform"],
    top_k: Literal["error", "clamp"],
) -> PrunePlan:
    from ..io.text import load_windows
    from ..planning.planner import budget_params, check_budget, plan_pruning, uses_width
    from ..planning.width import WidthCurveObserver
    from ..registry.plugins import get_metric

    with clock.stage("load"):
        sm, tok = open_streaming_spec(rep, spec)
    if not uses_width(metric, granularity):
        check_budget(sm.ir.restricted(scope), ratio, granularity)  # before the streaming pass
    win = load_windows(tok, calib, seq_len=seq_len, num_windows=windows)
    if granularity != "expert":
        scoped = sm.ir.restricted(scope)
        where = f" of tower(s) {', '.join(scope)}" if scope else ""
        rep.say(
            f"budget: at least {ratio:g} of the {fmt_params(scoped.block_params())} block parameters"
            f"{where} (embeddings and head excluded) = {fmt_params(budget_params(scoped, ratio))} "
            "parameters"
        )
    rep.info(
        f"calibration: {win.num_windows} windows x {win.seq_len} tokens of {calib}; "
        f"planner {planner}, metric {metric}, granularity {granularity}, streaming"
    )
    m = get_metric(metric)
    with clock.stage("calibrate"):
        if uses_width(metric, granularity):  # the width cost model's curves, block by block
            curves = [WidthCurveObserver(m, repair=False)]  # streaming plans without repair (checked)
            cal = stream_calibration(rep, sm, win.ids, [], curves, images=False)  # text windows, as in memory
        else:
            cal = stream_calibration(rep, sm, win.ids, [m])
    loads = sm.loaded_blocks
    with clock.stage("plan", f"plan ({planner}:{metric}, {granularity})"):
        plan = plan_pruning(
            sm.model,
            cal,
            ratio=ratio,
            metric=metric,
            granularity=granularity,
            planner=planner,
            repair=repair,
            adapter=sm.adapter,
            round_to=round_to,
            width_allocation=width_allocation,
            expert_allocation=expert_allocation,
            top_k_policy=top_k,
            scope=scope,
            on_step=lambda msg: rep.info("  " + msg),
        )
    if sm.loaded_blocks > loads:
        rep.info(f"removal trials: {sm.loaded_blocks - loads} more block loads from disk")
    return plan


#: what the stages of :func:`prune` are called in :attr:`PruneResult.timings`
STAGES: tuple[str, ...] = (
    "load",
    "calibrate",
    "plan",
    "apply",
    "recover",
    "perplexity_before",
    "perplexity_after",
    "save",
)
