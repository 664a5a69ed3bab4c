"""Built-in adapters, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..generic import GenericAdapter
from ..hookspecs import hookimpl


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    register(GenericAdapter())
