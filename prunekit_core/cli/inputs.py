"""The checks every command runs before any expensive work, and the loading of models and texts.

Cheap checks first (a text is readable, a model path exists, --out can be written): nothing is loaded,
computed or written before they pass. The checks are :mod:`prunekit_core.study.pipeline`'s (``prunekit prune``
runs them inside :func:`prunekit_core.prune`); heavy modules are imported inside the functions.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..study.pipeline import check_model_spec, check_text, load_model_spec, multimodal_inputs
from .ui import UI

# the checks prunekit_core.prune runs, for the other commands (one definition of each)
__all__ = [
    "check_model",
    "check_text",
    "load_model",
    "multimodal",
]
multimodal = multimodal_inputs

if TYPE_CHECKING:
    from ..io.text import TextWindows


def check_model(spec: str, *, tokenizer: bool = True) -> Any:
    """:func:`prunekit_core.study.pipeline.check_model_spec`: nothing loaded, a missing path fails at once."""
    return check_model_spec(spec, tokenizer=tokenizer)


def load_model(
    ui: UI, spec: str, args: argparse.Namespace | None = None, *, tokenizer: bool = True
) -> tuple[Any, Any, Any]:
    """Load ``spec`` under the load policy of ``args`` (--allow-pickle, --trust-remote-code), timed."""

    allow_pickle = bool(getattr(args, "allow_pickle", False))
    trust_remote_code = bool(getattr(args, "trust_remote_code", False))
    if allow_pickle:
        ui.info("--allow-pickle: pickled weights are read with torch.load(weights_only=True)")
    if trust_remote_code:
        ui.info("--trust-remote-code: model code shipped with the checkpoint will run")
    with ui.step(f"load {spec}"):
        return load_model_spec(
            spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, tokenizer=tokenizer
        )


def text_windows(
    tok: Any, spec: str, *, seq_len: int, num_windows: int | None, max_tokens: int | None = None
) -> TextWindows:
    from ..io.text import load_windows

    return load_windows(tok, spec, seq_len=seq_len, num_windows=num_windows, max_tokens=max_tokens)
