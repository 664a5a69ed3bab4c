"""Composing a model's IR from sub-models that other adapters describe (multimodal models).

A vision-language model holds a language model that some installed adapter already knows (a Llama, a
Qwen2, a Mixtral). A multimodal plugin must not repeat that knowledge: it maps the language model through
:func:`map_submodel`, which presents the sub-module to the plugin registry as a causal LM
(:class:`CausalLMView`: the backbone as ``.model`` and the outer head as ``.lm_head``, sharing every
parameter, copying nothing), lets the best-matching adapter describe it, and re-prefixes the result: module
paths move under the sub-module's path in the outer model, unit ids under the tower name chosen by the
caller (``text.blocks.5``).

:class:`ComposedAdapter` is the base class for such plugins: it assembles the towers it describes itself
with the towers of its mapped sub-models, and hands each sub-model's share of a surgery (validation,
config and cache-index updates, width fix-ups) to the sub-model's own adapter, in the sub-model's own
terms.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from torch import nn

from ..ir.errors import PlanError, UnsupportedModelError
from ..ir.model import Connection, ModelIR, Tower
from .base import ArchitectureAdapter, WidthCut, count_params, get_module, hf_config, hf_model

__all__ = ["CausalLMView", "ComposedAdapter", "MappedSubmodel", "map_submodel"]

_PATH_KEYS = frozenset({"module", "norm", "param", "blocks_path", "final_norm", "head", "out_proj", "router"})
_PATH_LIST_KEYS = frozenset({"parts", "counters"})  # TopK.counters are paths; ModuleCounter dicts recurse
_ID_KEYS = frozenset({"id", "tied_to", "stream", "name"})

T = TypeVar("T", bound=BaseModel)


class CausalLMView(nn.Module):
    """A language-model backbone inside a larger model, shown as a causal LM without copying anything.

    ``view.model`` is the backbone (e.g. ``LlavaModel.language_model``), ``view.lm_head`` the outer
    model's head, ``view.config`` the backbone's config. Both are the outer model's own modules, so
    surgery through the view (or through the outer model) changes both.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, config: Any) -> None:
        super().__init__()
        self.model = backbone
        if head is not None:
            self.lm_head = head
        self.config = config

    def get_input_embeddings(self) -> nn.Module:
        return hf_model(self.model).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - adapters never run it
        raise RuntimeError("CausalLMView only describes a sub-model; run the outer model instead")


@dataclass
class MappedSubmodel:
    """A sub-model described by another adapter, with the maps between its terms and the outer model's.

    ``paths`` maps each child name of ``view`` to that module's dotted path in the outer model;
    ``towers`` maps each tower name of the adapter's IR to its name in the outer IR.
    """

    adapter: ArchitectureAdapter
    view: nn.Module
    paths: dict[str, str]
    towers: dict[str, str] = field(default_factory=dict)

    # terms ---------------------------------------------------------------------------------------------

    def path_out(self, path: str) -> str:
        head, _, rest = path.partition(".")
        if head not in self.paths:
            raise KeyError(f"{path!r} is not under the mapped sub-model ({sorted(self.paths)})")
        base = self.paths[head]
        return f"{base}.{rest}" if rest else base

    def path_in(self, path: str) -> str:
        for child, base in sorted(self.paths.items(), key=lambda kv: -len(kv[1])):
            if path == base:
                return child
            if path.startswith(base + "."):
                return child + path[len(base) :]
        raise KeyError(f"{path!r} is not under the mapped sub-model ({sorted(self.paths.values())})")

    def id_out(self, unit: str) -> str:
        return _rename(unit, self.towers)

    def id_in(self, unit: str) -> str:
        return _rename(unit, {v: k for k, v in self.towers.items()})

    def owns(self, unit: str) -> bool:
        """Whether outer unit id ``unit`` belongs to one of this sub-model's towers."""
        return any(unit == t or unit.startswith(t + ".") for t in self.towers.values())

    def to_outer(self, obj: T) -> T:
        """An IR object (tower, sublayer, channel group, ...) in the outer model's paths and ids."""
        return _rebase(obj, self.path_out, self.id_out)

    def to_inner(self, obj: T) -> T:
        """An IR object of the outer model in the sub-model's own paths and ids."""
        return _rebase(obj, self.path_in, self.id_in)

    # IR ------------------------------------------------------------------------------------------------

    def inner_ir(self) -> ModelIR:
        """The sub-model as its adapter describes it (its own paths and ids)."""
        return self.adapter.build_ir(self.view)

    def outer_towers(self) -> tuple[Tower, ...]:
        """The sub-model's towers in the outer model's paths and ids."""
        return tuple(self.to_outer(t) for t in self.inner_ir().towers)

    def inner_ir_from(self, outer: ModelIR) -> ModelIR:
        """The part of an outer IR (e.g. ``ir_before`` of a surgery) that is this sub-model, in its terms."""
        towers = tuple(self.to_inner(t) for t in outer.towers if t.name in self.towers.values())
        return ModelIR(
            architecture=type(self.view).__name__,
            model_type=str(getattr(self.view.config, "model_type", "")),
            adapter=self.adapter.name,
            towers=towers,
            total_params=count_params([self.view]),
        )


def _rename(unit: str, names: Mapping[str, str]) -> str:
    for old, new in names.items():
        if unit == old:
            return new
        if unit.startswith(old + "."):
            return new + unit[len(old) :]
    return unit


def _rebase(obj: T, path: Any, ident: Any) -> T:
    def walk(key: str | None, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(k, v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            if key in _PATH_LIST_KEYS:
                return [path(v) if isinstance(v, str) else walk(None, v) for v in value]
            return [walk(None, v) for v in value]
        if isinstance(value, str):
            if key in _PATH_KEYS:
                return path(value)
            if key in _ID_KEYS:
                return ident(value)
        return value

    return type(obj).model_validate(walk(None, obj.model_dump()))


def map_submodel(
    model: nn.Module,
    backbone: str,
    *,
    prefix: str,
    head: str | None = None,
    config: Any = None,
) -> MappedSubmodel:
    """Describe the language model at ``backbone`` inside ``model`` with the best installed adapter.

    ``head`` is the dotted path of its output head in ``model`` (``"lm_head"``), ``config`` its config
    (default: ``model.config.get_text_config(decoder=True)``). The sub-model's single tower becomes tower
    ``prefix`` (several towers become ``prefix_NAME``). Raises :class:`UnsupportedModelError` naming the
    backbone's class when no installed adapter describes it.
    """
    from ..registry.plugins import select_adapter

    config = config if config is not None else hf_config(model).get_text_config(decoder=True)
    view = CausalLMView(get_module(model, backbone), get_module(model, head) if head else None, config)
    try:
        adapter = select_adapter(view)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            model_class=type(get_module(model, backbone)).__name__,
            model_type=getattr(config, "model_type", None),
            installed=exc.installed,
            failures=exc.failures,
        ) from exc
    paths = {"model": backbone, **({"lm_head": head} if head else {})}
    inner = adapter.build_ir(view)
    names = [t.name for t in inner.towers]
    towers = {names[0]: prefix} if len(names) == 1 else {n: f"{prefix}_{n}" for n in names}
    return MappedSubmodel(adapter=adapter, view=view, paths=paths, towers=towers)


class ComposedAdapter(ArchitectureAdapter):
    """An adapter whose IR joins towers it describes itself with sub-models other adapters describe.

    Subclasses implement :meth:`submodels` (usually one :func:`map_submodel` for the language model),
    :meth:`own_towers`, :meth:`connections`, and the surgery steps of their own towers
    (:meth:`finalize_own_surgery`, optionally :meth:`validate_own_removals`). Everything inside a mapped
    sub-model is handed to that sub-model's adapter, which sees only its own terms.
    """

    #: the tower whose blocks ``text_config(model).num_hidden_layers`` counts
    text_tower: str = "text"

    def text_config(self, model: nn.Module) -> Any:
        return hf_config(model).get_text_config(decoder=True)

    @abstractmethod
    def submodels(self, model: nn.Module) -> list[MappedSubmodel]:
        """The sub-models another adapter describes (fresh views of the model as it is now)."""

    @abstractmethod
    def own_towers(self, model: nn.Module) -> list[Tower]:
        """The towers this adapter describes itself, in forward order before the sub-models' towers."""

    def connections(self, model: nn.Module) -> list[Connection]:
        """How the towers feed each other (default: none declared)."""
        return []

    def tower_configs(self, model: nn.Module) -> dict[str, Any]:
        """Config objects whose ``num_hidden_layers`` counts each tower's blocks (tower name -> config)."""
        return {self.text_tower: self.text_config(model)}

    def validate_own_removals(  # noqa: B027 - a hook with a deliberate no-op default
        self, model: nn.Module, ir: ModelIR, removed_blocks: set[str], removed_sublayers: set[str]
    ) -> None:
        """Raise :class:`PlanError` for removals in the own towers that cannot be done."""

    @abstractmethod
    def finalize_own_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        """Config fields of the own towers after their blocks were removed (``kept_blocks`` by tower)."""

    # the composition -------------------------------------------------------------------------------------

    def build_ir(self, model: nn.Module) -> ModelIR:
        towers = list(self.own_towers(model))
        for sub in self.submodels(model):
            towers.extend(sub.outer_towers())
        config = model.config
        return ModelIR(
            architecture=type(model).__name__,
            model_type=str(getattr(config, "model_type", "")),
            adapter=self.name,
            towers=tuple(towers),
            connections=tuple(self.connections(model)),
            total_params=count_params([model]),
        )

    def validate_removals(
        self, model: nn.Module, ir: ModelIR, removed_blocks: set[str], removed_sublayers: set[str]
    ) -> None:
        own_blocks, own_subs = set(removed_blocks), set(removed_sublayers)
        for sub in self.submodels(model):
            blocks = {u for u in removed_blocks if sub.owns(u)}
            subs = {u for u in removed_sublayers if sub.owns(u)}
            own_blocks -= blocks
            own_subs -= subs
            sub.adapter.validate_removals(
                sub.view,
                sub.inner_ir_from(ir),
                {sub.id_in(u) for u in blocks},
                {sub.id_in(u) for u in subs},
            )
        self.validate_own_removals(model, ir, own_blocks, own_subs)

    def finalize_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        own = dict(kept_blocks)
        for sub in self.submodels(model):
            inner_kept = {inner: own.pop(outer) for inner, outer in sub.towers.items() if outer in own}
            sub.adapter.finalize_surgery(sub.view, sub.inner_ir_from(ir_before), inner_kept)
        self.finalize_own_surgery(model, ir_before, own)

    def finalize_width(self, model: nn.Module, ir_before: ModelIR, cuts: dict[str, WidthCut]) -> None:
        rest = dict(cuts)
        for sub in self.submodels(model):
            mine = {fid: cut for fid, cut in cuts.items() if sub.owns(fid)}
            for fid in mine:
                rest.pop(fid)
            if not mine:
                continue
            inner_cuts = {
                sub.id_in(fid): WidthCut(sub.to_inner(cut.family), sub.to_inner(cut.sublayer), cut.removed)
                for fid, cut in mine.items()
            }
            sub.adapter.finalize_width(sub.view, sub.inner_ir_from(ir_before), inner_cuts)
        if rest:
            raise PlanError(
                f"{self.name} declares no width surgery for {sorted(rest)[:3]}; narrow the language model only"
            )
