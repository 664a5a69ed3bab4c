"""prunekit plugin for LLaVA vision-language models: vision tower, projector and language model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import LlavaAdapter

__all__ = ["LlavaAdapter"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the adapter on first use: `prunekit plugins` imports this package without torch."""
    if name == "LlavaAdapter":
        from .adapter import LlavaAdapter

        return LlavaAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
