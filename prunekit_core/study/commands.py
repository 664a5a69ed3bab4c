"""The other commands' jobs, one call each, on top of :mod:`prunekit_core.study.pipeline`.

:func:`recover` (``prunekit recover``) heals an already pruned model with LoRA, or re-applies its plan to
the unpruned model with the least-squares repair (which comes before any LoRA healing), then evaluates and
saves; :func:`score_model` (``prunekit score``) calibrates and scores every unit or channel group;
:func:`evaluate_model` (``prunekit eval``) measures perplexity, parameters and size on disk. They share the
pipeline's checks, loading, LoRA healing and :class:`~prunekit_core.study.pipeline.Reporter`; nothing is
set on the model, and each returns what it did (:class:`RecoverResult`, :class:`ScoreResult`,
:class:`EvalResult`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..ir.defaults import DEFAULT_HEAL_TEXTS, DEFAULT_SCORE_METRICS
from ..ir.errors import CalibrationError, PlanError
from .pipeline import (
    Clock,
    Reporter,
    apply_as_applied,
    check_heal_texts,
    check_model_spec,
    check_out,
    check_text,
    heal_with_lora,
    load_timed,
    multimodal_inputs,
    open_streaming_spec,
    ppl_dict,
    stream_calibration,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.text import TextWindows
    from ..ir.model import ModelIR
    from ..ir.plan import PrunePlan
    from ..scoring.calibration import Calibration
    from ..scoring.metrics import ImportanceMetric, Scores
    from ..scoring.streaming import StreamingModel
    from .evaluate import ParamCounts, PerplexityResult
    from .recovery import LoraReport


__all__ = [
    "EvalResult",
    "RecoverResult",
    "ScoreResult",
    "evaluate_model",
    "recover",
    "score_model",
]

# --- recover: heal a pruned model afterwards ------------------------------------------------------------

RecoverMethod = Literal["lora", "repair"]


@dataclass
class RecoverResult:
    """What :func:`recover` did.

    ``model``: the recovered model (LoRA: the pruned model healed, merged into plain weights; repair: the
    unpruned ``base`` with the plan re-applied under the least-squares repair). ``plan``: the plan the
    checkpoint records (LoRA: its ``recovery`` field says how it was healed; repair: the plan with
    ``repair="lsq"``, which is what says so; ``None`` when a LoRA-healed model had no prunekit plan).
    ``recovery``: the healing record (:meth:`LoraReport.as_dict` for ``lora``; method and calibration
    tokens for ``repair``); ``lora``: the full LoRA report. ``report``: the
    JSON-serialisable summary ``prunekit recover --json`` prints. ``timings``: seconds per stage that ran
    (``load``, ``recover``, ``perplexity_after``, ``save``). ``out``: the folder written, or ``None``.
    """

    model: nn.Module
    tokenizer: Any
    plan: PrunePlan | None
    recovery: dict[str, Any]
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    lora: LoraReport | None = None
    perplexity_after: PerplexityResult | None = None
    out: Path | None = None


def recover(
    model: str | os.PathLike[str],
    *,
    method: RecoverMethod = "lora",
    base: str | os.PathLike[str] | None = None,
    calib: str | None = None,
    seq_len: int = 256,
    windows: int = 32,
    eval: str | None = None,
    eval_seq_len: int = 1024,
    eval_tokens: int | None = 8192,
    lora_texts: Sequence[str] = DEFAULT_HEAL_TEXTS,
    lora_steps: int = 110,
    lora_lr: float = 1e-3,
    lora_rank: int = 8,
    lora_batch: int = 4,
    lora_seq_len: int = 256,
    lora_precision: str = "auto",
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
) -> RecoverResult:
    """Recover quality after pruning: what ``prunekit recover`` does, as one call.

    ``method="lora"``: load ``model`` (a pruned model: a prunekit output folder, or any model spec), heal
    it with LoRA on ``lora_texts`` (never ``eval``; the first ``windows`` x ``seq_len`` tokens of ``calib``
    are skipped when it is also a healing text) with the ``lora_*`` settings, merged into the weights; a
    prunekit checkpoint's plan then records the healing. ``method="repair"``: ``model`` must be a prunekit
    output folder whose plan verifies and was not healed yet; its plan is re-applied to the unpruned
    ``base`` with ``repair="lsq"``, fitted on ``windows`` x ``seq_len`` tokens of ``calib``. ``eval``: report
    the perplexity afterwards on ``eval_tokens`` of that text in windows of ``eval_seq_len``. ``out``: the
    folder to save to (unset, nothing is written); ``overwrite`` replaces a previous prunekit output.

    Raises a :class:`~prunekit_core.ir.errors.PrunekitError` naming the problem and the fix, before anything
    is loaded or written when the inputs are inconsistent.
    """
    from ..io.checkpoint import PLAN_FILE, RECORD_FILE, load_plan, read_plan, save_pruned, verify_checkpoint
    from ..io.text import load_windows
    from .evaluate import perplexity

    rep = reporter if reporter is not None else Reporter()
    clock = Clock(rep)
    spec = os.fspath(model)
    base_spec = os.fspath(base) if base is not None else None

    # cheap checks first: nothing is loaded or written before all of them pass
    if method not in ("lora", "repair"):
        raise PlanError(f"the recovery method must be lora or repair; got {method!r}")
    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None:
        check_out(out_path, plan_only=False, force=overwrite)
    if eval is not None:
        check_text(eval)
    if calib is not None:
        check_text(calib)
    plan: PrunePlan | None = None
    heal_texts: tuple[str, ...] = ()
    if method == "lora":
        if base_spec is not None:
            raise PlanError("--base is for --method repair (it re-applies the plan to the unpruned model)")
        heal_texts = check_heal_texts(lora_texts, eval)
        check_model_spec(spec)
    else:
        plan_file = Path(spec).expanduser() / PLAN_FILE
        if not plan_file.is_file():
            raise PlanError(
                f"--method repair needs a prunekit output folder holding {PLAN_FILE}; {spec} has none"
            )
        if (plan_file.parent / RECORD_FILE).is_file():
            verify_checkpoint(plan_file.parent)  # the plan must be the one saved with these weights
        plan = load_plan(plan_file)
        if plan.recovery:
            raise PlanError(
                f"{spec} was already healed ({plan.recovery.get('method')}); the repair comes before "
                "LoRA: run prunekit prune --recover lora on the unpruned model instead"
            )
        if base_spec is None or calib is None:
            raise PlanError(
                "--method repair refits from the unpruned model: pass --base MODEL (the model the plan was "
                "made for) and --calib TEXT (the calibration text)"
            )
        check_model_spec(base_spec)
    report: dict[str, Any] = {
        "model": spec,
        "method": method,
        "out": str(out_path.absolute()) if out_path is not None else None,
    }

    lora: LoraReport | None = None
    net: nn.Module
    if method == "lora":
        net, tok, src = load_timed(rep, clock, spec, allow_pickle, trust_remote_code)
        skip = {calib: windows * seq_len} if calib is not None else {}
        with clock.stage("recover"):
            net, lora = heal_with_lora(
                net,
                tok,
                texts=heal_texts,
                steps=lora_steps,
                lr=lora_lr,
                rank=lora_rank,
                batch_size=lora_batch,
                seq_len=lora_seq_len,
                precision=lora_precision,
                seed=seed,
                eval_text=eval,
                skip=skip,
                reporter=rep,
            )
        record = lora.as_dict()
        if src.path is not None and (src.path / RECORD_FILE).is_file():
            plan = read_plan(src.path)  # a prunekit checkpoint: the plan load_pruned verified
        if plan is None:
            rep.say("note: the model has no prunekit plan, so the checkpoint does not record the healing")
        else:
            plan = plan.model_copy(update={"recovery": record})
    else:
        assert plan is not None and base_spec is not None and calib is not None  # checked above
        net, tok, _src = load_timed(rep, clock, base_spec, allow_pickle, trust_remote_code)
        cal = load_windows(tok, calib, seq_len=seq_len, num_windows=windows)
        with clock.stage("recover", "apply plan with the least-squares repair"):
            plan = apply_as_applied(net, plan.model_copy(update={"repair": "lsq"}), cal.ids)
        record = {"method": "repair", "calibration_tokens": cal.num_tokens}
    report["recovery"] = record
    result = RecoverResult(
        model=net, tokenizer=tok, plan=plan, recovery=record, report=report, timings=clock.timings, lora=lora
    )
    if eval is not None:
        eval_windows = load_windows(tok, eval, seq_len=eval_seq_len, num_windows=None, max_tokens=eval_tokens)
        with clock.stage("perplexity_after", f"perplexity on {eval}"):
            res = perplexity(net, eval_windows.ids, progress=rep.bars)
        rep.say(f"perplexity after recovery: {res.perplexity:.3f} on {res.tokens} tokens of {eval}")
        report["perplexity_after"] = ppl_dict(res)
        result.perplexity_after = res
    if out_path is None:
        return result
    with clock.stage("save", f"save {out_path}"):
        saved = save_pruned(net, out_path, tokenizer=tok, plan=plan, overwrite=overwrite)
    rep.say(f"saved to {saved}")
    report["out"] = str(saved)
    result.out = saved
    return result


# --- score: importance of every unit, or of every channel group -----------------------------------------


@dataclass
class ScoreResult:
    """What :func:`score_model` measured.

    ``ir``: the model's IR (its unit order). ``windows``: the calibration windows. ``metrics``: the metrics
    as resolved, in order. ``scores``: unit -> importance per block, sublayer or span metric; ``groups``:
    channel-group family -> one score per group, per channel metric (one of the two is empty).
    ``timings``: seconds per stage (``load``, ``calibrate``, ``score``).
    """

    ir: ModelIR
    windows: TextWindows
    metrics: list[ImportanceMetric]
    scores: dict[str, Scores] = field(default_factory=dict)
    groups: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def score_model(
    model: str | os.PathLike[str],
    *,
    calib: str,
    metrics: Sequence[str] | None = None,
    span: int | None = None,
    seq_len: int = 256,
    windows: int = 32,
    streaming: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
) -> ScoreResult:
    """Score every unit (or channel group) of ``model`` on ``windows`` x ``seq_len`` tokens of ``calib``:
    what ``prunekit score`` does, as one call.

    ``metrics``: names (default :data:`~prunekit_core.ir.defaults.DEFAULT_SCORE_METRICS`); either all
    score blocks, sublayers or spans (one calibration pass, with an image per window for a vision-language
    model; span metrics over spans of ``span`` blocks, default 1) or all score channel groups (read off the
    text windows, no calibration pass; the metrics share one scoring context). ``streaming``: one block in
    memory at a time (the metrics must be streaming metrics).
    """
    from ..io.text import load_windows
    from ..registry.plugins import get_metric
    from ..scoring.metrics import ChannelMetric
    from ..scoring.streaming import check_streaming_metric

    rep = reporter if reporter is not None else Reporter()
    clock = Clock(rep)
    spec = os.fspath(model)

    # cheap checks first: nothing is loaded before all of them pass
    names = list(dict.fromkeys(metrics or DEFAULT_SCORE_METRICS))
    resolved = [get_metric(n) for n in names]
    channel = [m for m in resolved if isinstance(m, ChannelMetric)]
    if channel and len(channel) != len(resolved):
        raise PlanError(
            f"{channel[0].name} scores channel groups, {next(m for m in resolved if m not in channel).name} "
            "scores blocks or sublayers: score them in separate runs"
        )
    if streaming:
        for m in resolved:
            check_streaming_metric(m)
    check_text(calib)
    check_model_spec(spec)

    sm: StreamingModel | None = None
    if streaming:
        with clock.stage("load"):
            sm, tok = open_streaming_spec(rep, spec)
        net, ir = sm.model, sm.ir
    else:
        net, tok, _src = load_timed(rep, clock, spec, allow_pickle, trust_remote_code)
        ir = _inspect(net)
    win = load_windows(tok, calib, seq_len=seq_len, num_windows=windows)
    rep.info(f"calibration: {win.num_windows} windows x {win.seq_len} tokens of {calib}")
    result = ScoreResult(ir=ir, windows=win, metrics=resolved, timings=clock.timings)
    if channel:
        result.groups = _score_channels(rep, clock, sm if sm is not None else net, win, channel)
        return result
    if sm is not None:
        with clock.stage("calibrate"):
            cal = stream_calibration(rep, sm, win.ids, resolved)
    else:
        with clock.stage("calibrate", "calibrate"):
            ids, extra = multimodal_inputs(net, win.ids)  # a vision-language model: images in every window
            cal = _calibrate(net, ids, extra)
    width = span if span is not None else 1
    for m in resolved:
        with clock.stage("score", f"score {m.name}"):
            s = _score_one(sm if sm is not None else net, cal, m.name, width if m.unit == "span" else None)
            if s.block_forwards is not None:
                rep.info(f"{m.name}: {s.block_forwards} block forwards (cached removal trials)")
        result.scores[m.name] = s
    return result


def _inspect(model: nn.Module) -> ModelIR:
    from ..scoring.api import inspect

    return inspect(model)


def _calibrate(model: nn.Module, ids: torch.Tensor, extra: dict[str, Any]) -> Calibration:
    from ..scoring.api import calibrate

    return calibrate(model, ids, inputs=extra)


def _score_one(model: nn.Module | StreamingModel, cal: Calibration, metric: str, span: int | None) -> Scores:
    """A loaded model's scores, or a streaming model's (block by block)."""
    from ..scoring.api import score
    from ..scoring.streaming import StreamingModel, stream_score

    if isinstance(model, StreamingModel):
        return stream_score(model, cal, metric, span=span)
    return score(model, cal, metric, span=span)


def _score_channels(
    rep: Reporter,
    clock: Clock,
    model: nn.Module | StreamingModel,
    windows: TextWindows,
    metrics: Sequence[ImportanceMetric],
) -> dict[str, dict[str, torch.Tensor]]:
    """Channel-group scores per metric, read off the text windows (no images): a loaded model's, in one
    scoring context, or a streaming model's (its statistics gathered in one streaming pass)."""
    from ..scoring.api import score_groups
    from ..scoring.calibration import Calibration
    from ..scoring.streaming import StreamingModel, stream_score_groups

    if isinstance(model, StreamingModel):
        with clock.stage("calibrate"):
            cal = stream_calibration(
                rep, model, windows.ids, list(metrics), images=False
            )  # as score_groups below
        return {m.name: stream_score_groups(cal, m.name) for m in metrics}
    with clock.stage(
        "score", f"score {', '.join(m.name for m in metrics)}"
    ):  # one context: shared statistics
        return score_groups(model, Calibration(windows=windows.ids), [m.name for m in metrics])


# --- evaluate: perplexity, parameter counts and size on disk -------------------------------------------


@dataclass
class EvalResult:
    """What :func:`evaluate_model` measured: the perplexity on ``windows``, the parameter counts, the size
    on disk of a Hugging Face folder (``None`` for another source), and ``report``, the JSON-serialisable
    summary ``prunekit eval --json`` prints (with the lm-eval results under ``"tasks"`` when tasks ran).
    ``perplexity`` and ``windows`` are ``None`` when no text was evaluated (tasks only)."""

    perplexity: PerplexityResult | None
    params: ParamCounts
    size_on_disk: int | None
    windows: TextWindows | None
    report: dict[str, Any]


def evaluate_model(
    model: str | os.PathLike[str],
    *,
    text: str | None,
    seq_len: int = 1024,
    max_tokens: int | None = None,
    windows: int | None = None,
    batch_size: int = 4,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    include_path: str | os.PathLike[str] | None = None,
    save: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
) -> EvalResult:
    """Perplexity of ``model`` (a model spec or a prunekit output folder) on ``text`` over non-overlapping
    windows of ``seq_len`` tokens (the whole text, or at most ``max_tokens`` in whole windows, or at most
    ``windows`` windows), its parameter counts and, for a folder, its size on disk: what ``prunekit eval``
    does, as one call.

    ``tasks``: lm-evaluation-harness tasks run on the same in-memory model (``limit`` documents each at
    most, extra task YAMLs from ``include_path``; :func:`prunekit_core.study.lmeval.run_tasks`); their
    results go into the report under ``"tasks"``, beside the perplexity. ``text`` may be ``None`` when
    ``tasks`` are given (no perplexity then). ``save``: write the report as JSON to that file (atomically).
    """
    from ..io.text import load_windows
    from .evaluate import count_parameters, perplexity, size_on_disk

    rep = reporter if reporter is not None else Reporter()
    spec = os.fspath(model)
    # cheap checks first: nothing is loaded before all of them pass
    if text is None and not tasks:
        raise CalibrationError(
            "nothing to evaluate: give --text TEXT (perplexity), --tasks T1,T2 (lm-eval), or both"
        )
    if text is not None:
        if max_tokens is not None and max_tokens < seq_len:
            raise CalibrationError(
                f"--max-tokens {max_tokens} is smaller than one window of --seq-len {seq_len}"
            )
        check_text(text)
    manager = None
    if tasks:
        from .lmeval import check_tasks

        manager = check_tasks(tasks, include_path)
    if save is not None:
        check_save_target(save)
    check_model_spec(spec)
    net, tok, source = load_timed(rep, Clock(rep), spec, allow_pickle, trust_remote_code)
    res = win = None
    if text is not None:
        win = load_windows(tok, text, seq_len=seq_len, num_windows=windows, max_tokens=max_tokens)
        rep.info(f"evaluating {win.num_windows} windows x {win.seq_len} tokens of {text}")
        with rep.step("perplexity"):
            res = perplexity(net, win.ids, batch_size=batch_size, progress=rep.bars)
    counts = count_parameters(net)
    size = size_on_disk(source.path) if source.kind == "hf_dir" and source.path is not None else None
    report: dict[str, Any] = {
        "model": spec,
        "text": text,
        **(ppl_dict(res) if res is not None else {}),
        "params": {
            "total": counts.total,
            "embeddings": counts.embeddings,
            "head": counts.head,
            "body": counts.body,
            "tied": counts.tied,
        },
        "size_on_disk_bytes": size,
    }
    if tasks:
        from .lmeval import run_tasks

        with rep.step(f"lm-eval {','.join(tasks)}"):
            report["tasks"] = run_tasks(net, tok, tasks, limit=limit, batch_size=batch_size, manager=manager)
    if save is not None:
        import json

        from ..io.atomic import write_text

        write_text(Path(save), json.dumps(report, indent=2) + "\n")
    return EvalResult(perplexity=res, params=counts, size_on_disk=size, windows=win, report=report)


def check_save_target(path: str | os.PathLike[str]) -> None:
    """``--save FILE`` must name a file in an existing folder (checked before anything is loaded)."""
    p = Path(path)
    if p.is_dir():
        raise CalibrationError(f"--save {p} is a folder: give a file name, e.g. {p / 'eval.json'}")
    if not p.absolute().parent.is_dir():
        raise CalibrationError(
            f"--save {p}: its folder {p.absolute().parent} does not exist; create it first"
        )
