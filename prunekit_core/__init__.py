"""prunekit core: the pruning IR, plugin system, metrics, planners, surgery, evaluation and checkpoints."""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl"]
