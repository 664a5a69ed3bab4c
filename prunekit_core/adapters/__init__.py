"""Mapping a model into the IR: the base adapter (``base``), declared decoder tables and the channel-group
builders every plugin calls (``declared``, ``groups``), composition of sub-models (``compose``), generic
discovery for unknown architectures (``generic``), vision helpers (``vision``) and the built-in adapter
plugin (``builtin``).

Layer: may import ``registry`` and ``ir``.
"""
