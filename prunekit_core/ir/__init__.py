"""The pruning IR: towers, blocks, sublayers, experts, channel groups, residual edges (``model``), the
registered kinds of sublayer and group (``kinds``), plans and fingerprints (``plan``), errors and defaults.

Layer: the lowest. Imports nothing else of prunekit_core (import-linter contract ``ir-alone``); only the
standard library, pydantic and torch.
"""
