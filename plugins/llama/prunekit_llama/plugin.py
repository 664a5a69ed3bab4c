"""Entry point module: registers the Llama-family adapter with prunekit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl

from .adapter import LlamaFamilyAdapter


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(LlamaFamilyAdapter())
