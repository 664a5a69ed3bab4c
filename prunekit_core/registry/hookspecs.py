"""Every hook a prunekit plugin can implement.

A plugin is a module (named by an entry point in the ``prunekit`` group) with functions decorated by
``prunekit_core.hookimpl``. Hooks hand over objects; behaviour lives in the core's base classes
(:class:`~prunekit_core.adapters.base.ArchitectureAdapter`, :class:`~prunekit_core.scoring.metrics.ImportanceMetric`,
:class:`~prunekit_core.quant.base.QuantFormat`). The core calls hooks through pluggy (``pm.hook``), with
keyword arguments, one plugin at a time (:mod:`prunekit_core.registry.plugins`); a function named like a hook but not
decorated with ``hookimpl`` is a load error, not ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from ..adapters.base import ArchitectureAdapter
    from ..io.gguf_export import GGUFLayout
    from ..quant.base import QuantFormat
    from ..scoring.metrics import ImportanceMetric

hookspec = pluggy.HookspecMarker("prunekit")
hookimpl = pluggy.HookimplMarker("prunekit")


# --- what a plugin registers, by name ------------------------------------------------------------


@hookspec
def prunekit_catalog() -> dict[str, list[str]]:
    """Optional: name what the plugin registers, without building it.

    Return ``{"adapters": [...], "metrics": [...], "quant_formats": [...]}`` (a missing key means none).
    ``prunekit plugins`` lists a plugin from its catalog, importing only the entry-point module: keep that
    module's top free of torch and transformers (import the adapter and metric modules inside the register
    hooks) and the listing starts at once. When the registries load, the names the register hooks
    register must be exactly these, or the plugin is reported as failed to load.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


# --- architectures ---------------------------------------------------------------------------------


@hookspec
def prunekit_register_adapters(register: Callable[[ArchitectureAdapter], Any]) -> None:
    """Register architecture adapters.

    Call ``register(adapter)`` once for each :class:`ArchitectureAdapter` instance the plugin provides.
    An adapter maps a concrete model into the pruning IR and performs the family-specific steps of surgery
    (config fields, cache indices). Adapter names must be unique across plugins.
    """


# --- importance metrics ----------------------------------------------------------------------------


@hookspec
def prunekit_register_metrics(register: Callable[[ImportanceMetric], Any]) -> None:
    """Register importance metrics.

    Call ``register(metric)`` once for each :class:`ImportanceMetric` instance. A metric declares the unit
    it scores (block, sublayer, span) and what it needs (activation statistics from the shared calibration
    pass, or removal trials); the core supplies those through a scoring context.
    """


# --- quantization formats --------------------------------------------------------------------------


@hookspec
def prunekit_register_quant_formats(register: Callable[[QuantFormat], Any]) -> None:
    """Register quantization formats.

    Call ``register(fmt)`` once for each :class:`QuantFormat` instance: its name, its exact bit accounting
    and a function that quantizes (or fake-quantizes) a weight tensor.
    """


# --- export -----------------------------------------------------------------------------------------


@hookspec
def prunekit_gguf_layout(model: nn.Module) -> GGUFLayout | None:
    """Optional: say how ``model`` is written as GGUF for llama.cpp, or return ``None``.

    Return a :class:`~prunekit_core.io.gguf_export.GGUFLayout` (declared tables: which parameter becomes
    which llama.cpp tensor) for a model of a family the plugin knows. ``prunekit export --format gguf``
    (:func:`~prunekit_core.io.gguf_export.export_gguf`) uses the first layout a plugin returns, and raises
    a clear error when none does.
    """
