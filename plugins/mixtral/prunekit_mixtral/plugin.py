"""Entry point module: registers the MoE adapter and the expert metrics with prunekit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl

from .adapter import MoEAdapter
from .metrics import EXPERT_METRICS


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(MoEAdapter())


@hookimpl
def prunekit_register_metrics(register: Callable[[Any], Any]) -> None:
    for cls in EXPERT_METRICS:
        register(cls())
