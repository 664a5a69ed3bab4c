"""``prunekit new-plugin``: write a working skeleton plugin distribution for one model family.

The skeleton is filled in, not left blank: it builds a tiny random model of the given transformers class,
lets the generic adapter discover its layout (blocks, branches, pre-norms, stages), and writes that down
as a :class:`~prunekit_core.adapters.declared.DeclaredDecoderAdapter`, so the new plugin passes the conformance
suite as written and its author starts from a table to refine (channel groups for width pruning, other
block kinds) rather than from nothing.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..adapters.declared import BranchSpec, LayoutSpec
from ..ir.errors import PrunekitError, UnsupportedPatternError
from .atomic import write_text

__all__ = ["ScaffoldError", "Skeleton", "new_plugin", "tiny_config_kwargs"]

#: the tiny model the skeleton's conformance test builds (names mapped to each config's own spelling)
TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ScaffoldError(PrunekitError):
    """``new-plugin`` cannot write the skeleton (bad name, unknown class, target exists, ...)."""


@dataclass(frozen=True)
class Skeleton:
    """What ``new_plugin`` wrote."""

    path: Path
    files: list[str]
    distribution: str
    package: str
    adapter_class: str
    model_class: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": self.files,
            "distribution": self.distribution,
            "package": self.package,
            "adapter_class": self.adapter_class,
            "model_class": self.model_class,
        }


def tiny_config_kwargs(config_cls: type[Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`TINY` in ``config_cls``'s own argument names (``n_embd`` for GPT-2), plus ``overrides``."""
    params = inspect.signature(config_cls.__init__).parameters
    aliases = getattr(config_cls, "attribute_map", {}) or {}
    out: dict[str, Any] = {}
    for key, value in TINY.items():
        for name in (key, aliases.get(key)):
            if name and name in params:
                out[name] = value
                break
    out.update(overrides or {})
    return out


def new_plugin(
    name: str,
    *,
    model_class: str,
    out: str | Path | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
) -> Skeleton:
    """Write the skeleton distribution ``prunekit-NAME`` for ``model_class`` into ``out``.

    ``config`` overrides fields of the tiny test model's config (e.g. ``{"rotary_dim": 8}``). Raises
    :class:`ScaffoldError` for a bad name, an unknown class, a model the generic adapter cannot read, or
    an existing non-empty ``out`` (unless ``force``).
    """
    import torch
    import transformers

    from ..adapters.generic import discover_layout

    if not _NAME.match(name):
        raise ScaffoldError(
            f"plugin name {name!r} must be a lowercase Python identifier (letters, digits, _), e.g. 'gptj'"
        )
    model_cls = getattr(transformers, model_class, None)
    if not isinstance(model_cls, type):
        known = [n for n in dir(transformers) if n.endswith("ForCausalLM") or n.endswith("LMHeadModel")]
        close = difflib.get_close_matches(model_class, known, n=3)
        raise ScaffoldError(
            f"transformers has no model class {model_class!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " Pass --model-class with a causal-LM class name, e.g. GPTJForCausalLM."
        )
    target = Path(out) if out is not None else Path(f"prunekit-{name.replace('_', '-')}")
    if target.exists() and any(target.iterdir()) and not force:
        raise ScaffoldError(f"{target} exists and is not empty; choose another --out or pass --force")
    # any transformers class passes the check above; a model class names its config class
    config_cls: type[Any] = model_cls.config_class  # type: ignore[attr-defined]  # see the line above
    kwargs = tiny_config_kwargs(config_cls, config)
    try:
        torch.manual_seed(0)
        model = model_cls(config_cls(**kwargs)).eval()
    except Exception as exc:
        raise ScaffoldError(
            f"could not build a tiny {model_class} from {kwargs}: {type(exc).__name__}: {exc}. "
            "Fix the config with --config KEY=VALUE."
        ) from exc
    try:
        layout, found = discover_layout(model)
    except UnsupportedPatternError as exc:
        raise ScaffoldError(
            f"new-plugin writes its tables from what the generic adapter discovers, and {exc.pattern}; so "
            f"the {name} plugin must be declared by hand: copy examples/prunekit-gptj, set model_classes, "
            "layout and branches (a BranchSpec per branch, docs/plugins/writing-a-plugin.md, section 2) and "
            "run its conformance test"
        ) from exc
    tables = {tuple(spec for spec, _ in block) for block in found}
    if len(tables) != 1:
        raise ScaffoldError(
            f"the blocks of {model_class} hold different branches ({len(tables)} kinds of block); the "
            "skeleton declares one table for all: write block_branches() by hand (see "
            "docs/plugins/writing-a-plugin.md)"
        )
    (branches,) = tables
    branches, kwargs = _named_scales(model_cls, config_cls, kwargs, branches)
    package = f"prunekit_{name}"
    adapter_class = "".join(p.capitalize() for p in name.split("_")) + "Adapter"
    files = {
        "pyproject.toml": _pyproject(name, package, model_class),
        "README.md": _readme(name, package, model_class),
        f"{package}/__init__.py": _init(name, package, adapter_class, model_class),
        f"{package}/plugin.py": _plugin(name, adapter_class),
        f"{package}/adapter.py": _adapter(name, adapter_class, model_class, layout, branches),
        "tests/conftest.py": _CONFTEST,
        f"tests/test_{name}_conformance.py": _test(
            name, package, adapter_class, model_class, config_cls.__name__, kwargs
        ),
    }
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    return Skeleton(
        path=target,
        files=sorted(files),
        distribution=f"prunekit-{name.replace('_', '-')}",
        package=package,
        adapter_class=adapter_class,
        model_class=model_class,
    )


def _named_scales(
    model_cls: type[Any], config_cls: type[Any], kwargs: dict[str, Any], branches: tuple[BranchSpec, ...]
) -> tuple[tuple[BranchSpec, ...], dict[str, Any]]:
    """``branches`` with each constant multiplier (``scale``, Granite's ``residual_multiplier``) named by
    the config field that holds it, so the plugin reads a real model's value rather than the tiny one's.

    The fields holding the value are found by building the tiny model again with each candidate field
    (a float config field equal to a discovered scale) set to a distinct value and discovering it again:
    the field whose value then appears is the multiplier. A scale no field explains stays a number. The
    tiny test model keeps the probe value of each named field, so the conformance kit checks that the
    plugin reads it (a multiplier of 1 would pass unread).
    """
    import dataclasses

    import torch

    from ..adapters.generic import discover_layout

    scales = {b.scale for b in branches if isinstance(b.scale, float)}
    if not scales:
        return branches, kwargs
    text = config_cls(**kwargs).get_text_config(decoder=True)
    fields_ = [
        k for k, v in vars(text).items() if isinstance(v, float) and v in scales and not k.startswith("_")
    ]
    probe = {k: 1.0 + (i + 1) / 64 for i, k in enumerate(fields_)}  # distinct, exact in binary
    try:
        torch.manual_seed(0)
        probed = model_cls(config_cls(**{**kwargs, **probe})).eval()
        (found, *_rest) = discover_layout(probed)[1]
    except Exception:  # noqa: BLE001 - a config that refuses the probe values keeps the numbers
        return branches, kwargs
    by_value = {v: k for k, v in probe.items()}
    out = []
    for spec, (seen, _type) in zip(branches, found, strict=True):
        name = by_value.get(seen.scale) if isinstance(seen.scale, float) else None
        out.append(dataclasses.replace(spec, scale=name) if name else spec)
    named = {b.scale for b in out if isinstance(b.scale, str)}
    return tuple(out), {**kwargs, **{k: v for k, v in probe.items() if k in named}}


# --- templates ---------------------------------------------------------------------------------------


def _q(value: Any) -> str:
    """A Python literal with double quotes (what ruff format writes)."""
    if isinstance(value, tuple):
        inner = ", ".join(_q(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _call(cls: str, obj: Any, indent: str) -> str:
    defaults = {f.name: f.default for f in fields(type(obj))}
    args = [
        f"{f.name}={_q(getattr(obj, f.name))}"
        for f in fields(type(obj))
        if getattr(obj, f.name) != defaults[f.name] or f.name in ("name", "kind", "module", "blocks", "embed")
    ]
    one = f"{cls}({', '.join(args)})"
    if len(indent) + len(one) + 1 <= 110:
        return one
    inner = "".join(f"{indent}    {a},\n" for a in args)
    return f"{cls}(\n{inner}{indent})"


def _pyproject(name: str, package: str, model_class: str) -> str:
    dist = f"prunekit-{name.replace('_', '-')}"
    return f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "prunekit architecture plugin: {model_class}"
requires-python = ">=3.10"
dependencies = ["prunekit-core>=0.1.0", "transformers>=5.24,<6"]

[project.entry-points.prunekit]
{name} = "{package}.plugin"

[tool.setuptools.packages.find]
include = ["{package}*"]
"""


def _readme(name: str, package: str, model_class: str) -> str:
    dist = f"prunekit-{name.replace('_', '-')}"
    return f"""# {dist}

A prunekit architecture plugin for `{model_class}`, written by `prunekit new-plugin {name}`.

    pip install -e .            # registers the adapter through the `prunekit` entry point
    prunekit plugins            # lists it
    prunekit inspect MODEL      # a {model_class} is now described by adapter `{name}` (score 100)
    pytest tests                # the prunekit conformance suite on a tiny random {model_class}

`{package}/adapter.py` declares where the blocks and branches are; it was filled in from the structure
prunekit's generic adapter discovered. To add width pruning, give a branch channel-group factories
(`groups=`, see prunekit's docs/plugins/writing-a-plugin.md).
"""


def _init(name: str, package: str, adapter_class: str, model_class: str) -> str:
    return f'''"""prunekit plugin for {model_class} (package {package})."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import {adapter_class}

__all__ = ["{adapter_class}"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the adapter on first use: `prunekit plugins` imports this package without torch."""
    if name == "{adapter_class}":
        from .adapter import {adapter_class}

        return {adapter_class}
    raise AttributeError(f"module {{__name__!r}} has no attribute {{name!r}}")
'''


def _plugin(name: str, adapter_class: str) -> str:
    return f'''"""Entry point module: registers the adapter with prunekit.

Its top imports nothing heavy (the adapter is imported inside the hook), so `prunekit plugins` lists the
plugin from its catalog without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit_core import hookimpl


@hookimpl
def prunekit_catalog() -> dict[str, list[str]]:
    return {{"adapters": ["{name}"]}}


@hookimpl
def prunekit_register_adapters(register: Callable[[Any], Any]) -> None:
    from .adapter import {adapter_class}

    register({adapter_class}())
'''


def _adapter(
    name: str, adapter_class: str, model_class: str, layout: LayoutSpec, branches: tuple[BranchSpec, ...]
) -> str:
    specs = "".join(f"        {_call('BranchSpec', b, '        ')},\n" for b in branches)
    return f'''"""The {name} adapter: where a {model_class}'s blocks, branches and stages are.

Written by `prunekit new-plugin` from the structure the generic adapter discovered in a tiny {model_class}.
Branches with the same ``edge`` are added to the same stream value (parallel attention and MLP).
"""

from __future__ import annotations

from prunekit_core import BranchSpec, DeclaredDecoderAdapter, LayoutSpec


class {adapter_class}(DeclaredDecoderAdapter):
    name = "{name}"
    description = "{model_class} (block and sublayer pruning)"
    model_classes = ("{model_class}",)
    layout = {_call("LayoutSpec", layout, "    ")}
    branches = (
{specs}    )
'''


def _test(
    name: str, package: str, adapter_class: str, model_class: str, config_class: str, kwargs: dict[str, Any]
) -> str:
    tiny = "".join(f"    {_q(k)}: {_q(v)},\n" for k, v in kwargs.items())
    camel = adapter_class.removesuffix("Adapter")
    return f'''"""The prunekit conformance suite on a tiny random {model_class}."""

from __future__ import annotations

import torch
from {package} import {adapter_class}
from transformers import {config_class}, {model_class}

from prunekit_core.testing import AdapterConformance

TINY = {{
{tiny}}}


class Test{camel}(AdapterConformance):
    adapter = {adapter_class}()
    #: what the adapter supports (prunekit_core.testing.CAPABILITIES): the kit runs these checks and fails
    #: if the adapter's IR shows a capability not named here, or lacks one that is; add "width" once
    #: a branch declares channel groups (groups=)
    capabilities = {{"depth", "sublayers"}}
    #: checks this adapter knowingly does not pass, as {{"test_name": "why"}} (run as strict xfails)
    expected_failures: dict[str, str] = {{}}

    def make_model(self) -> {model_class}:
        torch.manual_seed(0)
        return {model_class}({config_class}(**TINY)).eval()
'''


_CONFTEST = '''"""Tiny models run many times faster on one thread."""

import torch

torch.set_num_threads(1)
'''
