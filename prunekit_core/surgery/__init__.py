"""Changing a model as a plan says: removing blocks and branches (``apply``), width cuts (``width``),
least-squares repair (``repair``) and router edits for removed experts (``routing``).

Layer: beside ``quant`` (the two never import each other); may import ``adapters``, ``registry``, ``ir``.
"""
