"""Plugin discovery and the registries of adapters, metrics and quantization formats.

Entry points of the ``prunekit`` group are loaded lazily (on first use of a registry), one at a time,
each inside ``try/except``: a plugin that fails to import or to register is recorded in
:func:`load_failures` and reported by ``prunekit plugins``; it never takes the tool down. Set
``PRUNEKIT_STRICT_PLUGINS=1`` to re-raise instead (useful while writing a plugin).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
from torch import nn

from . import hookspecs
from .adapter import ArchitectureAdapter
from .errors import AmbiguousAdapterError, PluginError, UnknownMetricError, UnsupportedModelError
from .metrics import ImportanceMetric
from .quant import QuantFormat

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "prunekit"
BUILTIN_MODULES = (
    "prunekit_core.builtin.adapters",
    "prunekit_core.builtin.metrics",
    "prunekit_core.builtin.quant_formats",
)


@dataclass
class PluginInfo:
    """What one plugin is and what it registered."""

    name: str
    module: str
    version: str | None
    builtin: bool
    adapters: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    quant_formats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "version": self.version,
            "builtin": self.builtin,
            "adapters": self.adapters,
            "metrics": self.metrics,
            "quant_formats": self.quant_formats,
        }


@dataclass
class LoadFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    module: str
    error: str
    traceback: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "module": self.module, "error": self.error}


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("prunekit")
        self.pm.add_hookspecs(hookspecs)
        self.adapters: dict[str, tuple[ArchitectureAdapter, str]] = {}
        self.metrics: dict[str, tuple[ImportanceMetric, str]] = {}
        self.formats: dict[str, tuple[QuantFormat, str]] = {}
        self.plugins: list[PluginInfo] = []
        self.failures: list[LoadFailure] = []
        self.loaded = False
        self._lock = threading.RLock()

    # Loading ---------------------------------------------------------------------------------------

    def ensure_loaded(self) -> None:
        with self._lock:
            if self.loaded:
                return
            self.loaded = True
            for mod in BUILTIN_MODULES:
                self._load_one(name=mod.rsplit(".", 1)[-1], module_name=mod, version=None, builtin=True)
            for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                version = ep.dist.version if ep.dist is not None else None
                self._load_one(name=ep.name, module_name=ep.value, version=version, builtin=False, ep=ep)

    def _load_one(
        self,
        *,
        name: str,
        module_name: str,
        version: str | None,
        builtin: bool,
        ep: md.EntryPoint | None = None,
        module: ModuleType | None = None,
    ) -> None:
        info = PluginInfo(name=name, module=module_name, version=version, builtin=builtin)
        staged: dict[str, list[tuple[str, Any]]] = {"adapters": [], "metrics": [], "formats": []}
        try:
            if module is None:
                module = ep.load() if ep is not None else importlib.import_module(module_name)
            if not isinstance(module, ModuleType):
                raise PluginError(f"entry point {name!r} must name a module, got {type(module).__name__}")
            self.pm.register(module, name=f"{name}:{module_name}")
            try:
                self._collect(module, staged)
            except BaseException:
                self.pm.unregister(module)
                raise
        except (Exception, SystemExit) as exc:  # a broken plugin is reported, not fatal
            if os.environ.get("PRUNEKIT_STRICT_PLUGINS") == "1":
                raise
            log.warning("prunekit plugin %s (%s) failed to load: %s", name, module_name, exc)
            self.failures.append(
                LoadFailure(
                    name=name,
                    module=module_name,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )
            )
            return
        for key, obj in staged["adapters"]:
            self.adapters[key] = (obj, name)
            info.adapters.append(key)
        for key, obj in staged["metrics"]:
            self.metrics[key] = (obj, name)
            info.metrics.append(key)
        for key, obj in staged["formats"]:
            self.formats[key] = (obj, name)
            info.quant_formats.append(key)
        self.plugins.append(info)

    def disable_adapter(self, key: str, plugin: str, exc: BaseException) -> None:
        """Drop an adapter whose ``match`` raised, and report it with the plugin load failures."""
        with self._lock:
            self.adapters.pop(key, None)
            log.warning(
                "prunekit adapter %s (plugin %s) raised in match() and is disabled: %s", key, plugin, exc
            )
            self.failures.append(
                LoadFailure(
                    name=plugin,
                    module=f"adapter {key}",
                    error=f"match() raised {type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )
            )

    def _collect(self, module: ModuleType, staged: dict[str, list[tuple[str, Any]]]) -> None:
        """Call the module's hooks (only that module's) and validate what it registers."""

        def registrar(kind: str, base: type, table: dict[str, Any]) -> Callable[[Any], None]:
            def register(obj: Any) -> None:
                if not isinstance(obj, base):
                    raise PluginError(f"registered {kind} must be a {base.__name__}, got {obj!r}")
                key = getattr(obj, "name", "")
                if not key:
                    raise PluginError(f"{type(obj).__name__} has no name")
                taken = key in table or any(k == key for k, _ in staged[kind])
                if taken:
                    owner = table[key][1] if key in table else "this plugin"
                    raise PluginError(f"{kind[:-1]} name {key!r} is already registered by {owner}")
                staged[kind].append((key, obj))

            return register

        calls: list[tuple[str, str, type, dict[str, Any]]] = [
            ("prunekit_register_adapters", "adapters", ArchitectureAdapter, self.adapters),
            ("prunekit_register_metrics", "metrics", ImportanceMetric, self.metrics),
            ("prunekit_register_quant_formats", "formats", QuantFormat, self.formats),
        ]
        for hook_name, kind, base, table in calls:
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            impl(register=registrar(kind, base, table))


_REGISTRY = _Registry()


def _registry() -> _Registry:
    _REGISTRY.ensure_loaded()
    return _REGISTRY


def reset_plugins() -> None:
    """Forget every loaded plugin (tests use this after installing or faking entry points)."""
    global _REGISTRY
    _REGISTRY = _Registry()


def register_module(module: ModuleType, *, name: str | None = None) -> None:
    """Register a plugin module directly, without an entry point (tests and notebooks).

    Raises :class:`PluginError` if the module's hooks fail; unlike entry points this is never silent.
    """
    reg = _registry()
    before = len(reg.failures)
    with _env_strict():
        reg._load_one(
            name=name or module.__name__,
            module_name=module.__name__,
            version=None,
            builtin=False,
            module=module,
        )
    if len(reg.failures) > before:  # pragma: no cover - strict mode re-raises first
        raise PluginError(reg.failures[-1].error)


class _env_strict:
    def __enter__(self) -> None:
        self.old = os.environ.get("PRUNEKIT_STRICT_PLUGINS")
        os.environ["PRUNEKIT_STRICT_PLUGINS"] = "1"

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            os.environ.pop("PRUNEKIT_STRICT_PLUGINS", None)
        else:
            os.environ["PRUNEKIT_STRICT_PLUGINS"] = self.old


def plugins() -> list[PluginInfo]:
    """Every plugin that loaded, built-ins first."""
    return list(_registry().plugins)


def load_failures() -> list[LoadFailure]:
    """Plugins that failed to load (empty when all is well)."""
    return list(_registry().failures)


def check_pending() -> None:
    """Raise if a loaded plugin implements a hook that no hookspec declares (e.g. a typo)."""
    _registry().pm.check_pending()


def adapters() -> dict[str, ArchitectureAdapter]:
    return {k: v for k, (v, _) in _registry().adapters.items()}


def metrics() -> dict[str, ImportanceMetric]:
    return {k: v for k, (v, _) in _registry().metrics.items()}


def quant_formats() -> dict[str, QuantFormat]:
    return {k: v for k, (v, _) in _registry().formats.items()}


def get_metric(name: str) -> ImportanceMetric:
    table = metrics()
    if name not in table:
        raise UnknownMetricError(name, sorted(table))
    return table[name]


def get_adapter(name: str) -> ArchitectureAdapter:
    table = adapters()
    if name not in table:
        raise PluginError(
            f"no adapter named {name!r}; installed adapters: {sorted(table) or 'none'}. "
            "Install the plugin that provides it (e.g. pip install -e plugins/llama)."
        )
    return table[name]


@dataclass(frozen=True)
class AdapterMatch:
    """One adapter that claims a model, with its ``match`` score and the plugin that registered it."""

    adapter: ArchitectureAdapter
    name: str
    plugin: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.name, "plugin": self.plugin, "score": self.score}


def rank_adapters(model: nn.Module) -> list[AdapterMatch]:
    """Every adapter whose ``match`` accepts ``model``, best score first (the first one is selected)."""
    reg = _registry()
    scored = []
    for key, (adapter, plugin) in list(reg.adapters.items()):
        try:
            score = adapter.match(model)
        except Exception as exc:  # a broken adapter must not take the others down
            if os.environ.get("PRUNEKIT_STRICT_PLUGINS") == "1":
                raise
            reg.disable_adapter(key, plugin, exc)
            continue
        if score is not None:
            scored.append(AdapterMatch(adapter=adapter, name=key, plugin=plugin, score=float(score)))
    return sorted(scored, key=lambda m: -m.score)


def select_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter with the highest ``match`` score for ``model``.

    Raises :class:`UnsupportedModelError` when no adapter matches and :class:`AmbiguousAdapterError` when
    the best score is shared by adapters of different plugins.
    """
    reg = _registry()
    scored = [(m.score, m.name, m.adapter, m.plugin) for m in rank_adapters(model)]
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not scored:
        raise UnsupportedModelError(
            model_class=type(model).__name__,
            model_type=model_type,
            installed=sorted(reg.adapters),
            failures=[f.name for f in reg.failures],
        )
    scored.sort(key=lambda x: -x[0])
    best = scored[0]
    ties = [s for s in scored if s[0] == best[0]]
    if len(ties) > 1:
        raise AmbiguousAdapterError(
            type(model).__name__, best[0], [(name, plugin) for _, name, _, plugin in ties]
        )
    return best[2]
