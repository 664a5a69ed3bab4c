"""Model quality and size measurements: perplexity, parameter counts, bytes on disk.

What callers may rely on:

* :func:`perplexity` follows one fixed protocol (below), so numbers from different runs, models and
  batch sizes are comparable: the batch size changes speed and memory, never the result (up to
  float rounding).
* :func:`count_parameters` counts every distinct parameter tensor once (tied weights once).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit_core.ir.errors import CalibrationError, PrunekitError

__all__ = [
    "ParamCounts",
    "PerplexityResult",
    "count_parameters",
    "perplexity",
    "size_on_disk",
]


@dataclass(frozen=True)
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``; ``inf`` if that overflows, ``nan`` if the model produced NaNs.
        nll: mean negative log-likelihood per predicted token (natural log).
        tokens: predicted tokens, ``windows * (seq_len - 1)``.
        windows: number of windows evaluated.
        seq_len: tokens per window.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on token windows.

    Protocol: every window (row of ``windows``, shape ``[n, seq_len]``; a ``TextWindows`` is also
    accepted) is an independent sequence with no attention mask and no KV cache; the loss covers every
    position but the first (token ``t`` is predicted from tokens ``< t`` of the same window); the NLL is
    summed in float32 over all predicted tokens of all windows and divided by their number
    ``n * (seq_len - 1)``; perplexity is ``exp`` of that mean. Equals ``exp(model(ids, labels=ids).loss)``
    when all windows fit in one batch.

    Runs under ``torch.inference_mode()`` with the model temporarily in ``eval()`` mode (its previous
    mode is restored). Only one window's float32 log-probabilities are materialised at a time on top of
    the model's own logits. ``progress=True`` shows a ``rich`` progress bar on stderr.

    Raises :class:`CalibrationError` if ``windows`` is not a 2-D integer tensor with ``n >= 1`` and
    ``seq_len >= 2``, or ``batch_size < 1``.
    """
    ids = getattr(windows, "ids", windows)  # accept prunekit_core.io.text.TextWindows
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise CalibrationError(
            "perplexity() needs an integer tensor of token ids shaped [num_windows, seq_len]; "
            f"got {type(ids).__name__} {getattr(ids, 'shape', '')}. Use prunekit_core.io.text.token_windows."
        )
    n, seq_len = ids.shape
    if n < 1 or seq_len < 2:
        raise CalibrationError(
            f"perplexity() needs at least 1 window of at least 2 tokens; got shape {tuple(ids.shape)}."
        )
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be at least 1 (got {batch_size}).")

    device = _model_device(model)
    ids = ids.long()
    total_nll = 0.0
    was_training = model.training
    model.eval()

    bar = None
    task = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("perplexity"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        bar.start()
        task = bar.add_task("windows", total=n)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                batch = ids[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                for i in range(batch.shape[0]):  # one window at a time keeps the fp32 copy small
                    total_nll += F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="sum").item()
                del logits
                if bar is not None and task is not None:
                    bar.advance(task, batch.shape[0])
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)

    tokens = n * (seq_len - 1)
    nll = total_nll / tokens
    try:
        ppl = math.exp(nll)
    except OverflowError:
        ppl = math.inf
    return PerplexityResult(perplexity=ppl, nll=nll, tokens=tokens, windows=n, seq_len=seq_len)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model; every distinct tensor is counted once.

    Attributes:
        total: all distinct parameters.
        embeddings: parameters of the input embedding module.
        head: parameters of the output embedding (LM head) module NOT shared with the input
            embeddings; ``0`` when the head is tied to the input embeddings.
        body: ``total - embeddings - head`` (transformer blocks, norms, ...).
        tied: whether the head's weight is the input embedding's weight.
    """

    total: int
    embeddings: int
    head: int
    body: int
    tied: bool


def _get_module(model: nn.Module, getter_name: str) -> nn.Module | None:
    getter = getattr(model, getter_name, None)
    if getter is None:
        return None
    try:
        module = getter()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Module) else None


def _unique(params: Iterable[nn.Parameter]) -> dict[int, nn.Parameter]:
    return {id(p): p for p in params}


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count parameters (see :class:`ParamCounts`).

    Models without ``get_input_embeddings`` / ``get_output_embeddings`` report 0 for the missing part.
    """
    total = sum(p.numel() for p in _unique(model.parameters()).values())
    emb = _get_module(model, "get_input_embeddings")
    out = _get_module(model, "get_output_embeddings")
    emb_params = _unique(emb.parameters()) if emb is not None else {}
    head_params = _unique(out.parameters()) if out is not None else {}
    emb_ptrs = {p.data_ptr() for p in emb_params.values()}
    embeddings = sum(p.numel() for p in emb_params.values())
    head = sum(
        p.numel() for k, p in head_params.items() if k not in emb_params and p.data_ptr() not in emb_ptrs
    )
    emb_w = getattr(emb, "weight", None)
    out_w = getattr(out, "weight", None)
    tied = (
        isinstance(emb_w, torch.Tensor)
        and isinstance(out_w, torch.Tensor)
        and (emb_w is out_w or emb_w.data_ptr() == out_w.data_ptr())
    )
    return ParamCounts(
        total=total, embeddings=embeddings, head=head, body=total - embeddings - head, tied=tied
    )


def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or the sum of all files under a folder (recursively, following file symlinks).

    Raises :class:`PrunekitError` if ``path`` does not exist.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise PrunekitError(f"Cannot measure size of {p}: no such file or folder.")
    total = 0
    for root, _dirs, files in os.walk(p):
        for name in files:
            f = Path(root, name)
            if f.is_file():
                total += f.stat().st_size
    return total
