"""Entry point module: registers the MoE adapter and the expert metrics with prunekit.

The top imports nothing heavy (adapters and metrics are imported inside the hooks), so `prunekit plugins`
lists the plugin from its catalog without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl


@hookimpl
def prunekit_catalog() -> dict[str, list[str]]:
    return {
        "adapters": ["mixtral"],
        "metrics": [
            "expert_frequency",
            "expert_mass",
            "moe_pruner",
            "expert_reconstruction",
            "expert_random",
        ],
    }


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    from .adapter import MoEAdapter

    register(MoEAdapter())


@hookimpl
def prunekit_register_metrics(register: Callable[[Any], Any]) -> None:
    from .metrics import EXPERT_METRICS

    for cls in EXPERT_METRICS:
        register(cls())
