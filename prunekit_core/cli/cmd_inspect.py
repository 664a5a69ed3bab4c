"""``prunekit inspect``: the adapter that describes a model, and its pruning IR as a tree."""

from __future__ import annotations

import argparse
from typing import Any

from .inputs import check_model, load_model
from .options import MODEL_HELP, HelpFormatter, add_load_args, epilog
from .ui import EXIT_OK, UI, fmt_params


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        formatter_class=HelpFormatter,
        help="show the matched adapter and the model's pruning IR as a tree",
        description=(
            "Load MODEL and print which adapter describes it (with its match score, and the other adapters "
            "that also matched) and its pruning IR as a tree: total and block parameters, every block with "
            "its sublayers (unit ids, modules, pre-norms, parameters, channel groups, KV cache, residual "
            "edge) and the stages that are never removed. A model no family plugin covers is described by "
            "the built-in generic adapter (match score 1), which discovers blocks and sublayers with "
            "torch.export. --json prints the IR (ModelIR.model_dump()) plus the fingerprint, the selected "
            "match and every candidate."
        ),
        epilog=epilog("prunekit inspect smollm2-135m", "prunekit inspect ./my-llama --json"),
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_load_args(p)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace, ui: UI) -> int:
    from ..ir.plan import fingerprint
    from ..registry.plugins import rank_adapters
    from ..scoring.api import inspect

    check_model(args.model, tokenizer=False)  # inspecting needs no tokenizer
    model, _tok, _src = load_model(ui, args.model, args, tokenizer=False)
    ir = inspect(model)  # selects the best adapter (errors on no match or a tie)
    ranked = rank_adapters(model)
    fp = fingerprint(model, ir)
    if ui.json_mode:
        ui.emit_json(
            {
                **ir.model_dump(mode="json"),
                "block_params": ir.block_params(),
                "fingerprint": fp.model_dump(),
                "match": ranked[0].to_dict(),
                "candidates": [m.to_dict() for m in ranked],
            }
        )
        return EXIT_OK
    best, others = ranked[0], ranked[1:]
    also = "; also matched: " + ", ".join(f"{m.name} ({m.score:g})" for m in others) if others else ""
    ui.say(f"architecture: {ir.architecture} (model_type {ir.model_type})")
    ui.say(f"adapter:      {best.name} from plugin {best.plugin}, match score {best.score:g}{also}")
    ui.say(f"total params: {fmt_params(ir.total_params)}")
    share = ir.block_params() / ir.total_params if ir.total_params else 0.0
    ui.say(f"block params: {fmt_params(ir.block_params())} ({share:.1%} of total; the base of --ratio)")
    if len(ir.towers) > 1:
        for t in ir.towers:
            blocks = sum(b.params for b in t.blocks)
            hint = f" (--scope {t.name})" if t.blocks else " (stages only: nothing to remove)"
            ui.say(f"  tower {t.name}: {len(t.blocks)} blocks, {fmt_params(blocks)} block params{hint}")
        for c in ir.connections:
            ui.say(f"  {c.source} -> {c.target} at width {c.dim}")
    ui.say(f"fingerprint:  structure {fp.structure}, weights {fp.weights}")
    ui.table(_ir_tree(ir))
    return EXIT_OK


def _ir_tree(ir: Any) -> Any:
    """The IR as a rich Tree: towers, their stages in order around the blocks, sublayers under blocks."""
    from rich.markup import escape
    from rich.tree import Tree

    root = Tree(escape(f"{ir.architecture}  {fmt_params(ir.total_params)} params"))
    for tower in ir.towers:
        t = root.add(
            escape(
                f"tower {tower.name}: width {tower.width.size}, {len(tower.blocks)} blocks in {tower.blocks_path}"
            )
        )
        stages = list(tower.stages)
        late = [st for st in stages if st.kind in ("neck", "norm", "head")]
        for st in [st for st in stages if st not in late]:
            t.add(escape(_stage_line(st)))
        for b in tower.blocks:
            fixed = "" if b.removable else " (fixed)"
            node = t.add(escape(f"{b.id}  block{fixed}  {b.module}  {fmt_params(b.params)}"))
            for sub in b.sublayers:
                extra = [f"norm {sub.norm}"] if sub.norm else []
                extra += [f"parts {', '.join(sub.parts)}"] if sub.parts else []
                extra += [f"{g.kind} x{g.count}" for g in sub.channel_groups]
                extra += ["KV cache"] if sub.uses_cache else []
                extra += [f"edge {sub.residual.source}->{sub.residual.target}"]
                kind = sub.kind + ("" if sub.removable else " (fixed)")
                line = f"{sub.id}  {kind}  {sub.module}  {fmt_params(sub.params)}  [{'; '.join(extra)}]"
                node.add(escape(line))
        for st in late:
            t.add(escape(_stage_line(st)))
    return root


def _stage_line(st: Any) -> str:
    tied = f" (tied to {st.tied_to})" if st.tied_to else ""
    narrow = "; narrowed through " + ", ".join(f"{g.id} x{g.count}" for g in st.channel_groups)
    return (
        f"{st.id}  {st.kind}  {st.module}  {fmt_params(st.params)}{tied}  "
        f"(never removed{narrow if st.channel_groups else ''})"
    )
