"""The model check and loading of the commands that load a model themselves (``inspect``, ``sweep``).

Cheap checks first (a model path exists): nothing is loaded before they pass. The check and the loading
are :mod:`prunekit_core.study.pipeline`'s (``prune``, ``recover``, ``score`` and ``eval`` run them inside
their pipeline functions); heavy modules are imported inside the functions.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..study.pipeline import check_model_spec, load_model_spec
from .ui import UI

# the checks prunekit_core.prune runs, for the commands that load a model themselves (inspect, sweep)
__all__ = ["check_model", "load_model"]


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
