"""Entry point module: registers the LLaVA adapter with prunekit.

The top imports nothing heavy (the adapters are imported inside the hook), so `prunekit plugins`
lists the plugin from its catalog without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl


@hookimpl
def prunekit_catalog() -> dict[str, list[str]]:
    return {"adapters": ["llava", "got_ocr2"]}


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    from .adapter import LlavaAdapter
    from .got_ocr2 import GotOcr2Adapter

    register(LlavaAdapter())
    register(GotOcr2Adapter())
