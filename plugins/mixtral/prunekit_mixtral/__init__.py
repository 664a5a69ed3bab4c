"""prunekit plugin for mixture-of-experts decoders: Mixtral and Qwen2-MoE."""

from .adapter import MoEAdapter

__all__ = ["MoEAdapter"]
__version__ = "0.1.0"
