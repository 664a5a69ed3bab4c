"""The kinds of sublayers and channel groups the IR accepts, and how a plugin adds a kind of its own.

A :class:`~prunekit_core.ir.model.Sublayer`'s ``kind`` and a :class:`~prunekit_core.ir.model.ChannelGroup`'s ``kind``
must be registered here; the IR refuses any other name when it is built. The core's planners, metrics and
surgery treat every kind alike, except where they say otherwise (``moe`` sublayers carry experts, ``expert``
families are routed, ``kv_group`` families pin ``head_dim`` in the config after a cut). A plugin whose family
has a branch or a channel family none of the built-in kinds names (a state-space mixer, a retention head)
registers it once, before its adapter builds an IR, e.g. at the top of its adapter module::

    from prunekit_core.ir.kinds import register_sublayer_kind

    register_sublayer_kind("ssm", "a state-space mixer (Mamba)")

Registering a name again with the same description does nothing; with another description it is an error,
so two plugins cannot give one kind two meanings. This module imports nothing else of prunekit.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = [
    "GroupKind",
    "SublayerKind",
    "group_kinds",
    "register_group_kind",
    "register_sublayer_kind",
    "sublayer_kinds",
]

_SUBLAYER_KINDS: dict[str, str] = {
    "attention": "self-attention; with uses_cache it owns a KV-cache slot",
    "mlp": "a dense feed-forward branch",
    "moe": "a routed mixture of experts (declares its experts)",
    "conv_mixer": "a convolutional token mixer",
    "conv_ffn": "a convolutional feed-forward branch",
    "other": "any other branch on a residual edge",
}
_GROUP_KINDS: dict[str, str] = {
    "kv_group": "one KV head with its query heads (q/k/v rows, o columns)",
    "ffn_channel": "one hidden channel of a feed-forward branch",
    "conv_channel": "one output channel of a conv and everything it reaches before the next mix",
    "expert": "one routed expert of an MoE branch (a router row and its weights)",
    "expert_channel": "one hidden channel of every expert of an MoE branch",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _register(table: dict[str, str], what: str, name: str, description: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} kind {name!r} is not a lowercase identifier (e.g. 'ssm', 'retention_head')")
    known = table.get(name)
    if known is not None and known != description:
        raise ValueError(f"{what} kind {name!r} is already registered as {known!r}; choose another name")
    table[name] = description


def register_sublayer_kind(name: str, description: str) -> None:
    """Let sublayers of kind ``name`` into the IR (``description``: one line, shown in error messages)."""
    _register(_SUBLAYER_KINDS, "sublayer", name, description)


def register_group_kind(name: str, description: str) -> None:
    """Let channel-group families of kind ``name`` into the IR."""
    _register(_GROUP_KINDS, "channel-group", name, description)


def sublayer_kinds() -> dict[str, str]:
    """Every registered sublayer kind with its description."""
    return dict(_SUBLAYER_KINDS)


def group_kinds() -> dict[str, str]:
    """Every registered channel-group kind with its description."""
    return dict(_GROUP_KINDS)


def _check(table: dict[str, str], what: str, register: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in table:
            raise ValueError(
                f"unknown {what} kind {value!r}; known kinds: {sorted(table)}. A plugin adds one with "
                f"prunekit_core.ir.kinds.{register}({value!r}, description) before building its IR"
            )
        return value

    return AfterValidator(check)


#: a sublayer kind: a ``str`` that must be registered (:func:`register_sublayer_kind`)
SublayerKind = Annotated[str, _check(_SUBLAYER_KINDS, "sublayer", "register_sublayer_kind")]
#: a channel-group kind: a ``str`` that must be registered (:func:`register_group_kind`)
GroupKind = Annotated[str, _check(_GROUP_KINDS, "channel-group", "register_group_kind")]
