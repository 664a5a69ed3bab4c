"""Entry point module: registers the LLaVA adapter with prunekit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl

from .adapter import LlavaAdapter


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(LlavaAdapter())
