"""The plugin registry: the hook specifications (``hookspecs``), loading plugins through pluggy with
per-plugin failure isolation (``plugins``).

Layer: above ``ir``, below everything else. May import ``ir``. The base types that plugins register
(adapters, metrics, quantization formats) are named only under ``TYPE_CHECKING``; at run time they declare
themselves to the registry.
"""
