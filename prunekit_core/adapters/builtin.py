"""Built-in adapters, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry.hookspecs import hookimpl
from .generic import GenericAdapter


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(GenericAdapter())
