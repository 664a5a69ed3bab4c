"""Channel-group builders for layouts that many Hugging Face decoders share.

Architecture plugins describe their sublayers' coupled channels with these, so two plugins that meet the
same layout (a grouped-query attention with ``q/k/v/o_proj``, a gated MLP with ``gate/up/down_proj``)
declare it the same way. :func:`conv_channels` follows one conv's out-channels through the norms and
depthwise convs after it to the next layers' in-channels (conv necks, conv projectors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from .adapter import get_module, module_attr, module_tensor
from .ir import ChannelGroup, GroupMember

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def attention_kv_groups(fid: str, path: str, attn: nn.Module, config: PreTrainedConfig) -> ChannelGroup:
    """One group per KV head of the attention at ``path``: its k/v rows, its query heads' q rows and the
    matching o columns (plus q/k/v biases where present)."""
    q, k = get_module(attn, "q_proj"), get_module(attn, "k_proj")
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = module_attr(k, "out_features") // head_dim
    q_per_kv = module_attr(q, "out_features") // head_dim // n_kv
    members = [
        GroupMember(param=f"{path}.q_proj.weight", axis=0, width=head_dim * q_per_kv),
        GroupMember(param=f"{path}.k_proj.weight", axis=0, width=head_dim),
        GroupMember(param=f"{path}.v_proj.weight", axis=0, width=head_dim),
        GroupMember(param=f"{path}.o_proj.weight", axis=1, width=head_dim * q_per_kv),
    ]
    for proj, width in (("q_proj", head_dim * q_per_kv), ("k_proj", head_dim), ("v_proj", head_dim)):
        if getattr(attn, proj).bias is not None:
            members.append(GroupMember(param=f"{path}.{proj}.bias", axis=0, width=width))
    per_group = 0
    for m in members:
        module, leaf = m.param[len(path) + 1 :].rsplit(".", 1)
        tensor = getattr(getattr(attn, module), leaf)
        per_group += m.width * (1 if tensor.dim() == 1 else tensor.shape[1 - m.axis])
    return ChannelGroup(
        id=fid,
        kind="kv_group",
        count=n_kv,
        members=tuple(members),
        params_per_group=per_group,
        config_fields={"num_key_value_heads": 1, "num_attention_heads": q_per_kv},
    )


def gated_mlp_channels(fid: str, path: str, mlp: nn.Module, config_field: str) -> ChannelGroup:
    """One group per hidden channel of the gated MLP at ``path``: a gate row, an up row, a down column
    (plus gate/up biases where present); ``config_field`` counts the channels."""
    gate = get_module(mlp, "gate_proj")
    hidden: int = module_attr(gate, "in_features")
    members = [
        GroupMember(param=f"{path}.gate_proj.weight", axis=0, width=1),
        GroupMember(param=f"{path}.up_proj.weight", axis=0, width=1),
        GroupMember(param=f"{path}.down_proj.weight", axis=1, width=1),
    ]
    biases = [p for p in ("gate_proj", "up_proj") if getattr(mlp, p).bias is not None]
    members += [GroupMember(param=f"{path}.{p}.bias", axis=0, width=1) for p in biases]
    return ChannelGroup(
        id=fid,
        kind="ffn_channel",
        count=module_attr(gate, "out_features"),
        members=tuple(members),
        params_per_group=3 * hidden + len(biases),
        config_fields={config_field: 1},
    )


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
    out-channels, or :class:`~prunekit_core.errors.PlanError` names the one that does not: that is the
    dimension propagation a plugin would otherwise get wrong silently.
    """
    from .errors import PlanError

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
    per_group = 0
    for m in members:
        module_path, leaf = m.param.rsplit(".", 1)
        tensor = getattr(get_module(model, module_path), leaf)
        if isinstance(tensor, nn.Parameter):  # buffers (running statistics) are sliced, not counted
            per_group += tensor.numel() // tensor.shape[m.axis]
    return ChannelGroup(
        id=fid,
        kind="conv_channel",
        count=count,
        members=tuple(members),
        params_per_group=per_group,
        config_fields=dict(config_fields or {}),
        config=config,
        config_divisor=config_divisor,
        in_config=in_config,
    )
