"""Entry point module: registers the LLaVA adapter with prunekit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl

from .adapter import LlavaAdapter
from .got_ocr2 import GotOcr2Adapter


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(LlavaAdapter())
    register(GotOcr2Adapter())
