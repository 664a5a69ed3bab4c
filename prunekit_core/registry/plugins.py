"""Plugin discovery and the registries of adapters, metrics and quantization formats.

Every plugin, the built-in ones included, is an entry point of the ``prunekit`` group (the built-ins are
entry points of prunekit-core itself, declared in its ``pyproject.toml``, so this module imports none of
them by name). Entry points are loaded lazily (on first use of a registry), one at a time, each inside
``try/except``, and each plugin's hooks are called through pluggy on that plugin alone
(:meth:`pluggy.PluginManager.subset_hook_caller`): a plugin that fails to import or to register is recorded in
:func:`load_failures` and reported by ``prunekit plugins --load`` (and by plain ``prunekit plugins`` when
its entry-point module itself fails to import); it never takes the tool down. Set
``PRUNEKIT_STRICT_PLUGINS=1`` to re-raise instead (useful while writing a plugin).

:func:`catalog` answers ``prunekit plugins`` without building anything: a plugin that implements the
``prunekit_catalog`` hook is listed from the names it declares there, so the listing imports no torch when
the plugin's entry-point module imports its adapters and metrics inside its register hooks (every plugin
shipped with prunekit does). So the plain listing cannot see an adapter module that fails to import;
``prunekit plugins --load`` runs the full load, which does, and which checks each third-party catalog
against what the plugin registers (the built-in tables are checked by the test suite instead, so that a
stale table can never disable the built-in metrics).
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
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from ..ir.errors import AmbiguousAdapterError, PluginError, UnknownMetricError, UnsupportedModelError
from . import hookspecs

if TYPE_CHECKING:  # for annotations only: the registry imports no base type (see registry_base)
    from torch import nn

    from ..adapters.base import ArchitectureAdapter
    from ..quant.base import QuantFormat
    from ..scoring.metrics import ImportanceMetric

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "prunekit"
#: The modules of the built-in plugins, loaded first, in this order, through the entry points prunekit-core
#: declares for them (``[project.entry-points.prunekit]`` in pyproject.toml).
BUILTIN_MODULES = (
    "prunekit_core.adapters.builtin",
    "prunekit_core.scoring.builtin_metrics",
    "prunekit_core.quant.builtin_formats",
)
#: What the built-in plugins register, by name: the catalog the ``prunekit_catalog`` hook gives for a
#: third-party plugin (the built-in modules import torch at their top, so they are not imported to list
#: them). tests/test_plugins.py checks each table against what its module registers.
BUILTIN_CATALOGS: dict[str, dict[str, list[str]]] = {
    "prunekit_core.adapters.builtin": {"adapters": ["generic"]},
    "prunekit_core.scoring.builtin_metrics": {
        "metrics": [
            "bi",
            "bi_lsq",
            "angular",
            "sublayer_drop",
            "nri",
            "sleb",
            "magnitude",
            "wanda",
            "taylor",
            "obs",
        ]
    },
    "prunekit_core.quant.builtin_formats": {
        "quant_formats": [
            "mxfp8_e4m3",
            "mxfp8_e5m2",
            "mxfp6_e3m2",
            "mxfp6_e2m3",
            "mxfp4",
            "mxint8",
            "int8",
            "int8_g128",
            "int4_g32",
            "int4_g64",
            "int4_g128",
            "int4a_g128",
            "int6_g128",
            "int5_g128",
            "int3_g32",
            "int3_g64",
            "int3_g128",
            "int2_g32",
            "int2_g64",
            "int2a_g32",
            "int2a_g64",
            "ternary",
            "ternary_g64",
            "fp6_llm",
            "splitquant3_int4_g128",
            "splitquant3_int4_g128_idx",
            "gguf_f16",
            "gguf_bf16",
            "gguf_q8_0",
            "gguf_q4_0",
            "gguf_q4_1",
            "gguf_q5_0",
            "gguf_q5_1",
        ]
    },
}
#: the keys of a catalog, and of PluginInfo's lists
CATALOG_KEYS = ("adapters", "metrics", "quant_formats")


@dataclass(frozen=True)
class _Kind:
    """One kind of thing a plugin registers: its hook, the key of its table and its base type's name."""

    key: str
    hook: str
    base: str


KINDS = (
    _Kind("adapters", "prunekit_register_adapters", "ArchitectureAdapter"),
    _Kind("metrics", "prunekit_register_metrics", "ImportanceMetric"),
    _Kind("formats", "prunekit_register_quant_formats", "QuantFormat"),
)
#: the base type of each kind, as :func:`registry_base` declared it
_BASES: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def registry_base(kind: str) -> Callable[[_T], _T]:
    """Class decorator: declare ``cls`` the base type of what plugins register as ``kind`` (``adapters``,
    ``metrics`` or ``formats``). The registry checks each registered object against it.

    The base types live in the layers above the registry (adapters, scoring, quant), so they name
    themselves here instead of the registry importing them. An object registered before its kind's base
    type was ever imported cannot be an instance of it, and is rejected as such.
    """
    known = {k.key: k for k in KINDS}
    if kind not in known:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(known)}")

    def declare(cls: _T) -> _T:
        if cls.__name__ != known[kind].base:
            raise ValueError(f"the base type of {kind} is {known[kind].base}, not {cls.__name__}")
        _BASES[kind] = cls
        return cls

    return declare


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
            builtin, others = _entry_points()
            for mod in BUILTIN_MODULES:
                ep = builtin.get(mod)
                if ep is None:
                    self.failures.append(_missing_builtin(mod))
                    continue
                self._load_one(name=ep.name, module_name=mod, version=None, builtin=True, ep=ep)
            for ep in others:
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
        staged: dict[str, list[tuple[str, Any]]] = {kind.key: [] for kind in KINDS}
        try:
            if module is None:
                module = ep.load() if ep is not None else importlib.import_module(module_name)
            if not isinstance(module, ModuleType):
                raise PluginError(f"entry point {name!r} must name a module, got {type(module).__name__}")
            self.pm.register(module, name=f"{name}:{module_name}")
            try:
                _check_marked(self.pm, module, module_name)
                self._collect(module, staged)
                declared = None if builtin else _catalog(self._hook(module, "prunekit_catalog"))
                if declared is not None:
                    _check_catalog(declared, staged)
            except BaseException:
                self.pm.unregister(module)
                raise
        except (Exception, SystemExit) as exc:  # a broken plugin is reported, not fatal
            self.failures.append(_failure(name, module_name, exc))
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

    def _hook(self, module: ModuleType, hook_name: str) -> Any:
        """The hook ``hook_name`` of the registered ``module`` alone: calling it calls no other plugin, so a
        plugin that raises fails by itself, and what it registers is staged as its own."""
        others = [p for p in self.pm.get_plugins() if p is not module]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

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
        """Call the module's register hooks (only that module's) and validate what it registers."""
        tables: dict[str, dict[str, Any]] = {
            "adapters": self.adapters,
            "metrics": self.metrics,
            "formats": self.formats,
        }

        def registrar(kind: _Kind) -> Callable[[Any], None]:
            table = tables[kind.key]

            def register(obj: Any) -> None:
                base = _BASES.get(kind.key)
                if base is None or not isinstance(obj, base):
                    raise PluginError(f"registered {kind.key} must be a {kind.base}, got {obj!r}")
                key = getattr(obj, "name", "")
                if not key:
                    raise PluginError(f"{type(obj).__name__} has no name")
                taken = key in table or any(k == key for k, _ in staged[kind.key])
                if taken:
                    owner = table[key][1] if key in table else "this plugin"
                    raise PluginError(f"{kind.key[:-1]} name {key!r} is already registered by {owner}")
                staged[kind.key].append((key, obj))

            return register

        for kind in KINDS:
            self._hook(module, kind.hook)(register=registrar(kind))


def _check_marked(pm: pluggy.PluginManager, module: ModuleType, module_name: str) -> None:
    """Raise :class:`PluginError` for a function named like a hook but not marked with ``hookimpl``:
    pluggy would never call it, and the plugin would load registering nothing."""
    for hook_name in (*(k.hook for k in KINDS), "prunekit_catalog", "prunekit_gguf_layout"):
        if callable(getattr(module, hook_name, None)) and pm.parse_hookimpl_opts(module, hook_name) is None:
            raise PluginError(
                f"{module_name}.{hook_name} is not a hook implementation: decorate it with "
                "@prunekit_core.hookimpl"
            )


def _entry_points() -> tuple[dict[str, md.EntryPoint], list[md.EntryPoint]]:
    """The entry points of the group: the built-ins' by module, and the others sorted by name."""
    builtin: dict[str, md.EntryPoint] = {}
    others = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in BUILTIN_MODULES and ep.value not in builtin:
            builtin[ep.value] = ep
        else:
            others.append(ep)
    return builtin, sorted(others, key=lambda e: e.name)


def _missing_builtin(module_name: str) -> LoadFailure:
    """A built-in plugin without its entry point: prunekit-core's installed metadata is stale or absent."""
    return _failure(
        module_name,
        module_name,
        PluginError(
            f"the built-in plugin {module_name} has no entry point in the {ENTRY_POINT_GROUP!r} group: "
            "prunekit-core's installed metadata is missing or older than its pyproject.toml. "
            "Reinstall it (pip install -e . in the source tree, or bash scripts/setup.sh)."
        ),
    )


def _failure(name: str, module_name: str, exc: BaseException) -> LoadFailure:
    """Record a plugin that failed to load (re-raised under ``PRUNEKIT_STRICT_PLUGINS=1``)."""
    if os.environ.get("PRUNEKIT_STRICT_PLUGINS") == "1":
        raise exc
    log.warning("prunekit plugin %s (%s) failed to load: %s", name, module_name, exc)
    return LoadFailure(
        name=name, module=module_name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
    )


def read_catalog(module: ModuleType) -> dict[str, list[str]] | None:
    """The names ``module``'s ``prunekit_catalog`` hook declares, by kind (``None`` without the hook).

    The hook is called through pluggy, on a plugin manager of its own (the module is not registered with
    the registry). Raises :class:`PluginError` for a catalog that is not a mapping of ``adapters``,
    ``metrics`` and ``quant_formats`` to lists of names.
    """
    pm = pluggy.PluginManager("prunekit")
    pm.add_hookspecs(hookspecs)
    pm.register(module)
    return _catalog(pm.hook.prunekit_catalog)


def _catalog(hook: Any) -> dict[str, list[str]] | None:
    """Call a ``prunekit_catalog`` hook caller of one plugin and check what it returns."""
    if not hook.get_hookimpls():
        return None
    results = hook()
    raw = results[0] if results else None
    if not isinstance(raw, dict) or not set(raw) <= set(CATALOG_KEYS):
        raise PluginError(
            f"prunekit_catalog must return a dict with keys among {', '.join(CATALOG_KEYS)}, got {raw!r}"
        )
    table: dict[str, list[str]] = {}
    for key in CATALOG_KEYS:
        names = raw.get(key, [])
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise PluginError(f"prunekit_catalog[{key!r}] must be a list of names, got {names!r}")
        table[key] = list(names)
    return table


def _check_catalog(declared: dict[str, list[str]], staged: dict[str, list[tuple[str, Any]]]) -> None:
    """Raise :class:`PluginError` unless the plugin registered exactly the names its catalog declares."""
    for key, kind in zip(CATALOG_KEYS, (k.key for k in KINDS), strict=True):
        registered = [k for k, _ in staged[kind]]
        listed = declared.get(key, [])
        if sorted(registered) != sorted(listed):
            raise PluginError(
                f"the plugin registers {key} {registered} but its catalog (prunekit_catalog) lists {listed}: "
                "make the catalog name exactly what the register hooks register"
            )


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


def catalog() -> tuple[list[PluginInfo], list[LoadFailure]]:
    """Every plugin and what it registers, by name, and the plugins that failed: what ``prunekit plugins``
    lists, made without building any adapter, metric or format.

    Each built-in is listed from :data:`BUILTIN_CATALOGS` (named by its entry point) and each other entry point from its module's
    ``prunekit_catalog`` hook (importing the entry-point module only). A plugin without that hook needs
    the full load, which then answers for all (as :func:`plugins` and :func:`load_failures` do); so does a
    registry that is already loaded. The full load checks every catalog against the registrations;
    ``prunekit plugins --load`` runs it.
    """
    if _REGISTRY.loaded:
        return plugins(), load_failures()
    infos: list[PluginInfo] = []
    failures: list[LoadFailure] = []
    builtin, others = _entry_points()
    for mod in BUILTIN_MODULES:
        builtin_ep = builtin.get(mod)
        if builtin_ep is None:
            failures.append(_missing_builtin(mod))
            continue
        listed = _lists(BUILTIN_CATALOGS[mod])
        infos.append(PluginInfo(name=builtin_ep.name, module=mod, version=None, builtin=True, **listed))
    for ep in others:
        version = ep.dist.version if ep.dist is not None else None
        try:
            module = ep.load()
            if not isinstance(module, ModuleType):
                raise PluginError(f"entry point {ep.name!r} must name a module, got {type(module).__name__}")
            table = read_catalog(module)
        except (Exception, SystemExit) as exc:  # reported as the full load reports it
            failures.append(_failure(ep.name, ep.value, exc))
            continue
        if table is None:
            return plugins(), load_failures()
        infos.append(
            PluginInfo(name=ep.name, module=ep.value, version=version, builtin=False, **_lists(table))
        )
    return infos, failures


def _lists(table: dict[str, list[str]]) -> dict[str, list[str]]:
    return {key: list(table.get(key, [])) for key in CATALOG_KEYS}


def load_failures() -> list[LoadFailure]:
    """Plugins that failed to load (empty when all is well)."""
    return list(_registry().failures)


def plugin_packages() -> list[str]:
    """The top-level package of every installed plugin's entry-point module (``acme`` for an entry point
    ``acme.plugin``), sorted: the loggers the CLI shows besides the core's. Read from the entry points'
    metadata, so nothing is imported and a plugin that fails to import is still named."""
    return sorted({ep.module.split(".", 1)[0] for ep in md.entry_points(group=ENTRY_POINT_GROUP)})


def check_pending() -> None:
    """Raise if a loaded plugin implements a hook that no hookspec declares (e.g. a typo)."""
    _registry().pm.check_pending()


def adapters() -> dict[str, ArchitectureAdapter]:
    return {k: v for k, (v, _) in _registry().adapters.items()}


def metrics() -> dict[str, ImportanceMetric]:
    return {k: v for k, (v, _) in _registry().metrics.items()}


def quant_formats() -> dict[str, QuantFormat]:
    return {k: v for k, (v, _) in _registry().formats.items()}


def gguf_layouts(model: nn.Module) -> list[Any]:
    """What each loaded plugin's ``prunekit_gguf_layout`` hook returns for ``model`` (``None`` left out), in
    pluggy's call order (the last registered plugin first)."""
    return [x for x in _registry().pm.hook.prunekit_gguf_layout(model=model) if x is not None]


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
