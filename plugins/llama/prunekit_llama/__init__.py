"""prunekit plugin for Llama-family dense decoders: Llama, Mistral and Qwen2."""

from .adapter import LlamaFamilyAdapter

__all__ = ["LlamaFamilyAdapter"]
__version__ = "0.1.0"
