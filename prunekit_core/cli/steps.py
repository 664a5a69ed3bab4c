"""Steps that several commands run, each with its progress lines: opening a model for streaming, streaming
calibration, LoRA healing. Each is :mod:`prunekit_core.study.pipeline`'s, reported through the command's UI;
heavy modules are imported inside the functions."""

from __future__ import annotations

import argparse
from typing import Any

from .ui import UI, UIReporter


def open_streaming(ui: UI, spec: str) -> tuple[Any, Any]:
    """Open ``spec`` for streaming (blocks stay on disk) and its tokenizer, under a step line."""
    from ..study.pipeline import open_streaming_spec

    return open_streaming_spec(UIReporter(ui), spec)


def stream_calibrate(
    ui: UI,
    sm: Any,
    ids: Any,
    metrics: list[Any],
    observers: list[Any] | None = None,
    *,
    images: bool = True,
) -> Any:
    """:func:`prunekit_core.study.pipeline.stream_calibration` with the command's progress lines."""
    from ..study.pipeline import stream_calibration

    return stream_calibration(UIReporter(ui), sm, ids, metrics, observers, images=images)


def heal_lora(
    args: argparse.Namespace, ui: UI, model: Any, tok: Any, texts: tuple[str, ...], skip: dict[str, int]
) -> tuple[Any, dict[str, Any]]:
    """LoRA healing with the --lora-* options; returns the merged model and the recovery record."""
    from ..study.pipeline import heal_with_lora

    model, report = heal_with_lora(
        model,
        tok,
        texts=texts,
        steps=args.lora_steps,
        lr=args.lora_lr,
        rank=args.lora_rank,
        batch_size=args.lora_batch,
        seq_len=args.lora_seq_len,
        precision=args.lora_precision,
        seed=args.seed,
        eval_text=args.eval,
        skip=skip,
        reporter=UIReporter(ui),
    )
    return model, report.as_dict()
