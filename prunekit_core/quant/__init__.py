"""Quantization formats: the format protocol (``base``) and the built-in MX/INT/FP formats
(``builtin_formats``, a plugin registered through the same hook as third-party formats).

Layer: beside ``surgery`` (the two never import each other); may import ``adapters``, ``registry``, ``ir``.
"""
