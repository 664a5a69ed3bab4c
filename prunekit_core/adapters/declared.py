"""Decoders declared by tables: the one way a plugin describes where a family's blocks and branches are.

Most decoder families differ only in names: the ``nn.ModuleList`` of blocks, the embedding, final norm and
head (a :class:`LayoutSpec`), and, per block, the branch modules with their pre-norms (one
:class:`BranchSpec` each). A branch's channel groups (width pruning) come from *factories* it lists in
``groups``: :func:`~prunekit_core.adapters.groups.kv_groups` and :func:`~prunekit_core.adapters.groups.ffn_channels` build
the common ones from the names a plugin passes, and a plugin writes a :class:`GroupFactory` of its own for
anything else (fused MoE experts). :class:`DeclaredDecoderAdapter` turns the tables into the IR with
:func:`build_decoder_ir`, the one IR builder for blocks (vision towers use its :func:`build_blocks`); config
fields, per-layer lists and KV-cache indices follow through :class:`~prunekit_core.adapters.base.DecoderAdapter`.
The generic adapter writes what it discovers as the same tables, and ``prunekit new-plugin`` writes them
down as a plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..ir.kinds import SublayerKind
from ..ir.model import (
    Block,
    BranchOutput,
    ChannelGroup,
    Dim,
    Expert,
    ModelIR,
    ResidualEdge,
    Stage,
    Sublayer,
    Tower,
)
from ..ir.stream import PostKind, StreamWrite
from .base import DecoderAdapter, RemovedBranch, count_params, get_module, iter_modules

__all__ = [
    "Branch",
    "BranchSpec",
    "DeclaredDecoderAdapter",
    "GroupFactory",
    "LayoutSpec",
    "build_blocks",
    "build_decoder_ir",
    "has_path",
    "head_stage",
]


@dataclass(frozen=True)
class Branch:
    """One live branch of one block, as a channel-group factory sees it."""

    sublayer: str  #: its sublayer id, e.g. ``text.blocks.3.attn``
    path: str  #: dotted path of the branch module in the model
    module: nn.Module
    config: Any  #: the adapter's text config (``None`` for towers without one)


@dataclass(frozen=True)
class GroupFactory:
    """A channel-group family of a branch: ``build(branch, family_id)`` reads it off the live module.

    The family's id is the sublayer's id and ``name`` (``text.blocks.3.attn.kv_groups``). ``reads`` are the
    attributes the family needs, as paths relative to the branch module: a model whose branch lacks one is
    not laid out as declared (:meth:`DeclaredDecoderAdapter.has_layout`), unless the family is
    ``optional`` (then it is left out where they are missing, e.g. a shared expert some models have).
    """

    name: str
    build: Callable[[Branch, str], ChannelGroup]
    reads: tuple[str, ...] = ()
    optional: bool = False

    def __call__(self, branch: Branch) -> ChannelGroup | None:
        if self.optional and not all(has_path(branch.module, r) for r in self.reads):
            return None
        return self.build(branch, f"{branch.sublayer}.{self.name}")


@dataclass(frozen=True)
class BranchSpec:
    """One residual branch of a block; paths are relative to the block.

    ``edge`` numbers the block's residual additions: branches with the same ``edge`` are added to the
    same stream value (parallel attention and MLP); ``None`` gives the branch an addition of its own.
    ``parts`` are further modules *before* the branch whose output only feeds it (OPT's ``fc1``), ``post``
    the modules *after* it, between its output and the residual add (Gemma 2/3 and OLMo2 post-norms:
    ``post=("post_attention_layernorm",)``); both belong to the branch: their parameters count with it and
    they are removed with it. ``post_kind`` says what the ``post`` modules are (``"norm"`` when ``post`` is
    given, ``"none"`` otherwise; ``"gate"`` or ``"opaque"`` for anything else between ``out_proj`` and the
    add), and ``scale`` is a constant the block multiplies the branch output by before the add: a number,
    or the name of the text-config field holding it (Granite: ``scale="residual_multiplier"``); ``None``
    is no multiplier. Together they make the sublayer's :class:`~prunekit_core.ir.stream.StreamWrite`.
    ``full_zero`` makes the stand-in return zeros shaped like its input, for callers that add into the
    output in place. ``groups`` build the branch's channel-group families (width pruning); ``experts``
    lists an MoE branch's experts.
    """

    name: str
    kind: SublayerKind
    module: str
    norm: str | None = None
    output: BranchOutput = "tensor"
    uses_cache: bool = False
    edge: int | None = None
    parts: tuple[str, ...] = ()
    full_zero: bool = False
    out_proj: str | None = None
    groups: tuple[GroupFactory, ...] = ()
    experts: Callable[[Branch], tuple[Expert, ...]] | None = None
    post: tuple[str, ...] = ()
    post_kind: PostKind | None = None
    scale: float | str | None = None

    def write(self, block_path: str, config: Any) -> StreamWrite:
        """The branch's :class:`StreamWrite` in the block at ``block_path``; ``config`` holds a named scale."""
        scale = self.scale
        if isinstance(scale, str):
            value = getattr(config, scale, None)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"branch {self.name!r} reads its scale from the config field {scale!r}, which the text "
                    f"config {type(config).__name__} does not hold as a number ({value!r}): name the field "
                    "that holds the multiplier, or give the number itself (BranchSpec(scale=...))"
                )
            scale = value
        return StreamWrite(
            post=self.post_kind or ("norm" if self.post else "none"),
            modules=tuple(f"{block_path}.{p}" for p in self.post),
            scale=1.0 if scale is None else float(scale),
        )


@dataclass(frozen=True)
class LayoutSpec:
    """Where the blocks and the stages outside them are (dotted paths from the model)."""

    blocks: str
    embed: str
    final_norm: str | None = None
    head: str | None = None
    #: other parameter-holding modules outside the blocks: (path, stage kind), e.g. position embeddings
    others: tuple[tuple[str, str], ...] = ()


def has_path(root: nn.Module, path: str) -> bool:
    """Whether the dotted attribute ``path`` (modules, parameters, plain attributes) exists under ``root``."""
    obj: Any = root
    for part in path.split(".") if path else ():
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def build_blocks(
    layers: Iterable[nn.Module],
    path: str,
    branches: Sequence[Sequence[BranchSpec]],
    *,
    tower: str = "text",
    config: Any = None,
) -> tuple[Block, ...]:
    """The IR blocks of the stack ``layers`` at dotted ``path``, block ``i`` holding ``branches[i]``.

    Unit ids start with ``tower`` (``text.blocks.3.attn``), residual edges run on the stream ``tower``.
    Branches whose module is a :class:`~prunekit_core.surgery.apply.RemovedBranch` are skipped: the IR describes
    the model as it is now. ``config`` is what the channel-group factories see as ``Branch.config``.
    """
    blocks: list[Block] = []
    point = 0
    for i, (block, specs) in enumerate(zip(layers, branches, strict=True)):
        bid, bpath = f"{tower}.blocks.{i}", f"{path}.{i}"
        subs: list[Sublayer] = []
        edge_point: dict[int, int] = {}
        for spec in specs:
            module = block.get_submodule(spec.module)
            if isinstance(module, RemovedBranch):
                continue
            if spec.edge is None or spec.edge not in edge_point:
                source = point
                point += 1
                if spec.edge is not None:
                    edge_point[spec.edge] = source
            else:
                source = edge_point[spec.edge]
            others = [block.get_submodule(p) for p in (*spec.parts, *spec.post, spec.norm) if p]
            branch = Branch(f"{bid}.{spec.name}", f"{bpath}.{spec.module}", module, config)
            subs.append(
                Sublayer(
                    id=branch.sublayer,
                    kind=spec.kind,
                    module=branch.path,
                    norm=f"{bpath}.{spec.norm}" if spec.norm else None,
                    output=spec.output,
                    residual=ResidualEdge(stream=tower, source=source, target=source + 1),
                    params=count_params([module, *others]),
                    out_proj=f"{bpath}.{spec.out_proj}" if spec.out_proj else None,
                    write=spec.write(bpath, config),
                    parts=tuple(f"{bpath}.{p}" for p in spec.parts),
                    full_zero=spec.full_zero,
                    uses_cache=spec.uses_cache,
                    channel_groups=tuple(g for f in spec.groups if (g := f(branch)) is not None),
                    experts=spec.experts(branch) if spec.experts else (),
                )
            )
        blocks.append(
            Block(id=bid, index=i, module=bpath, sublayers=tuple(subs), params=count_params([block]))
        )
    return tuple(blocks)


def build_decoder_ir(
    model: nn.Module,
    *,
    adapter: str,
    layout: LayoutSpec,
    branches: Sequence[Sequence[BranchSpec]],
    text_config: Any,
) -> ModelIR:
    """The IR of ``model`` from its layout and each block's branches (``branches[i]`` for block ``i``)."""
    container = get_module(model, layout.blocks)
    return ModelIR(
        architecture=type(model).__name__,
        model_type=str(getattr(text_config, "model_type", "")),
        adapter=adapter,
        towers=(
            Tower(
                name="text",
                width=Dim(name="hidden", size=int(text_config.hidden_size)),
                blocks_path=layout.blocks,
                blocks=build_blocks(iter_modules(container), layout.blocks, branches, config=text_config),
                stages=_stages(model, layout),
                final_norm=layout.final_norm,
                head=layout.head,
            ),
        ),
        total_params=count_params([model]),
    )


def head_stage(model: nn.Module, head: str, embed: str, *, tower: str = "text") -> Stage:
    """The head stage at ``head``: tied to the embedding at ``embed`` when it shares a parameter with it.

    Its ``params`` are the head's parameters the embedding does not hold (0 for a fully tied head). This is
    the one rule for tied heads: every adapter that declares a head stage calls it.
    """
    shared = {id(p) for p in get_module(model, embed).parameters()}
    own = {id(p): p for p in get_module(model, head).parameters()}
    tied = any(k in shared for k in own)
    return Stage(
        id=f"{tower}.head",
        kind="head",
        module=head,
        params=sum(p.numel() for k, p in own.items() if k not in shared),
        tied_to=f"{tower}.embed" if tied else None,
    )


def _stages(model: nn.Module, layout: LayoutSpec) -> tuple[Stage, ...]:
    def stage(sid: str, kind: Any, path: str) -> Stage:
        return Stage(id=sid, kind=kind, module=path, params=count_params([get_module(model, path)]))

    stages = [stage("text.embed", "embedding", layout.embed)]
    stages += [stage("text." + path.replace(".", "_"), kind, path) for path, kind in layout.others]
    if layout.final_norm:
        stages.append(stage("text.norm", "norm", layout.final_norm))
    if layout.head:
        stages.append(head_stage(model, layout.head, layout.embed))
    return tuple(stages)


class DeclaredDecoderAdapter(DecoderAdapter):
    """A decoder adapter from three class attributes: ``model_classes``, ``layout`` and ``branches``.

    ``match`` returns 100 for a model whose class name is in ``model_classes``; with ``match_layout`` it
    also returns 10 for a model of another class laid out as declared (:meth:`has_layout`: a fine-tuning
    library's subclass, a family that copies the layout). Every block has the ``branches`` declared;
    override :meth:`block_branches` when blocks differ (e.g. MoE every other layer).
    """

    model_classes: tuple[str, ...] = ()
    #: also match (score 10) models of other classes that have the declared layout
    match_layout: bool = False
    layout: LayoutSpec
    branches: tuple[BranchSpec, ...] = ()

    def match(self, model: nn.Module) -> float | None:
        if type(model).__name__ in self.model_classes:
            return 100.0
        return 10.0 if self.match_layout and self.has_layout(model) else None

    def block_branches(self, model: nn.Module, index: int, block: nn.Module) -> Sequence[BranchSpec]:
        """The branches of block ``index`` (default: ``branches`` for every block)."""
        return self.branches

    def has_layout(self, model: nn.Module) -> bool:
        """Whether ``model`` is laid out as declared: ``config.num_hidden_layers``, the layout's modules, a
        non-empty ``nn.ModuleList`` of blocks, and in every block each declared branch (or its stand-in)
        with its pre-norm, parts and post modules, and everything its channel-group factories read."""
        layout = self.layout
        paths = [layout.blocks, layout.embed, layout.final_norm, layout.head]
        if not hasattr(getattr(model, "config", None), "num_hidden_layers") or not all(
            has_path(model, p) for p in paths if p
        ):
            return False
        container = get_module(model, layout.blocks)
        if not isinstance(container, nn.ModuleList) or len(container) == 0:
            return False
        for i, block in enumerate(iter_modules(container)):
            for spec in self.block_branches(model, i, block):
                if not all(
                    has_path(block, p) for p in (spec.module, *spec.parts, *spec.post, spec.norm) if p
                ):
                    return False
                module = get_module(block, spec.module)
                reads = [r for g in spec.groups if not g.optional for r in g.reads]
                if not isinstance(module, RemovedBranch) and not all(has_path(module, r) for r in reads):
                    return False
        return True

    def build_ir(self, model: nn.Module) -> ModelIR:
        container = get_module(model, self.layout.blocks)
        return build_decoder_ir(
            model,
            adapter=self.name,
            layout=self.layout,
            branches=[self.block_branches(model, i, b) for i, b in enumerate(iter_modules(container))],
            text_config=self.text_config(model),
        )
