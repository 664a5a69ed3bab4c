"""Channel-group builders for layouts that many Hugging Face decoders share.

Architecture plugins describe their sublayers' coupled channels with these, so two plugins that meet the
same layout (a grouped-query attention with ``q/k/v/o_proj``, a gated MLP with ``gate/up/down_proj``)
declare it the same way.
"""

from __future__ import annotations

from torch import nn

from .ir import ChannelGroup, GroupMember


def attention_kv_groups(fid: str, path: str, attn: nn.Module, config: object) -> ChannelGroup:
    """One group per KV head of the attention at ``path``: its k/v rows, its query heads' q rows and the
    matching o columns (plus q/k/v biases where present)."""
    q, k = attn.q_proj, attn.k_proj
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]
    n_kv = k.out_features // head_dim
    q_per_kv = q.out_features // head_dim // n_kv
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
    hidden = mlp.gate_proj.in_features
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
        count=mlp.gate_proj.out_features,
        members=tuple(members),
        params_per_group=3 * hidden + len(biases),
        config_fields={config_field: 1},
    )
