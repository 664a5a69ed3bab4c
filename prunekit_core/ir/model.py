"""The pruning IR: what an architecture plugin tells the core about a model.

Every model prunekit handles is a set of residual streams with branches hung on them. A plugin maps a
concrete ``nn.Module`` into this picture; the core scores, plans and cuts using only the IR.

Unit ids read like paths and are stable for a given model: ``text.blocks.12`` (a block),
``text.blocks.12.attn`` / ``text.blocks.12.mlp`` (sublayers), ``text.blocks.12.attn.kv_groups`` (a channel
group family). A block's id uses its index in the model *as loaded*.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import PlanError
from .kinds import GroupKind, SublayerKind  # registered names; plugins add their own there
from .stream import StreamWrite

BranchOutput = Literal["tensor", "tuple"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Dim(_Frozen):
    """A named dimension, e.g. the residual width of a tower."""

    name: str
    size: int


class GroupMember(_Frozen):
    """One parameter that shrinks when a channel group is removed: group ``i`` of its family owns the slice
    ``[offset + i*width, offset + (i+1)*width)`` of ``param`` along ``axis``. ``param`` may name a buffer
    (a BatchNorm's running statistics): sliced with the group, it holds no parameters."""

    param: str
    axis: int
    width: int
    offset: int = 0


class ModuleCounter(_Frozen):
    """A module attribute that counts groups: ``module.attr == per_group * live groups``."""

    module: str
    attr: str
    per_group: int


class TopK(_Frozen):
    """A router that sends each token to its ``value`` highest-scoring groups of a family (MoE experts):
    removing groups must leave at least ``value`` of them, unless the plan lowers ``top_k`` (plan field
    ``top_k_policy="clamp"``): then every module attribute in ``counters`` (dotted ``module.attr`` paths)
    and the text-config field ``config_field`` are set to ``min(value, live groups)``.
    """

    value: int
    counters: tuple[str, ...] = ()
    config_field: str | None = None


class ChannelGroup(_Frozen):
    """A family of ``count`` interchangeable groups whose members must be sliced together.

    Examples (``kind``, see :mod:`prunekit_core.ir.kinds`): the KV groups of an attention (one KV head with
    its query heads' q rows, its k/v rows and the matching o columns), an FFN's channels (a gate row, an up
    row, a down column), the experts of an MoE sublayer, the channels inside the experts. Several members
    may slice one parameter along one axis (a fused gate/up tensor): surgery removes the union of slices.

    Width surgery (``prunekit_core.surgery.width``) slices every member, updates ``nn.Linear``/``nn.Conv*``
    feature counts from the new shapes, sets every ``counters`` attribute, and sets each text-config field
    in ``config_fields`` (field -> units per group) to ``per_group * live groups`` when every family naming
    that field keeps the same count (otherwise to the largest; the checkpoint then needs ``load_pruned``).
    """

    id: str
    kind: GroupKind
    count: int
    members: tuple[GroupMember, ...]
    params_per_group: int
    config_fields: dict[str, int] = Field(default_factory=dict)
    counters: tuple[ModuleCounter, ...] = ()
    #: for routed groups (experts): the member parameter whose row i computes group i's router logit;
    #: removing group i equals forcing that logit to -inf
    router: str | None = None
    top_k: TopK | None = None
    #: the config that holds config_fields: "text" (the adapter's text config), "" (the model's config
    #: itself) or an attribute path from it (e.g. "vision_config")
    config: str = "text"
    #: each config field is per_group * live groups / config_divisor (a projector conv with 2 * output_channels
    #: channels declares output_channels: 1 with divisor 2); a count it does not divide needs load_pruned
    config_divisor: int = 1
    #: False when no config field counts these groups (a projector's input width): a cut needs load_pruned
    in_config: bool = True
    #: the number of groups kept must be a multiple of this (a kernel's alignment, e.g. fused expert tensors
    #: whose rows grouped matrix multiplication wants 16-byte aligned)
    multiple_of: int = 1


class ResidualEdge(_Frozen):
    """Where a branch adds into a residual stream: ``x[target] = x[source] + branch(norm(x[source]))``;
    points are numbered along the stream of a tower (point 0 enters the first sublayer)."""

    stream: str
    source: int
    target: int


class Expert(_Frozen):
    """An expert inside an MoE sublayer (declared by MoE plugins)."""

    id: str
    index: int
    router_row: int | None
    shared: bool = False
    params: int


class Sublayer(_Frozen):
    """A branch on a residual edge: attention, MLP, MoE, conv mixer, ..."""

    id: str
    kind: SublayerKind
    module: str = Field(description="dotted path of the branch module inside the model")
    norm: str | None = Field(description="dotted path of its pre-norm, removed with the branch")
    output: BranchOutput = Field(description="whether the branch module returns a tensor or a tuple")
    residual: ResidualEdge
    params: int = Field(description="parameters of the branch and its pre-norm")
    #: dotted path of the nn.Linear whose output is the branch's contribution (repair)
    out_proj: str | None = None
    write: StreamWrite = StreamWrite()  # what stands between out_proj's output and the add (ir/stream.py)
    #: further modules whose output only feeds this branch (fc1 when the branch ends in fc2): their
    #: parameters count with the branch and they are removed with it
    parts: tuple[str, ...] = ()
    #: its stand-in returns zeros shaped like its input instead of a scalar zero, for callers that add into
    #: the branch output in place
    full_zero: bool = False
    removable: bool = True
    uses_cache: bool = False
    channel_groups: tuple[ChannelGroup, ...] = ()
    experts: tuple[Expert, ...] = ()


class Block(_Frozen):
    """An ordered list of sublayers; removable when every sublayer is."""

    id: str
    index: int
    module: str
    sublayers: tuple[Sublayer, ...]
    params: int = Field(description="all parameters inside the block module")

    @property
    def removable(self) -> bool:
        return all(s.removable for s in self.sublayers)


class Stage(_Frozen):
    """A part of a tower that is not on a residual edge (embeddings, final norm, head, a stem conv, a conv
    neck, a projector between towers). Never removed: its output feeds the next layer directly.

    It may be *narrowed*: ``channel_groups`` are families of coupled channels (a conv's out-channels = the
    next norm's features = the next conv's in-channels) that width surgery slices together. ``module`` may
    also name a parameter held directly by a module (a position embedding).
    """

    id: str
    kind: Literal["embedding", "norm", "head", "stem", "neck", "projector", "other"]
    module: str
    params: int
    tied_to: str | None = None
    channel_groups: tuple[ChannelGroup, ...] = ()


class Tower(_Frozen):
    """One residual stream with its blocks and non-removable stages."""

    name: str
    width: Dim
    blocks_path: str = Field(description="dotted path of the ModuleList holding the blocks")
    blocks: tuple[Block, ...]
    stages: tuple[Stage, ...]
    final_norm: str | None = None
    head: str | None = None


class Connection(_Frozen):
    """Which tower's output feeds which tower's input, and at what width."""

    source: str
    target: str
    dim: int


class ModelIR(_Frozen):
    """The whole model as prunekit sees it."""

    architecture: str
    model_type: str
    adapter: str
    towers: tuple[Tower, ...]
    connections: tuple[Connection, ...] = ()
    total_params: int
    scope: tuple[str, ...] = Field((), description="towers a plan may touch (empty: all); see restricted()")

    def tower(self, name: str) -> Tower:
        if found := [t for t in self.towers if t.name == name]:
            return found[0]
        raise KeyError(f"no tower {name!r}; towers: {[t.name for t in self.towers]}")

    def blocks(self) -> list[Block]:
        return [b for t in self.towers for b in t.blocks]

    def sublayers(self) -> list[Sublayer]:
        return [s for b in self.blocks() for s in b.sublayers]

    def block_params(self) -> int:
        """Parameters inside the blocks of the towers in scope: the base of every ``--ratio`` budget."""
        return sum(b.params for t in self.towers if self.in_scope(t.name) for b in t.blocks)

    def in_scope(self, tower: str) -> bool:
        return not self.scope or tower in self.scope

    def restricted(self, scope: tuple[str, ...] | list[str] | None) -> ModelIR:
        """This IR with only the towers in ``scope`` open to a plan (``None`` or empty: all).

        Units of other towers become non-removable and lose their channel groups, so no planner picks
        them; ids, parameter counts and the structure signature (the plan's fingerprint) are unchanged.
        """
        if not scope:
            return self
        names = [t.name for t in self.towers]
        unknown = [s for s in scope if s not in names]
        if unknown:
            raise PlanError(f"unknown tower(s) {unknown}; this model has {names}")
        if not any(t.blocks for t in self.towers if t.name in scope):
            raise PlanError(
                f"tower(s) {list(scope)} have no blocks to prune; towers with blocks: "
                f"{[t.name for t in self.towers if t.blocks]}"
            )

        def closed(t: Tower) -> Tower:  # nothing in it a plan may touch
            shut = {"removable": False, "channel_groups": ()}
            blocks = tuple(
                b.model_copy(update={"sublayers": tuple(s.model_copy(update=shut) for s in b.sublayers)})
                for b in t.blocks
            )
            stages = tuple(st.model_copy(update={"channel_groups": ()}) for st in t.stages)
            return t.model_copy(update={"blocks": blocks, "stages": stages})

        towers = tuple(t if t.name in scope else closed(t) for t in self.towers)
        return self.model_copy(update={"towers": towers, "scope": tuple(scope)})

    def channel_groups(self) -> dict[str, tuple[Sublayer, ChannelGroup]]:
        """Every channel-group family of a sublayer by id, with the sublayer that owns it.

        Families of stages (conv necks, projectors) are in :meth:`stage_channel_groups`: the width planners
        read a family's cost off its sublayer, so they plan only these; a plan may name both.
        """
        return {g.id: (s, g) for s in self.sublayers() for g in s.channel_groups}

    def stages(self) -> list[Stage]:
        return [st for t in self.towers for st in t.stages]

    def stage_channel_groups(self) -> dict[str, tuple[Stage, ChannelGroup]]:
        """Every channel-group family of a stage by id, with the stage that owns it (never removed)."""
        return {g.id: (st, g) for st in self.stages() for g in st.channel_groups}

    def all_channel_groups(self) -> dict[str, tuple[Sublayer | Stage, ChannelGroup]]:
        """Sublayer and stage families together: everything width surgery can narrow."""
        return {**self.channel_groups(), **self.stage_channel_groups()}

    def block_map(self) -> dict[str, Block]:
        """Every block by id."""
        return {b.id: b for b in self.blocks()}

    def sublayer_map(self) -> dict[str, Sublayer]:
        """Every sublayer by id."""
        return {s.id: s for s in self.sublayers()}

    def units(self) -> dict[str, Block | Sublayer]:
        """Every removable-or-not unit by id (blocks and sublayers)."""
        out: dict[str, Block | Sublayer] = {}
        for b in self.blocks():
            out[b.id] = b
            out.update((s.id, s) for s in b.sublayers)
        return out

    def structure_signature(self) -> list[tuple[str, str, int]]:
        """A compact, order-preserving description used for fingerprints."""
        sig: list[tuple[str, str, int]] = []
        for t in self.towers:
            sig += [(st.id, st.kind, st.params) for st in t.stages]
            sig += [(s.id, s.kind, s.params) for b in t.blocks for s in b.sublayers]
        return sig
