"""The plugin system: discovery, built-ins, broken plugins, adapter choice and name clashes."""

from __future__ import annotations

import importlib.metadata as md
import types
from collections.abc import Iterator

import pluggy
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

import prunekit_core.registry.plugins as plugins_mod
from prunekit_core import hookimpl
from prunekit_core.adapters.base import ArchitectureAdapter
from prunekit_core.ir.errors import AmbiguousAdapterError, PluginError, UnsupportedModelError
from prunekit_core.registry.plugins import (
    adapters,
    check_pending,
    load_failures,
    plugins,
    register_module,
    reset_plugins,
    select_adapter,
)

BROKEN_MODULE = "prunekit_test_broken_plugin"


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    reset_plugins()
    yield
    reset_plugins()


class ToyModel(nn.Module):
    """A model no installed adapter knows."""


class ToyAdapter(ArchitectureAdapter):
    def __init__(self, name: str, score: float = 50.0) -> None:
        self.name = name
        self.score = score

    def match(self, model):  # noqa: ANN001, ANN201
        return self.score if isinstance(model, ToyModel) else None

    def build_ir(self, model):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def finalize_surgery(self, model, ir_before, kept_blocks) -> None:  # noqa: ANN001
        raise NotImplementedError


def plugin_module(name: str, *adapters_to_register: ArchitectureAdapter) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def prunekit_register_adapters(register) -> None:  # noqa: ANN001
        for adapter in adapters_to_register:
            register(adapter)

    module.prunekit_register_adapters = prunekit_register_adapters
    return module


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2Model:
    """A model no adapter takes: a GPT-2 backbone without a language-model head (the generic adapter
    describes causal LMs only)."""
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()


@pytest.fixture
def broken_entry_point(tmp_path, monkeypatch) -> md.EntryPoint:
    """A fake entry point, next to the real ones, whose module raises on import."""
    (tmp_path / f"{BROKEN_MODULE}.py").write_text('raise RuntimeError("boom: this plugin is broken")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = md.EntryPoint(name="broken", value=BROKEN_MODULE, group=plugins_mod.ENTRY_POINT_GROUP)
    real = md.entry_points

    def entry_points(**kwargs):  # noqa: ANN202
        found = list(real(**kwargs))
        return found + [ep] if kwargs.get("group") == plugins_mod.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(plugins_mod.md, "entry_points", entry_points)
    reset_plugins()
    return ep


# --- discovery ---------------------------------------------------------------------------------------


def test_builtin_metrics_plugin_loads() -> None:
    info = {p.name: p for p in plugins()}
    assert "metrics" in info, f"built-in metrics failed to load: {[f.to_dict() for f in load_failures()]}"
    assert info["metrics"].builtin and info["metrics"].metrics
    assert plugins()[0].builtin, "built-ins come first"
    assert not [f for f in load_failures() if f.name == "metrics"]


def test_llama_entry_point_is_discovered() -> None:
    info = {p.name: p for p in plugins()}
    assert "llama" in info, f"llama plugin missing; failures: {[f.to_dict() for f in load_failures()]}"
    llama = info["llama"]
    assert (llama.version, llama.adapters, llama.builtin) == ("0.1.0", ["llama"], False)
    assert llama.module == "prunekit_llama.plugin"
    assert llama.to_dict()["adapters"] == ["llama"]
    assert select_adapter(tiny_llama()) is adapters()["llama"]
    check_pending()


def test_registry_loads_lazily_and_once(monkeypatch) -> None:
    calls = []
    real = md.entry_points

    def counting(**kwargs):  # noqa: ANN202
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(plugins_mod.md, "entry_points", counting)
    reset_plugins()
    assert calls == []
    plugins()
    adapters()
    load_failures()
    assert len(calls) == 1


# --- broken plugins ----------------------------------------------------------------------------------


def test_broken_plugin_is_reported_not_fatal(broken_entry_point) -> None:
    names = [p.name for p in plugins()]
    assert "llama" in names and "broken" not in names
    failure = next(f for f in load_failures() if f.name == "broken")
    assert failure.module == BROKEN_MODULE
    assert "RuntimeError" in failure.error and "boom" in failure.error
    assert "boom" in failure.traceback
    assert failure.to_dict() == {"name": "broken", "module": BROKEN_MODULE, "error": failure.error}
    assert select_adapter(tiny_llama()).name == "llama"  # the tool still works


def test_strict_mode_reraises(broken_entry_point, monkeypatch) -> None:
    monkeypatch.setenv("PRUNEKIT_STRICT_PLUGINS", "1")
    monkeypatch.setattr(plugins_mod, "BUILTIN_MODULES", ())  # only the entry points under test
    reset_plugins()
    with pytest.raises(RuntimeError, match="boom"):
        plugins()


def test_unsupported_model_lists_failed_plugins(broken_entry_point) -> None:
    with pytest.raises(UnsupportedModelError, match="broken"):
        select_adapter(tiny_gpt2())


def test_entry_point_must_name_a_module(monkeypatch) -> None:
    ep = md.EntryPoint(name="notmodule", value="prunekit_core.registry.plugins:plugins", group="prunekit")
    monkeypatch.setattr(plugins_mod.md, "entry_points", lambda **kw: [ep])
    reset_plugins()
    failure = next(f for f in load_failures() if f.name == "notmodule")
    assert "must name a module" in failure.error


def test_unknown_hook_is_caught_by_check_pending() -> None:
    module = types.ModuleType("typo_plugin")

    @hookimpl
    def prunekit_register_adaptors(register) -> None:  # noqa: ANN001 - the typo is the point
        pass

    module.prunekit_register_adaptors = prunekit_register_adaptors
    register_module(module, name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="prunekit_register_adaptors"):
        check_pending()


def test_register_hooks_are_called_through_pluggy_one_plugin_at_a_time() -> None:
    """Each plugin's register hooks are pluggy hook calls whose only implementation is that plugin's."""
    calls: list[tuple[str, list[str]]] = []
    reg = plugins_mod._registry()
    reg.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None,
    )
    register_module(plugin_module("traced_one", ToyAdapter("toy_one")), name="one")
    register_module(plugin_module("traced_two", ToyAdapter("toy_two")), name="two")
    adapter_calls = [impls for name, impls in calls if name == "prunekit_register_adapters"]
    assert adapter_calls == [["one:traced_one"], ["two:traced_two"]]
    assert {"toy_one", "toy_two"} <= set(adapters())


def test_a_plugin_whose_hook_raises_fails_alone(monkeypatch) -> None:
    """A register hook that raises takes only its own plugin down: what it registered before raising is
    dropped, the plugins loaded after it register, and their loading calls none of its hooks again."""
    monkeypatch.delenv("PRUNEKIT_STRICT_PLUGINS", raising=False)
    calls = []
    module = types.ModuleType("pk_raising")

    @hookimpl
    def prunekit_register_adapters(register) -> None:  # noqa: ANN001
        calls.append("adapters")
        register(ToyAdapter("toy_lost"))

    @hookimpl
    def prunekit_register_metrics(register) -> None:  # noqa: ANN001
        calls.append("metrics")
        raise RuntimeError("metric table is corrupt")

    module.prunekit_register_adapters = prunekit_register_adapters
    module.prunekit_register_metrics = prunekit_register_metrics
    reg = plugins_mod._registry()
    reg._load_one(name="raising", module_name="pk_raising", version=None, builtin=False, module=module)
    register_module(plugin_module("after", ToyAdapter("toy_after")), name="after")
    failure = next(f for f in load_failures() if f.name == "raising")
    assert "RuntimeError" in failure.error and "corrupt" in failure.error
    assert calls == ["adapters", "metrics"]
    assert "toy_lost" not in adapters() and select_adapter(ToyModel()).name == "toy_after"
    assert "raising" not in [p.name for p in plugins()]


def test_a_hook_without_the_hookimpl_marker_is_a_load_error() -> None:
    module = types.ModuleType("unmarked_plugin")

    def prunekit_register_adapters(register) -> None:  # noqa: ANN001 - no @hookimpl: the point
        register(ToyAdapter("toy"))

    module.prunekit_register_adapters = prunekit_register_adapters
    with pytest.raises(
        PluginError, match=r"unmarked_plugin.prunekit_register_adapters .*@prunekit_core.hookimpl"
    ):
        register_module(module, name="unmarked")
    assert "toy" not in adapters()


def test_builtins_are_entry_points_of_prunekit_core() -> None:
    """The built-ins are found through the entry-point group like any plugin, not imported by name."""
    eps = {ep.value: ep for ep in md.entry_points(group=plugins_mod.ENTRY_POINT_GROUP)}
    for module in plugins_mod.BUILTIN_MODULES:
        assert module in eps, f"{module} is not an entry point: reinstall prunekit-core (pip install -e .)"
        assert eps[module].dist is not None and eps[module].dist.name == "prunekit-core"


def test_a_builtin_without_its_entry_point_is_reported(monkeypatch) -> None:
    monkeypatch.delenv("PRUNEKIT_STRICT_PLUGINS", raising=False)
    real = md.entry_points
    gone = "prunekit_core.scoring.builtin_metrics"

    def without_metrics(**kwargs):  # noqa: ANN202
        return [ep for ep in real(**kwargs) if ep.value != gone]

    monkeypatch.setattr(plugins_mod.md, "entry_points", without_metrics)
    reset_plugins()
    failure = next(f for f in load_failures() if f.module == gone)
    assert "no entry point" in failure.error and "pip install -e ." in failure.error
    assert "metrics" not in [p.name for p in plugins()] and "adapters" in [p.name for p in plugins()]


# --- adapter choice ----------------------------------------------------------------------------------


def test_higher_score_wins() -> None:
    register_module(plugin_module("low", ToyAdapter("toy_low", 10)), name="low")
    register_module(plugin_module("high", ToyAdapter("toy_high", 100)), name="high")
    assert select_adapter(ToyModel()).name == "toy_high"


def test_tie_is_an_error_naming_both() -> None:
    register_module(plugin_module("first", ToyAdapter("toy_a")), name="plugin_one")
    register_module(plugin_module("second", ToyAdapter("toy_b")), name="plugin_two")
    with pytest.raises(AmbiguousAdapterError) as err:
        select_adapter(ToyModel())
    message = str(err.value)
    for name in ("toy_a", "toy_b", "plugin_one", "plugin_two", "ToyModel", "50"):
        assert name in message


def test_unknown_model_names_class_type_and_adapters() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        select_adapter(tiny_gpt2())
    message = str(err.value)
    assert "GPT2Model" in message and "'gpt2'" in message
    assert "llama" in message  # the installed adapters
    assert "pip install" in message  # and a hint
    assert err.value.model_class == "GPT2Model" and err.value.model_type == "gpt2"
    assert "llama" in err.value.installed


# --- name clashes ------------------------------------------------------------------------------------


def test_duplicate_adapter_name_across_plugins_is_rejected() -> None:
    register_module(plugin_module("one", ToyAdapter("toy")), name="one")
    with pytest.raises(PluginError, match="'toy' is already registered by one"):
        register_module(plugin_module("two", ToyAdapter("toy")), name="two")
    assert "two" not in [p.name for p in plugins()]


def test_duplicate_with_an_installed_plugin_is_rejected() -> None:
    with pytest.raises(PluginError, match="'llama' is already registered by llama"):
        register_module(plugin_module("impostor", ToyAdapter("llama")), name="impostor")
    assert type(adapters()["llama"]).__name__ == "LlamaFamilyAdapter"


def test_duplicate_within_one_plugin_is_rejected() -> None:
    with pytest.raises(PluginError, match="already registered by this plugin"):
        register_module(plugin_module("twice", ToyAdapter("toy"), ToyAdapter("toy")), name="twice")
    assert "toy" not in adapters()


def test_registering_a_non_adapter_is_rejected() -> None:
    with pytest.raises(PluginError, match="must be a ArchitectureAdapter"):
        register_module(plugin_module("wrong", object()), name="wrong")  # type: ignore[arg-type]  # wrong on purpose


def test_failed_strict_registration_unregisters_the_hooks() -> None:
    with pytest.raises(PluginError):
        register_module(plugin_module("twice", ToyAdapter("toy"), ToyAdapter("toy")), name="twice")
    # the failed module left no hook behind: a fresh registration works
    register_module(plugin_module("ok", ToyAdapter("toy")), name="ok")
    assert select_adapter(ToyModel()).name == "toy"


def test_builtin_catalogs_name_exactly_what_the_builtins_register() -> None:
    """``prunekit plugins`` lists the built-ins from BUILTIN_CATALOGS without importing them: the tables
    must match what a full load registers (checked here, not at load time, so a stale table fails this
    test instead of disabling the built-in metrics)."""
    from prunekit_core.registry.plugins import BUILTIN_CATALOGS, BUILTIN_MODULES, CATALOG_KEYS, plugins

    loaded = {p.module: p for p in plugins() if p.builtin}
    assert sorted(loaded) == sorted(BUILTIN_MODULES)
    for module, table in BUILTIN_CATALOGS.items():
        for key in CATALOG_KEYS:
            assert sorted(getattr(loaded[module], key)) == sorted(table.get(key, [])), (
                f"BUILTIN_CATALOGS[{module!r}][{key!r}] differs from what {module} registers"
            )
