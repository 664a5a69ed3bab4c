"""prunekit plugin for mixture-of-experts decoders: Mixtral and Qwen2-MoE."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import MoEAdapter

__all__ = ["MoEAdapter"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the adapter on first use: `prunekit plugins` imports this package without torch."""
    if name == "MoEAdapter":
        from .adapter import MoEAdapter

        return MoEAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
