"""Entry point module: registers the adapter with prunekit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl

from .adapter import GptjAdapter


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(GptjAdapter())
