"""prunekit plugin for Llama-family dense decoders: Llama, Mistral and Qwen2."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import LlamaFamilyAdapter

__all__ = ["LlamaFamilyAdapter"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the adapter on first use: `prunekit plugins` imports this package without torch."""
    if name == "LlamaFamilyAdapter":
        from .adapter import LlamaFamilyAdapter

        return LlamaFamilyAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
