"""Sublayer and channel-group kinds: the IR accepts registered kinds only, and a plugin can add one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from prunekit_core.ir import kinds
from prunekit_core.ir.model import ChannelGroup, GroupMember, ResidualEdge, Sublayer


def _sublayer(kind: str) -> Sublayer:
    edge = ResidualEdge(stream="text", source=0, target=1)
    return Sublayer(
        id="text.blocks.0.x", kind=kind, module="m", norm=None, output="tensor", residual=edge, params=1
    )


def _group(kind: str) -> ChannelGroup:
    member = GroupMember(param="m.weight", axis=0, width=1)
    return ChannelGroup(id="text.blocks.0.x.g", kind=kind, count=2, members=(member,), params_per_group=1)


@pytest.fixture
def registry() -> Iterator[None]:
    """Registrations made by a test go when it ends (the tables are the ones the IR validates against)."""
    tables = (kinds._SUBLAYER_KINDS, kinds._GROUP_KINDS)
    saved = [dict(t) for t in tables]
    yield
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)


def test_built_in_kinds_are_registered() -> None:
    assert set(kinds.sublayer_kinds()) == {"attention", "mlp", "moe", "conv_mixer", "conv_ffn", "other"}
    assert set(kinds.group_kinds()) == {"kv_group", "ffn_channel", "conv_channel", "expert", "expert_channel"}


def test_unregistered_kinds_are_refused_with_the_fix(registry: None) -> None:
    with pytest.raises(ValidationError, match=r"unknown sublayer kind 'ssm'.*register_sublayer_kind\('ssm'"):
        _sublayer("ssm")
    with pytest.raises(ValidationError, match=r"unknown channel-group kind 'state'.*register_group_kind"):
        _group("state")


def test_a_plugin_registers_a_kind(registry: None) -> None:
    kinds.register_sublayer_kind("ssm", "a state-space mixer")
    kinds.register_group_kind("state", "one channel of a state-space mixer's state")
    assert _sublayer("ssm").kind == "ssm" and _group("state").kind == "state"
    kinds.register_sublayer_kind("ssm", "a state-space mixer")  # again, same meaning: nothing happens
    with pytest.raises(ValueError, match="already registered as 'a state-space mixer'"):
        kinds.register_sublayer_kind("ssm", "something else")
    with pytest.raises(ValueError, match="not a lowercase identifier"):
        kinds.register_group_kind("Bad Kind", "x")
