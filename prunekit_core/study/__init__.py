"""The whole job and what it measures: the one prune pipeline (``pipeline``: ``prunekit_core.prune``),
evaluation (``evaluate``), recovery training (``recovery``), sweeps (``sweep``), reports (``report``), plots
(``plots``) and the demo (``demo``).

Layer: may import ``planning`` and everything below it; only ``cli`` and ``testing`` sit above.
"""
