"""prunekit plugin for GPTJForCausalLM (package prunekit_gptj)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import GptjAdapter

__all__ = ["GptjAdapter"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the adapter on first use: `prunekit plugins` imports this package without torch."""
    if name == "GptjAdapter":
        from .adapter import GptjAdapter

        return GptjAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
