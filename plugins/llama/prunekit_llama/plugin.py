"""Entry point module: registers the Llama-family adapter with prunekit.

The top imports nothing heavy (the adapters are imported inside the hook), so `prunekit plugins`
lists the plugin from its catalog without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl


@hookimpl
def prunekit_catalog() -> dict[str, list[str]]:
    return {"adapters": ["llama"]}


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    from .adapter import LlamaFamilyAdapter

    register(LlamaFamilyAdapter())


@hookimpl
def prunekit_gguf_layout(model: Any) -> Any:
    """Llama and Mistral as llama.cpp's ``llama`` graph (``deci`` for per-layer shapes): the core's default
    tables are the Llama names. Qwen2 (its own llama.cpp architecture) is not exported yet."""
    from prunekit_core.adapters.base import hf_model
    from prunekit_core.io.gguf_export import GGUFLayout

    if type(hf_model(model)).__name__ not in ("LlamaForCausalLM", "MistralForCausalLM"):
        return None
    return GGUFLayout(name="llama")
