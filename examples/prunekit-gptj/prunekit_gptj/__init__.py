"""prunekit plugin for GPTJForCausalLM (package prunekit_gptj)."""

from .adapter import GptjAdapter

__all__ = ["GptjAdapter"]
__version__ = "0.1.0"
