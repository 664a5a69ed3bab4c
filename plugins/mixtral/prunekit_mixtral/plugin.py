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


@hookimpl
def prunekit_gguf_layout(model: Any) -> Any:
    """Mixtral as llama.cpp writes it: the ``llama`` graph with experts (one expert count and width for
    every layer; llama.cpp has no per-layer MoE form, so no ``deci``)."""
    from prunekit_core.adapters.base import hf_model
    from prunekit_core.io.gguf_export import GGUFLayout

    if type(hf_model(model)).__name__ != "MixtralForCausalLM":
        return None
    return GGUFLayout(
        name="mixtral",
        heterogeneous_arch=None,
        gate=None,
        up=None,
        down=None,
        router="mlp.gate.weight",
        experts_gate_up="mlp.experts.gate_up_proj",
        experts_down="mlp.experts.down_proj",
    )
