"""Architecture adapters: the base classes plugins implement.

:class:`ArchitectureAdapter` is the whole contract. :class:`DecoderAdapter` implements the surgery steps
that every Hugging Face decoder-only model shares (``num_hidden_layers``, per-layer config lists, KV-cache
indices), so a family plugin only says where things are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..ir.errors import CalibrationError, PlanError
from ..ir.model import BranchOutput, ChannelGroup, ModelIR, Stage, Sublayer
from ..registry.plugins import registry_base

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is the root)."""
    return root.get_submodule(path) if path else root


def hf_model(model: nn.Module) -> PreTrainedModel:
    """``model`` as the Hugging Face model it is (``config``, ``get_input_embeddings``, ``save_pretrained``...).

    A view for the type checker only, no check at run time: torch types every attribute of an ``nn.Module``
    as ``Tensor | Module``, and prunekit passes models around as ``nn.Module``.
    """
    return cast("PreTrainedModel", model)


def module_attr(module: nn.Module, name: str) -> Any:
    """A plain attribute of ``module`` (an int, a config, a callable): not a parameter, buffer or submodule.

    torch types every attribute of an ``nn.Module`` it does not declare as ``Tensor | Module`` (the types
    its ``__getattr__`` returns); a plain attribute is neither, and its type is the model's own.
    """
    return getattr(module, name)


def module_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, a parameter, buffer or tensor attribute (``weight``, ``bias``, fused experts...)."""
    t = getattr(module, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(t).__name__}, not a tensor")
    return t


def hf_config(model: nn.Module) -> PreTrainedConfig:
    """``model.config``, typed as the Hugging Face config it is (see :func:`hf_model`)."""
    return hf_model(model).config


def iter_modules(container: nn.Module) -> Iterator[nn.Module]:
    """The modules of a ``ModuleList`` or ``Sequential`` typed as ``nn.Module`` (a block stack), in order.

    As iterating it does (a module that appears twice comes twice, unlike ``children()``); typed only.
    """
    return iter(cast("Iterable[nn.Module]", container))


def from_pretrained_with_info(cls: Any, source: Any, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``cls.from_pretrained(source, output_loading_info=True, **kwargs)``: the model and its loading info
    (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``...). transformers annotates the model alone."""
    model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    return model, info


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(root, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a forward pre-hook (``with_kwargs=True``) sees: the first positional argument, or
    ``hidden_states=``. Raises :class:`CalibrationError` when neither is a tensor."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    raise CalibrationError("could not find the hidden states among a hooked module's inputs")


def count_params(modules: Iterable[nn.Module]) -> int:
    """Unique parameters (shared tensors once) in ``modules``."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def cache_owner(module: nn.Module) -> nn.Module:
    """``module`` or the first module inside it with an integer ``layer_idx`` (``module`` if none has)."""
    for m in module.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool):
            return m
    return module


# --- what surgery hands to an adapter: the stand-in of a removed branch, the cuts of a width plan ---


class RemovedBranch(nn.Module):
    """Stands in for a removed residual branch: returns a zero that broadcasts against the stream.

    ``output="tuple"`` returns ``(zero, None)`` for branches whose callers unpack two values (Hugging Face
    attention modules); a bare tensor there would silently unpack along the batch dimension. ``full=True``
    returns zeros shaped like the input instead of a scalar, for callers that add into the branch output
    in place (``mlp_out += attn_out``), which a 0-d tensor cannot hold.
    """

    def __init__(
        self, kind: str, output: BranchOutput, norm_path: str | None = None, *, full: bool = False
    ) -> None:
        super().__init__()
        self.kind = kind
        self.output = output
        self.norm_path = norm_path
        self.full = full

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, None]:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise TypeError("RemovedBranch expects the hidden states as first argument or hidden_states=")
        zero = torch.zeros_like(x) if self.full else x.new_zeros(())
        return (zero, None) if self.output == "tuple" else zero

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, output={self.output!r}" + (", full=True" if self.full else "")


@dataclass(frozen=True)
class WidthCut:
    """Groups to remove from one family; ``sublayer`` is the unit that owns it (a stage for conv necks and
    projectors)."""

    family: ChannelGroup
    sublayer: Sublayer | Stage
    removed: tuple[int, ...]

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [i for i in range(self.family.count) if i not in gone]

    @property
    def removed_params(self) -> int:
        return len(self.removed) * self.family.params_per_group


@registry_base("adapters")
class ArchitectureAdapter(ABC):
    """Maps one family of models into the IR and performs its family-specific surgery steps.

    Subclasses set ``name`` (unique across plugins) and ``description``.
    """

    name: str = ""
    description: str = ""

    @abstractmethod
    def match(self, model: nn.Module) -> float | None:
        """How well this adapter fits ``model``: ``None`` for not at all, higher is better.

        Convention: 100 for an exact class match, 10 for a structural match (same module layout under
        another class name). Equal best scores from two adapters are an error.
        """

    @abstractmethod
    def build_ir(self, model: nn.Module) -> ModelIR:
        """Describe ``model`` (in its current state, pruned or not) as a :class:`ModelIR`."""

    def validate_removals(  # noqa: B027 - a hook with a deliberate no-op default
        self, model: nn.Module, ir: ModelIR, removed_blocks: set[str], removed_sublayers: set[str]
    ) -> None:
        """Raise :class:`PlanError` for removals this family cannot perform (default: all allowed)."""

    def calibration_inputs(
        self, model: nn.Module, windows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Calibration windows and further per-window model inputs that reach every tower.

        Default: the text windows alone. A multimodal adapter places image tokens in each window and
        returns the images (``{"pixel_values": ...}``, one per window), so calibration observes its vision
        tower too.
        """
        return windows, {}

    def finalize_width(  # noqa: B027 - a hook with a deliberate no-op default
        self, model: nn.Module, ir_before: ModelIR, cuts: dict[str, WidthCut]
    ) -> None:
        """Family-specific fix-ups after the core narrowed channel groups (default: none needed).

        The core has already sliced parameters, synced layer shapes, set declared counters and config
        fields; ``cuts`` maps family ids to :class:`WidthCut`.
        """

    @abstractmethod
    def finalize_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        """Update config fields and cache indices after the core removed blocks and branches.

        ``kept_blocks`` maps a tower name to the indices (in ``ir_before``) of the blocks that remain, in
        order. Branch stand-ins are already in place when this runs.
        """


class DecoderAdapter(ArchitectureAdapter):
    """Shared surgery for Hugging Face decoder-only models with a ``config.num_hidden_layers`` stack.

    It slices every per-layer config list (``layer_types`` and any list as long as the stack), remaps
    ``mlp_only_layers`` and ``max_window_layers``, and renumbers the ``layer_idx`` of every remaining
    cache-using sublayer densely in order, so the first cache slot always belongs to a live attention.
    """

    #: the tower whose blocks are counted by ``config.num_hidden_layers``
    text_tower: str = "text"

    def text_config(self, model: nn.Module) -> PreTrainedConfig:
        return hf_config(model).get_text_config(decoder=True)

    def validate_removals(
        self, model: nn.Module, ir: ModelIR, removed_blocks: set[str], removed_sublayers: set[str]
    ) -> None:
        live_cache = [
            s for b in ir.blocks() if b.id not in removed_blocks for s in b.sublayers if s.uses_cache
        ]
        if live_cache and all(s.id in removed_sublayers for s in live_cache):
            raise PlanError(
                f"the plan removes every attention sublayer of the blocks it keeps ({len(live_cache)}): cached "
                "generation reads token positions from the KV cache, which no layer would fill any more. "
                "Keep at least one attention (a smaller --ratio), or remove whole blocks (--granularity block)."
            )
        config = self.text_config(model)
        layer_types: Sequence[str] | None = getattr(config, "layer_types", None)
        cache_sublayers = [s for s in ir.sublayers() if s.uses_cache and s.id in removed_sublayers]
        if cache_sublayers and layer_types is not None and len(set(layer_types)) > 1:
            raise PlanError(
                f"removing attention sublayers ({cache_sublayers[0].id}, ...) from a model with mixed "
                f"layer types {sorted(set(layer_types))} is not supported: the KV cache slots would change "
                "type. Remove whole blocks instead (--granularity block)."
            )

    def finalize_width(self, model: nn.Module, ir_before: ModelIR, cuts: dict[str, WidthCut]) -> None:
        """Pin ``head_dim`` in the config: derived from ``hidden_size // num_attention_heads`` otherwise."""
        config = self.text_config(model)
        if getattr(config, "head_dim", None) is not None:
            return
        for cut in cuts.values():
            head_dim = getattr(get_module(model, cut.sublayer.module), "head_dim", None)
            if cut.family.kind == "kv_group" and isinstance(head_dim, int):
                config.head_dim = head_dim
                return

    def finalize_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        kept = kept_blocks[self.text_tower]
        config = self.text_config(model)
        old_n = config.num_hidden_layers
        for key, value in list(vars(config).items()):
            if key.startswith("_"):
                continue
            if isinstance(value, (list, tuple)) and len(value) == old_n and key not in {"mlp_only_layers"}:
                setattr(config, key, type(value)(value[i] for i in kept))
        if getattr(config, "mlp_only_layers", None):
            remap = {old: new for new, old in enumerate(kept)}
            config.mlp_only_layers = [remap[i] for i in config.mlp_only_layers if i in remap]
        mwl = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int):
            config.max_window_layers = sum(1 for i in kept if i < mwl)
        config.num_hidden_layers = len(kept)
        top = hf_config(model)
        if config is not top and hasattr(top, "num_hidden_layers"):
            top.num_hidden_layers = len(kept)
        self.renumber_cache_indices(model)

    def cache_modules(self, model: nn.Module) -> list[nn.Module]:
        """Live modules that own a KV-cache slot, in forward order (after surgery).

        The slot belongs to the cache-using sublayer's module, or to the first module inside it that
        carries a ``layer_idx`` (a branch whose attention sits one level down).
        """
        ir = self.build_ir(model)
        return [cache_owner(get_module(model, s.module)) for s in ir.sublayers() if s.uses_cache]

    def renumber_cache_indices(self, model: nn.Module) -> None:
        for new_idx, module in enumerate(self.cache_modules(model)):
            if not hasattr(module, "layer_idx"):
                raise PlanError(f"{type(module).__name__} has no layer_idx; the adapter must renumber it")
            # torch types Module.__setattr__'s value as Tensor | Module; layer_idx is a plain int attribute
            module.layer_idx = new_idx  # type: ignore[assignment]  # see the line above
