"""prunekit plugin for LLaVA vision-language models: vision tower, projector and language model."""

from .adapter import LlavaAdapter

__all__ = ["LlavaAdapter"]
__version__ = "0.1.0"
