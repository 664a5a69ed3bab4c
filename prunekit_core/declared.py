"""Adapters declared by tables: where the blocks are and which branches each block holds.

Most decoder families differ only in names: the ``nn.ModuleList`` of blocks, the embedding, final norm and
head, and, per block, the branch modules with their pre-norms. :class:`DeclaredDecoderAdapter` turns such
a declaration into the IR; config fields, per-layer lists and KV-cache indices follow through
:class:`~prunekit_core.adapter.DecoderAdapter`. ``prunekit new-plugin`` writes one, filled in from the
structure the generic adapter discovers; the generic adapter builds its IR with the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .adapter import DecoderAdapter, RemovedBranch, count_params, get_module, iter_modules
from .ir import Block, BranchOutput, Dim, ModelIR, ResidualEdge, Stage, Sublayer, SublayerKind, Tower

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

__all__ = ["BranchSpec", "DeclaredDecoderAdapter", "LayoutSpec", "build_decoder_ir"]


@dataclass(frozen=True)
class BranchSpec:
    """One residual branch of a block; paths are relative to the block.

    ``edge`` numbers the block's residual additions: branches with the same ``edge`` are added to the
    same stream value (parallel attention and MLP); ``None`` gives the branch an addition of its own.
    ``parts`` are further modules whose output only feeds this branch (removed with it); ``full_zero``
    makes the stand-in return zeros shaped like its input, for callers that add into the output in place.
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


@dataclass(frozen=True)
class LayoutSpec:
    """Where the blocks and the stages outside them are (dotted paths from the model)."""

    blocks: str
    embed: str
    final_norm: str | None = None
    head: str | None = None
    #: other parameter-holding modules outside the blocks: (path, stage kind), e.g. position embeddings
    others: tuple[tuple[str, str], ...] = ()


def build_decoder_ir(
    model: nn.Module,
    *,
    adapter: str,
    layout: LayoutSpec,
    branches: Sequence[Sequence[BranchSpec]],
    text_config: PreTrainedConfig,
) -> ModelIR:
    """The IR of ``model`` from its layout and each block's branches (``branches[i]`` for block ``i``).

    Branches whose module is a :class:`~prunekit_core.surgery.RemovedBranch` are skipped: the IR
    describes the model as it is now.
    """
    container = get_module(model, layout.blocks)
    blocks: list[Block] = []
    point = 0
    for i, (block, specs) in enumerate(zip(iter_modules(container), branches, strict=True)):
        bid, path = f"text.blocks.{i}", f"{layout.blocks}.{i}"
        subs: list[Sublayer] = []
        edge_point: dict[int, int] = {}
        for spec in specs:
            if isinstance(block.get_submodule(spec.module), RemovedBranch):
                continue
            if spec.edge is None or spec.edge not in edge_point:
                source = point
                point += 1
                if spec.edge is not None:
                    edge_point[spec.edge] = source
            else:
                source = edge_point[spec.edge]
            paths = [spec.module, *spec.parts, *([spec.norm] if spec.norm else [])]
            subs.append(
                Sublayer(
                    id=f"{bid}.{spec.name}",
                    kind=spec.kind,
                    module=f"{path}.{spec.module}",
                    norm=f"{path}.{spec.norm}" if spec.norm else None,
                    output=spec.output,
                    residual=ResidualEdge(stream="text", source=source, target=source + 1),
                    params=count_params([block.get_submodule(p) for p in paths]),
                    out_proj=f"{path}.{spec.out_proj}" if spec.out_proj else None,
                    parts=tuple(f"{path}.{p}" for p in spec.parts),
                    full_zero=spec.full_zero,
                    uses_cache=spec.uses_cache,
                )
            )
        blocks.append(
            Block(id=bid, index=i, module=path, sublayers=tuple(subs), params=count_params([block]))
        )
    return ModelIR(
        architecture=type(model).__name__,
        model_type=str(getattr(text_config, "model_type", "")),
        adapter=adapter,
        towers=(
            Tower(
                name="text",
                width=Dim(name="hidden", size=int(text_config.hidden_size)),
                blocks_path=layout.blocks,
                blocks=tuple(blocks),
                stages=_stages(model, layout),
                final_norm=layout.final_norm,
                head=layout.head,
            ),
        ),
        total_params=count_params([model]),
    )


def _stages(model: nn.Module, layout: LayoutSpec) -> tuple[Stage, ...]:
    embed = get_module(model, layout.embed)
    stages = [Stage(id="text.embed", kind="embedding", module=layout.embed, params=count_params([embed]))]
    for path, kind in layout.others:
        stages.append(
            Stage(
                id="text." + path.replace(".", "_"),
                kind=kind,
                module=path,
                params=count_params([get_module(model, path)]),
            )
        )
    if layout.final_norm:
        norm = get_module(model, layout.final_norm)
        stages.append(
            Stage(id="text.norm", kind="norm", module=layout.final_norm, params=count_params([norm]))
        )
    if layout.head:
        head = get_module(model, layout.head)
        tied = all(any(p is q for q in embed.parameters()) for p in head.parameters())
        stages.append(
            Stage(
                id="text.head",
                kind="head",
                module=layout.head,
                params=0 if tied else count_params([head]),
                tied_to="text.embed" if tied else None,
            )
        )
    return tuple(stages)


class DeclaredDecoderAdapter(DecoderAdapter):
    """A decoder adapter from three class attributes: ``model_classes``, ``layout`` and ``branches``.

    ``match`` returns 100 for a model whose class name is in ``model_classes``. Every block has the
    ``branches`` declared; override :meth:`block_branches` when blocks differ (e.g. MoE every other
    layer), and :meth:`build_ir` to add channel groups (width pruning) to the sublayers.
    """

    model_classes: tuple[str, ...] = ()
    layout: LayoutSpec
    branches: tuple[BranchSpec, ...] = ()

    def match(self, model: nn.Module) -> float | None:
        return 100.0 if type(model).__name__ in self.model_classes else None

    def block_branches(self, model: nn.Module, index: int, block: nn.Module) -> Sequence[BranchSpec]:
        """The branches of block ``index`` (default: ``branches`` for every block)."""
        return self.branches

    def build_ir(self, model: nn.Module) -> ModelIR:
        container = get_module(model, self.layout.blocks)
        return build_decoder_ir(
            model,
            adapter=self.name,
            layout=self.layout,
            branches=[self.block_branches(model, i, b) for i, b in enumerate(iter_modules(container))],
            text_config=self.text_config(model),
        )
