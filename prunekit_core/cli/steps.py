"""Steps that several commands run, each with its progress lines: opening a model for streaming, streaming
calibration, writing a plan file, LoRA healing. Heavy modules are imported inside the functions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .ui import UI, bars


def open_streaming(ui: UI, spec: str) -> tuple[Any, Any]:
    from ..streaming import open_streaming as open_folder
    from ..streaming import streaming_folder, streaming_tokenizer

    with ui.step(f"open {spec} (streaming: blocks stay on disk)"):
        folder = streaming_folder(spec)
        return open_folder(folder), streaming_tokenizer(folder)


def stream_calibrate(
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
    from ..streaming import stream_calibrate as calibrate

    with ui.step("calibrate (streaming, one block in memory at a time)"):
        extra: dict[str, Any] = {}
        if images:
            ids, extra = sm.calibration_inputs(ids)  # a vision-language model: one image per window
        # metrics that read a block's weights or statistics are computed while it is loaded
        cal = calibrate(sm, ids, inputs=extra, progress=bars(), metrics=metrics, observers=observers or [])
    ui.info(f"streamed {sm.loaded_blocks} block loads, {sm.loaded_bytes / 1e9:.2f} GB of weights read")
    if sm.replay_bytes:
        ui.info(f"held {sm.replay_bytes / 1e9:.2f} GB of earlier towers' block outputs for replay")
    return cal


def save_plan(plan: Any, out: Path) -> None:
    """Write the --plan-only file, creating its missing parent folders (removed again if the write fails)."""
    from ..checkpoint import make_parents, remove_made

    made = make_parents(out)
    try:
        plan.save(out)
    except BaseException:
        remove_made(made)
        raise


def heal_lora(
    args: argparse.Namespace, ui: UI, model: Any, tok: Any, texts: tuple[str, ...], skip: dict[str, int]
) -> tuple[Any, dict[str, Any]]:
    """LoRA healing with the --lora-* options; returns the merged model and the recovery record."""
    from ..recovery import heal_lora as heal_model
    from ..recovery import training_windows

    heal = training_windows(
        tok, seq_len=args.lora_seq_len, texts=texts, exclude=(args.eval or "",), skip_tokens=skip
    )
    with ui.step(f"LoRA healing ({args.lora_steps} steps on {', '.join(texts)})"):
        model, report = heal_model(
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
