"""Steps that several commands run, each with its progress lines: opening a model for streaming, streaming
calibration. Each is :mod:`prunekit_core.study.pipeline`'s, reported through the command's UI;
heavy modules are imported inside the functions."""

from __future__ import annotations

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
