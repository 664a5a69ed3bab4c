"""Reading and writing: loading models (``loading``) and their sources (``sources``), pruned checkpoints
(``checkpoint``), atomic writes (``atomic``), integrity records (``integrity``), text windows (``text``) and the
new-plugin scaffold that ``prunekit new-plugin`` writes (``scaffold``).

Layer: may import ``surgery``, ``quant`` and everything below them.
"""
