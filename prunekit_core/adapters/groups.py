"""Channel-group builders that any plugin calls with its own names.

:func:`kv_groups` and :func:`ffn_channels` are factories for a :class:`~prunekit_core.adapters.declared.BranchSpec`'s
``groups``: a plugin names the projections of its attention or feed-forward branch (a Llama passes
``kv_groups(q="q_proj", k="k_proj", v="v_proj", o="o_proj")``, GPT-J ``ffn_channels(up="fc_in",
down="fc_out", config_field="n_inner")``), and the factory reads the sizes off the live module. The core
knows no family's names. :func:`conv_channels` follows one conv's out-channels through the norms and
depthwise convs after it to the next layers' in-channels (conv necks, conv projectors).

Members list every weight first, in the order named, then the biases that exist; ``params_per_group``
counts what the members slice (parameters only, not buffers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..ir.errors import PlanError
from ..ir.model import ChannelGroup, GroupMember
from .base import get_module, module_attr, module_tensor
from .declared import Branch, GroupFactory

__all__ = ["conv_channels", "ffn_channels", "kv_groups", "params_per_group"]


def params_per_group(root: nn.Module, members: Sequence[GroupMember]) -> int:
    """Parameters one group of ``members`` holds (paths from ``root``; buffers, such as running statistics,
    are sliced but not counted)."""
    total = 0
    for m in members:
        path, leaf = m.param.rsplit(".", 1)
        tensor = getattr(get_module(root, path), leaf)
        if isinstance(tensor, nn.Parameter):
            total += tensor.numel() // tensor.shape[m.axis] * m.width
    return total


def _members(branch: Branch, spans: Sequence[tuple[str, int, int]]) -> tuple[tuple[GroupMember, ...], int]:
    """The members of ``(module, axis, width)`` spans (every weight, then the biases of the axis-0 spans
    that have one) and the parameters one group holds."""
    weights, biases, per_group = [], [], 0
    for path, axis, width in spans:
        module = get_module(branch.module, path)
        weight = module_tensor(module, "weight")
        weights.append(GroupMember(param=f"{branch.path}.{path}.weight", axis=axis, width=width))
        per_group += weight.numel() // weight.shape[axis] * width
        if axis == 0 and getattr(module, "bias", None) is not None:
            biases.append(GroupMember(param=f"{branch.path}.{path}.bias", axis=0, width=width))
            per_group += width
    return (*weights, *biases), per_group


def kv_groups(
    *,
    q: str,
    k: str,
    v: str,
    o: str,
    heads_field: str = "num_attention_heads",
    kv_heads_field: str = "num_key_value_heads",
    name: str = "kv_groups",
) -> GroupFactory:
    """One group per KV head of a grouped-query attention whose projections are the ``nn.Linear`` modules
    ``q``, ``k``, ``v`` and ``o`` (paths relative to the branch): the head's k/v rows, its query heads' q
    rows and the matching o columns (plus q/k/v biases where present).

    The head size is the attention's ``head_dim`` attribute, else ``hidden_size // heads_field``; the
    config fields ``kv_heads_field`` (1 per group) and ``heads_field`` (query heads per group) count them.
    """

    def build(branch: Branch, fid: str) -> ChannelGroup:
        attn, config = branch.module, branch.config
        head_dim = getattr(attn, "head_dim", None) or config.hidden_size // getattr(config, heads_field)
        n_kv = module_attr(get_module(attn, k), "out_features") // head_dim
        q_per_kv = module_attr(get_module(attn, q), "out_features") // head_dim // n_kv
        spans = [(q, 0, head_dim * q_per_kv), (k, 0, head_dim), (v, 0, head_dim), (o, 1, head_dim * q_per_kv)]
        members, per_group = _members(branch, spans)
        return ChannelGroup(
            id=fid,
            kind="kv_group",
            count=n_kv,
            members=members,
            params_per_group=per_group,
            config_fields={kv_heads_field: 1, heads_field: q_per_kv},
        )

    return GroupFactory(name=name, build=build, reads=(q, k, v, o))


def ffn_channels(
    *,
    up: str,
    down: str,
    config_field: str,
    gate: str | None = None,
    name: str = "channels",
    optional: bool = False,
) -> GroupFactory:
    """One group per hidden channel of a feed-forward branch whose ``nn.Linear`` modules are ``up`` (and
    ``gate`` for a gated one) into the channels and ``down`` out of them (paths relative to the branch): a
    gate row, an up row and a down column (plus gate/up biases where present). ``config_field`` counts the
    channels. ``optional``: leave the family out where the modules are missing (a shared expert only some
    models have)."""
    ins = [m for m in (gate, up) if m is not None]

    def build(branch: Branch, fid: str) -> ChannelGroup:
        members, per_group = _members(branch, [*((m, 0, 1) for m in ins), (down, 1, 1)])
        return ChannelGroup(
            id=fid,
            kind="ffn_channel",
            count=module_attr(get_module(branch.module, ins[0]), "out_features"),
            members=members,
            params_per_group=per_group,
            config_fields={config_field: 1},
        )

    return GroupFactory(name=name, build=build, reads=(*ins, down), optional=optional)


def conv_channels(
    fid: str,
    model: nn.Module,
    producer: str,
    consumers: Sequence[str],
    *,
    norms: Sequence[str] = (),
    depthwise: Sequence[str] = (),
    config_fields: Mapping[str, int] | None = None,
    config: str = "text",
    config_divisor: int = 1,
    in_config: bool = True,
) -> ChannelGroup:
    """One group per output channel of the conv (or linear) at ``producer``, with everything that channel
    reaches before the next layer mixes channels: the producer's weight row and bias, the feature of each
    per-channel norm at ``norms`` (weight, bias and a BatchNorm's running statistics; LayerNorm over the
    channels, BatchNorm), the
    channel of each depthwise conv at ``depthwise`` (weight row and bias), and the input column of each
    conv or linear at ``consumers`` (axis 1).

    Paths are dotted module paths inside ``model``. Every coupled dimension must equal the producer's
    out-channels, or :class:`~prunekit_core.ir.errors.PlanError` names the one that does not: that is the
    dimension propagation a plugin would otherwise get wrong silently.
    """
    prod = get_module(model, producer)
    count = module_tensor(prod, "weight").shape[0]

    def check(path: str, size: int, what: str) -> None:
        if size != count:
            raise PlanError(
                f"{fid}: {path} has {size} {what}, but {producer} produces {count} channels; the coupled "
                "dimensions the plugin declares do not match the model"
            )

    members = [GroupMember(param=f"{producer}.weight", axis=0, width=1)]
    if getattr(prod, "bias", None) is not None:
        members.append(GroupMember(param=f"{producer}.bias", axis=0, width=1))
    for path in (*norms, *depthwise):
        module = get_module(model, path)
        check(path, module_tensor(module, "weight").shape[0], "features")
        if path in depthwise and not (isinstance(module, nn.modules.conv._ConvNd) and module.groups == count):
            raise PlanError(f"{fid}: {path} is not a depthwise conv over {count} channels")
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, leaf, None) is not None:
                members.append(GroupMember(param=f"{path}.{leaf}", axis=0, width=1))
    for path in consumers:
        module = get_module(model, path)
        if getattr(module, "groups", 1) != 1:
            raise PlanError(f"{fid}: consumer {path} is a grouped conv; declare it under depthwise=")
        check(path, module_tensor(module, "weight").shape[1], "input channels")
        members.append(GroupMember(param=f"{path}.weight", axis=1, width=1))
    return ChannelGroup(
        id=fid,
        kind="conv_channel",
        count=count,
        members=tuple(members),
        params_per_group=params_per_group(model, members),
        config_fields=dict(config_fields or {}),
        config=config,
        config_divisor=config_divisor,
        in_config=in_config,
    )
