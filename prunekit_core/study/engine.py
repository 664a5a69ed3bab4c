"""Run exported GGUF files in llama.cpp (through llama-cpp-python, the ``gguf`` extra): logits, perplexity on
the same token windows as :func:`~prunekit_core.study.evaluate.perplexity`, and prefill/decode speed.

llama-cpp-python is optional (``pip install -e '.[gguf]'``; scripts/setup.sh builds and installs it); each
function raises :class:`EngineMissingError` with that fix when it is absent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..ir.errors import PrunekitError

__all__ = [
    "EngineMissingError",
    "EngineSpeed",
    "engine_logits",
    "engine_perplexity",
    "engine_speed",
    "open_gguf",
]


class EngineMissingError(PrunekitError):
    """llama-cpp-python is not installed."""


def open_gguf(path: str | Path, *, n_ctx: int = 1024, n_threads: int = 1, logits_all: bool = True) -> Any:
    """A ``llama_cpp.Llama`` on the GGUF file at ``path`` (CPU, ``n_threads`` threads, quiet)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineMissingError(
            "llama-cpp-python is not installed: pip install -e '.[gguf]' (scripts/setup.sh builds it once per "
            "machine), or run the file with llama.cpp's own tools"
        ) from exc
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=logits_all,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )


def engine_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), vocab]`` for one sequence, from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def engine_perplexity(llm: Any, windows: torch.Tensor) -> float:
    """Perplexity of the file on token ``windows`` ``[n, seq_len]`` by
    :func:`~prunekit_core.study.evaluate.perplexity`'s protocol: each window alone, every position but the
    first predicted, NLL summed in float64 over all windows."""
    ids = getattr(windows, "ids", windows)
    nll, count = 0.0, 0
    for row in ids.tolist():
        logits = engine_logits(llm, row)[:-1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
        count += len(row) - 1
    return math.exp(nll / count)


@dataclass
class EngineSpeed:
    """Tokens per second: ``prefill`` (one batch of ``prompt`` tokens) and ``decode`` (one token at a time
    after the prompt, ``decode_tokens`` of them); the best of ``repeats`` runs of each."""

    prefill: float
    decode: float
    prompt: int
    decode_tokens: int


def engine_speed(
    path: str | Path, ids: list[int], *, decode_tokens: int = 64, n_threads: int = 1, repeats: int = 3
) -> EngineSpeed:
    """Prefill and decode speed of the GGUF file at ``path`` on ``ids`` (the prompt), in llama.cpp."""
    llm = open_gguf(path, n_ctx=len(ids) + decode_tokens + 8, n_threads=n_threads, logits_all=False)
    prefill = decode = 0.0
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = max(prefill, len(ids) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(decode_tokens):  # the prompt's tokens again: what is decoded does not change the cost
            llm.eval([ids[i % len(ids)]])
        decode = max(decode, decode_tokens / (time.perf_counter() - t0))
    return EngineSpeed(prefill=prefill, decode=decode, prompt=len(ids), decode_tokens=decode_tokens)
