"""Width surgery: narrow sublayers by removing channel groups declared in the IR.

A plugin declares, per sublayer, *families* of coupled channel groups (:class:`~prunekit_core.ir.model.ChannelGroup`):
the KV groups of an attention (a KV head with its query heads), the channels of an FFN, the channels inside
an expert. Group ``i`` of a family owns the slice ``[offset + i*width, offset + (i+1)*width)`` of every member
parameter along the member's axis. Removing groups slices every member, so the narrowed sublayer computes
exactly what the full one computes with those groups' contributions zeroed.

The core does all of it from the IR alone: it slices the parameters, updates ``nn.Linear`` / ``nn.Conv*``
feature counts from the new shapes, sets the module counters the family declares, and sets the config
fields the family declares (``num_key_value_heads``, ``intermediate_size``, ...). When every family that
names a config field keeps the same count, the config describes the model exactly and plain
``from_pretrained`` reloads it; otherwise the field gets the largest count and the checkpoint's structure
record carries the per-module shapes for :func:`~prunekit_core.load_pruned`.

Stages that are not on a residual edge (a conv neck, a conv projector) declare families too
(``Stage.channel_groups``): a conv's out-channels with the norm features and next layers' in-channels they
reach. They are narrowed the same way but never removed; where a norm over the channels sits between two
layers, the narrowed model is not the zeroed one (the norm's statistics change) but the same network at the
narrower width. A family's config fields live in the config ``ChannelGroup.config`` names (the text config
by default, e.g. ``vision_config`` for a conv neck).
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from ..adapters.base import ArchitectureAdapter, WidthCut, get_module, hf_model
from ..ir.errors import PlanError
from ..ir.model import ChannelGroup, GroupMember, ModelIR, Stage, Sublayer

TopKPolicy = Literal["error", "clamp"]
_GROUP_NOUN = {"kv_group": "head", "expert": "expert"}

log = logging.getLogger(__name__)


def width_families(ir: ModelIR) -> dict[str, tuple[Sublayer, ChannelGroup]]:
    """Channel-group families the width planners narrow: all but routed ones (experts have their own)."""
    return {fid: v for fid, v in ir.channel_groups().items() if not v[1].router}


def routed_families(ir: ModelIR) -> dict[str, tuple[Sublayer, ChannelGroup]]:
    """Routed families (MoE experts): removing group ``i`` equals forcing its router logit to -inf."""
    return {fid: v for fid, v in ir.channel_groups().items() if v[1].router}


def _block_of(ir: ModelIR, sub_id: str) -> str:
    for b in ir.blocks():
        if any(s.id == sub_id for s in b.sublayers):
            return b.id
    raise KeyError(sub_id)


def resolve_width(
    ir: ModelIR,
    remove_groups: Mapping[str, list[int]],
    *,
    removed_units: frozenset[str] | set[str] = frozenset(),
    top_k_policy: TopKPolicy = "error",
) -> dict[str, WidthCut]:
    """Validate a plan's width part against ``ir``: known families, valid distinct indices, something left.

    ``removed_units`` are the blocks and sublayers the same plan removes whole; narrowing one of them is
    an error (the plan would remove the same parameters twice). A routed family (experts) must keep at
    least ``top_k`` groups unless ``top_k_policy`` is ``"clamp"``.
    """
    families = ir.all_channel_groups()
    cuts: dict[str, WidthCut] = {}
    for fid, indices in remove_groups.items():
        if fid not in families:
            hint = difflib.get_close_matches(fid, list(families), n=1)
            raise PlanError(
                f"unknown channel-group family {fid!r} for this model"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + ". Run `prunekit inspect MODEL` to list channel groups."
            )
        sub, fam = families[fid]
        if not indices:
            continue
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < fam.count]
        if bad:
            raise PlanError(f"{fid} has {fam.count} groups (0..{fam.count - 1}); the plan names {bad[:5]}")
        if len(set(indices)) != len(indices):
            raise PlanError(f"the plan lists groups of {fid} more than once")
        if len(indices) >= fam.count and isinstance(sub, Stage):
            raise PlanError(
                f"the plan removes all {fam.count} channels of {fid}: {sub.id} is not on a residual edge, so "
                "it cannot be removed (the next layer reads its output directly); keep at least one channel"
            )
        if len(indices) >= fam.count:
            raise PlanError(
                f"the plan removes all {fam.count} groups of {fid}, which would leave {sub.id} with no "
                f"{_GROUP_NOUN.get(fam.kind, 'channel')}; remove the sublayer instead "
                f"(add {sub.id!r} to remove)"
            )
        live = fam.count - len(indices)
        if live % fam.multiple_of:
            raise PlanError(
                f"{fid} must keep a multiple of {fam.multiple_of} groups (the plugin declares that alignment "
                f"for its kernels); the plan keeps {live}. Remove {live % fam.multiple_of} more or "
                f"{fam.multiple_of - live % fam.multiple_of} fewer"
            )
        if fam.top_k is not None and live < fam.top_k.value and top_k_policy != "clamp":
            raise PlanError(
                f"the plan leaves {live} of {fam.count} {_GROUP_NOUN.get(fam.kind, 'group')}s in {fid}, fewer "
                f"than the top_k={fam.top_k.value} its router picks per token. Remove fewer, or say how to "
                "handle it: top_k_policy='clamp' (CLI: --top-k clamp) lowers top_k to the number left"
            )
        if isinstance(sub, Sublayer) and (sub.id in removed_units or _block_of(ir, sub.id) in removed_units):
            raise PlanError(f"the plan both removes {sub.id} (or its block) and narrows it ({fid})")
        cuts[fid] = WidthCut(fam, sub, tuple(sorted(indices)))
    return cuts


def member_index(member: GroupMember, count: int, kept: list[int], size: int) -> torch.Tensor:
    """Indices along ``member.axis`` that survive when only groups ``kept`` (of ``count``) remain."""
    gone = set(removed_positions(member, count, kept, size))
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def removed_positions(member: GroupMember, count: int, kept: list[int], size: int) -> list[int]:
    """Positions along ``member.axis`` that the removed groups (those not in ``kept``) own."""
    span = member.offset + count * member.width
    if span > size:
        raise PlanError(
            f"{member.param}: {count} groups of width {member.width} at offset {member.offset} need {span} "
            f"entries along axis {member.axis}, the tensor has {size}; the plugin's IR is wrong"
        )
    keep = set(kept)
    out: list[int] = []
    for g in range(count):
        if g not in keep:
            start = member.offset + g * member.width
            out.extend(range(start, start + member.width))
    return out


def width_removed_params(model: nn.Module, cuts: Mapping[str, WidthCut]) -> int:
    """Parameters that width surgery removes from ``model`` for ``cuts``, each counted once.

    ``WidthCut.removed_params`` counts a family alone. Two families that slice one tensor along different
    axes (a conv's out-channels and, through the previous conv, its in-channels; experts and the channels
    inside them) share the crossing of their slices, which a plain sum counts twice. Here every tensor
    keeps ``prod(size - removed)`` over its axes. Buffers (BatchNorm statistics) are not parameters.
    """
    params = dict(model.named_parameters())
    gone: dict[str, dict[int, set[int]]] = {}
    for cut in cuts.values():
        for m in cut.family.members:
            if m.param not in params:
                continue  # a buffer
            size = params[m.param].shape[m.axis]
            axis = gone.setdefault(m.param, {}).setdefault(m.axis, set())
            axis.update(removed_positions(m, cut.family.count, list(cut.kept), size))
    total = 0
    for name, axes in gone.items():
        kept = 1
        for a, size in enumerate(params[name].shape):
            kept *= size - len(axes.get(a, ()))
        total += params[name].numel() - kept
    return total


def split_param(path: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``: the module path and the tensor's name in it."""
    module, _, leaf = path.rpartition(".")
    return module, leaf


def group_slices(model: nn.Module, fam: ChannelGroup) -> list[tuple[GroupMember, torch.Tensor]]:
    """Every member tensor of ``fam`` as it is now (no copy)."""
    out = []
    for m in fam.members:
        module, leaf = split_param(m.param)
        out.append((m, getattr(get_module(model, module), leaf)))
    return out


def set_tensor(module: nn.Module, leaf: str, new: torch.Tensor) -> None:
    """Replace a parameter (keeping ``requires_grad``) or a buffer (a BatchNorm's running statistics)."""
    old = getattr(module, leaf)
    if isinstance(old, nn.Parameter):
        setattr(module, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[leaf] = new


def sync_module_shape(module: nn.Module) -> None:
    """Make a layer's feature counters agree with its (sliced) weight.

    A depthwise conv (``groups == in_channels == out_channels``) stays depthwise: its group count follows
    its channels.
    """
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.GroupNorm):
            module.num_channels = module.weight.shape[0]
        else:
            module.num_features = module.weight.shape[0]


#: a config field: (the config that holds it, its name); the config is "text" or a path from model.config
ConfigKey = tuple[str, str]


def _config_targets(
    ir: ModelIR, cuts: Mapping[str, WidthCut], skip: frozenset[str] | set[str]
) -> dict[ConfigKey, list[int | None]]:
    """For each declared config field: the value every live family implies after the cuts.

    ``None`` stands for a value the config cannot hold (a count its divisor does not divide, or a cut
    family no config field counts), which makes the result need ``load_pruned``.
    """
    values: dict[ConfigKey, list[int | None]] = {}
    owners: list[tuple[ChannelGroup, bool]] = [
        (fam, sub.id in skip or _block_of(ir, sub.id) in skip)
        for sub in ir.sublayers()
        for fam in sub.channel_groups
    ]
    owners += [(fam, False) for st in ir.stages() for fam in st.channel_groups]
    for fam, skipped in owners:
        if skipped:
            continue
        live = len(cuts[fam.id].kept) if fam.id in cuts else fam.count
        if not fam.in_config and fam.id in cuts:
            values.setdefault((fam.config, f"<{fam.id}>"), []).extend([fam.count, live])
        for field, per in fam.config_fields.items():
            units, rest = divmod(per * live, fam.config_divisor)
            values.setdefault((fam.config, field), []).append(None if rest else units)
        if fam.top_k is not None and fam.top_k.config_field:
            values.setdefault((fam.config, fam.top_k.config_field), []).append(min(fam.top_k.value, live))
    return values


def family_config(model: nn.Module, adapter: ArchitectureAdapter, name: str) -> object:
    """The config a family's ``config`` names: the adapter's text config (``"text"``), ``model.config``
    itself (``""``) or a config under it (``"vision_config"``)."""
    if name == "text":
        return adapter.text_config(model) if hasattr(adapter, "text_config") else model.config
    config: object = model.config
    for part in name.split(".") if name else ():
        if not hasattr(config, part):
            raise PlanError(f"the IR names config {name!r}, which {type(model.config).__name__} lacks")
        config = getattr(config, part)
    return config


def config_valid(config: object) -> bool:
    """Whether ``config`` passes its own ``validate()`` (a config without one is valid)."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except Exception:  # noqa: BLE001 - transformers raises several types for an invalid config
        return False
    return True


def width_is_uniform(
    ir: ModelIR, cuts: Mapping[str, WidthCut], skip: frozenset[str] | set[str] = frozenset()
) -> bool:
    """True when every config field a family declares gets one value, which the config can hold, for all
    live families (and no family that no config field counts is cut)."""
    return all(len(set(v)) == 1 and None not in v for v in _config_targets(ir, cuts, skip).values())


@torch.no_grad()
def apply_width(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    ir: ModelIR,
    cuts: Mapping[str, WidthCut],
    *,
    skip: frozenset[str] | set[str] = frozenset(),
) -> bool:
    """Remove the groups in ``cuts`` in place; returns whether the config describes every module exactly.

    That is what the IR declares (each family's config fields, read from ``ir``), for a model whose config
    described it before the cut (:func:`config_describes_shapes`); the conformance kit checks the claim
    against plain ``from_pretrained``. ``skip`` are units the same plan removes whole (their families do
    not constrain the config).
    """
    touched: dict[str, nn.Module] = {}
    # an earlier narrowing the config could not describe (a per-layer width, a family no config field
    # counts) stays in the shapes, whatever this cut does; a model as its config builds it passes
    uniform_before = config_describes_shapes(model)
    for cut in cuts.values():
        fam = cut.family
        kept = cut.kept
        # members sharing one (parameter, axis) (a fused gate/up tensor) are cut together: the union of
        # their removed slices goes, computed on the tensor as it was
        gone: dict[tuple[str, int], set[int]] = {}
        for member, tensor in group_slices(model, fam):
            positions = removed_positions(member, fam.count, kept, tensor.shape[member.axis])
            gone.setdefault((member.param, member.axis), set()).update(positions)
        for (param, axis), cut_positions in gone.items():
            module_path, leaf = split_param(param)
            module = get_module(model, module_path)
            tensor = getattr(module, leaf)
            index = torch.tensor(
                [i for i in range(tensor.shape[axis]) if i not in cut_positions], dtype=torch.long
            )
            new = tensor.detach().index_select(axis, index.to(tensor.device)).clone()
            set_tensor(module, leaf, new)
            touched[module_path] = module
        for counter in fam.counters:
            setattr(get_module(model, counter.module), counter.attr, counter.per_group * len(kept))
        if fam.top_k is not None:
            for path in fam.top_k.counters:
                counter_module, attr = split_param(path)
                setattr(get_module(model, counter_module), attr, min(fam.top_k.value, len(kept)))
    for module in touched.values():
        sync_module_shape(module)
    uniform = True
    old: dict[ConfigKey, object] = {}
    configs: dict[str, object] = {}
    for key, vals in _config_targets(ir, cuts, skip).items():
        uniform &= len(set(vals)) == 1 and None not in vals
        name, field = key
        if field.startswith("<"):  # a family no config field counts: nothing to set
            continue
        config = configs.setdefault(name, family_config(model, adapter, name))
        if not hasattr(config, field):
            raise PlanError(f"the IR names config field {field!r}, which {type(config).__name__} lacks")
        old[key] = getattr(config, field)
        setattr(config, field, max(v if v is not None else 0 for v in vals) or old[key])
    adapter.finalize_width(model, ir, dict(cuts))
    if not all(config_valid(c) for c in configs.values()):
        # e.g. LlamaConfig insists on hidden_size % num_attention_heads == 0 even with an explicit
        # head_dim: keep the config's original counts; the structure record carries the real shapes
        for (name, field), value in old.items():
            setattr(configs[name], field, value)
        uniform = False
    return uniform and uniform_before


def config_describes_shapes(model: nn.Module) -> bool:
    """Whether ``model``'s config builds every tensor ``model`` has at the shape it has.

    That is what plain ``from_pretrained`` needs to reload a narrowed model: a model of the same class built
    from the config (on the meta device: no memory, no initialisation) must hold every weight at its
    saved shape. Tensors only one of the two has (the weights of removed branches) are not compared. For a
    model transformers cannot build from a config (no ``_from_config``: not a transformers model), only
    the config fields the IR declares can say anything: they are taken to describe it (``True``).
    """
    hf = hf_model(model)
    if not hasattr(type(hf), "_from_config") or getattr(hf, "config", None) is None:
        return True
    config = copy.deepcopy(hf.config)
    try:
        # shapes do not depend on the attention kernel: eager needs no optional library (flash-attn)
        config._attn_implementation = "eager"
        with torch.device("meta"):
            fresh = type(hf)._from_config(config)
    except Exception as exc:  # a config its own class cannot build: nothing vouches for plain reloads
        log.debug("config_describes_shapes: %s cannot be built from its config (%s)", type(hf).__name__, exc)
        return False
    want = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    return all(want.get(n, tuple(t.shape)) == tuple(t.shape) for n, t in model.state_dict().items())
