"""The generic adapter of last resort: discovers a decoder's residual structure from its exported graph.

Any family plugin wins over it (it matches with the lowest score, :data:`MATCH_SCORE`). It exports the
model with :func:`torch.export.export` (non-strict, ``use_cache=False``) on a few tokens and reads the
graph:

- a *residual addition* is an ``aten.add`` whose two inputs and output hold the residual stream (last
  dimension ``hidden_size``, one vector per token; views and reshapes allowed), where one input (traced
  back through dtype casts, views, dropout and other aliases) is an ancestor of the other, and the other
  (the *branch*) ends in a child module of the module doing the addition. A branch that is itself a sum
  (``x + attn(ln1(x)) + mlp(ln2(x))``: GPT-NeoX, Falcon, StableLM parallel blocks) gives one sublayer per
  term, all on the same residual edge;
- ``nn_module_stack`` groups the nodes into modules: the module holding the addition must sit in an
  ``nn.ModuleList`` (that element is the block); the child module that produces the branch is the
  sublayer's module; the parameter-holding children between the stream and that module are its pre-norm
  (1-D parameters only) and its *parts* (``fc1`` when the branch ends in ``fc2``, as in OPT), removed with
  it when nothing else reads their output. A module two branches share (Falcon's single pre-norm) stays.

Blocks are removed by deleting them from the ``ModuleList``; branches by zero-contribution stand-ins
(:class:`~prunekit_core.surgery.apply.RemovedBranch`). Config fields, per-layer lists and KV-cache indices follow
through :class:`~prunekit_core.adapters.base.DecoderAdapter`, exactly as for the Llama plugin. Channel groups
(width pruning) are not discovered. A structure it cannot read raises
:class:`~prunekit_core.ir.errors.UnsupportedPatternError` naming the pattern.

What it discovers is written as the declared tables a family plugin would write (a
:class:`~prunekit_core.adapters.declared.LayoutSpec` and one :class:`~prunekit_core.adapters.declared.BranchSpec` per
branch), and its IR comes from the same :func:`~prunekit_core.adapters.declared.build_decoder_ir`. The discovery
is remembered per model structure, and, in this module (weakly keyed by the modules, nothing is set on
them), per model and per block, so the IR of a pruned model is rebuilt without exporting again.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import fx, nn

from ..ir.errors import UnsupportedPatternError
from ..ir.kinds import SublayerKind
from ..ir.model import ModelIR
from .base import (
    DecoderAdapter,
    RemovedBranch,
    count_params,
    get_module,
    hf_config,
    hf_model,
    iter_modules,
    module_attr,
    module_tensor,
)
from .declared import BranchSpec, LayoutSpec, build_decoder_ir

__all__ = ["MATCH_SCORE", "GenericAdapter"]

#: below every family plugin's score (10 for a structural match, 100 for an exact class match)
MATCH_SCORE = 1.0
#: tokens in the traced input; small, and unlikely to equal a model dimension
_SEQ = 5
#: ops that forward a value unchanged for our purposes (dtype casts, views, aliases, eval-mode dropout)
_ALIASES = frozenset(
    {
        "to",
        "_to_copy",
        "clone",
        "alias",
        "view",
        "reshape",
        "_unsafe_view",
        "contiguous",
        "detach",
        "dropout",
        "type_as",
        "lift_fresh_copy",
        "flatten",
        "unflatten",
    }
)
_ADDS = frozenset({"add", "add_"})
#: what one block holds: each branch, with the class name of its module when it was discovered
_Found = tuple[tuple[BranchSpec, str], ...]
_CACHE: OrderedDict[tuple[Any, ...], tuple[LayoutSpec, list[_Found]]] = OrderedDict()
_CACHE_SIZE = 16
#: the layout discovered for a model, and the branches discovered for each of its blocks, by module;
#: weak keys: an entry lives as long as the module and never travels with it (copies discover anew)
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, LayoutSpec] = weakref.WeakKeyDictionary()
_BLOCKS: weakref.WeakKeyDictionary[nn.Module, _Found] = weakref.WeakKeyDictionary()


class GenericAdapter(DecoderAdapter):
    """Discovers blocks and sublayers of a decoder-only model no plugin describes (see the module doc)."""

    name = "generic"
    description = (
        "any decoder-only causal LM, discovered with torch.export (last resort: block/sublayer only)"
    )

    def match(self, model: nn.Module) -> float | None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "get_text_config"):
            return None
        n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
        if not isinstance(n, int) or not callable(getattr(model, "get_input_embeddings", None)):
            return None
        head = getattr(model, "get_output_embeddings", None)
        if not callable(head) or head() is None:
            return None  # a backbone without a language-model head: nothing here describes its output
        if any(isinstance(m, nn.ModuleList) and len(m) == n for m in model.modules()):
            return MATCH_SCORE
        return None

    def build_ir(self, model: nn.Module) -> ModelIR:
        layout, found = discover_layout(model)
        branches = [tuple(spec for spec, _type in block) for block in found]
        return build_decoder_ir(
            model, adapter=self.name, layout=layout, branches=branches, text_config=self.text_config(model)
        )


# --- remembering discoveries -------------------------------------------------------------------------


def discover_layout(model: nn.Module) -> tuple[LayoutSpec, list[_Found]]:
    """The model's layout and each block's branches (as the generic adapter reads them; the new-plugin
    scaffold writes them out as tables): remembered for these modules, else discovered."""
    layout = _LAYOUTS.get(model)
    if layout is not None:
        container = _get_or_none(model, layout.blocks)
        if isinstance(container, nn.ModuleList) and all(_still_valid(b) for b in container):
            return layout, [_BLOCKS[b] for b in container]
    key = _signature(model)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        layout, branches = _CACHE[key]
    else:
        layout, branches = _discover_shallow(model) if _is_empty(model) else _discover(model)
        _CACHE[key] = (layout, branches)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _LAYOUTS[model] = layout
    for block, found in zip(iter_modules(get_module(model, layout.blocks)), branches, strict=True):
        _BLOCKS[block] = found
    return layout, branches


def _still_valid(block: nn.Module) -> bool:
    found = _BLOCKS.get(block)
    if found is None:
        return False
    for spec, module_type in found:
        module = _get_or_none(block, spec.module)
        if module is None or not (isinstance(module, RemovedBranch) or type(module).__name__ == module_type):
            return False
    return True


def _get_or_none(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_module(root, path)
    except AttributeError:
        return None


def _signature(model: nn.Module) -> tuple[Any, ...]:
    config: Any = getattr(model, "config", None)
    return (
        type(model).__module__,
        type(model).__qualname__,
        config.to_json_string() if hasattr(config, "to_json_string") else repr(config),
        tuple((n, type(m).__name__) for n, m in model.named_modules()),
        tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()),
    )


# --- discovery ---------------------------------------------------------------------------------------


@dataclass
class _Term:
    node: fx.Node
    child: str  # the child module of the adding module that produces it
    in_place: bool  # the caller adds into this value in place
    scale: float | None = None  # a constant the adding module multiplies the child's output by


@dataclass
class _Addition:
    node: fx.Node
    owner: str  # the module whose forward does the addition
    residual: fx.Node
    terms: list[_Term]


def _op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else getattr(target, "__name__", "")


def _stack(node: fx.Node) -> list[str]:
    return [path.split("@")[0] for path, _type in (node.meta.get("nn_module_stack") or {}).values()]


def _deepest(node: fx.Node) -> str:
    stack = _stack(node)
    return stack[-1] if stack else ""


def _child_of(owner: str, node: fx.Node) -> str | None:
    """The direct child of ``owner`` whose forward computed ``node`` (``None``: ``owner`` itself did)."""
    prefix = owner + "." if owner else ""
    for path in _stack(node):
        if path.startswith(prefix) and path != owner:
            return prefix + path[len(prefix) :].split(".")[0]
    return None


class _Graph:
    def __init__(self, graph: fx.Graph, hidden: int, tokens: int) -> None:
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.hidden = hidden
        self.tokens = tokens

    def is_stream(self, node: Any) -> TypeGuard[fx.Node]:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return (
            isinstance(val, torch.Tensor)
            and val.dim() >= 1
            and val.shape[-1] == self.hidden
            and val.numel() == self.tokens * self.hidden
        )

    def root(self, node: fx.Node) -> fx.Node:
        """Follow casts, views and aliases back to the value they forward."""
        while node.op == "call_function" and _op_name(node) in _ALIASES:
            src = node.args[0] if node.args else None
            if not isinstance(src, fx.Node) or not self.is_stream(src) or not self.is_stream(node):
                break
            node = src
        return node

    def ancestors(self, node: fx.Node, floor: fx.Node) -> set[fx.Node]:
        """``node`` and everything it depends on, down to (and including) ``floor``'s position."""
        stop = self.index[floor]
        seen = {node}
        todo = [node]
        while todo:
            for src in todo.pop().all_input_nodes:
                if src not in seen and self.index[src] >= stop:
                    seen.add(src)
                    todo.append(src)
        return seen

    def path(self, start: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes that depend on ``start`` and that ``end`` depends on, in graph order."""
        up = self.ancestors(end, start)
        if start not in up:
            return []
        on = {start}
        for n in sorted(up, key=self.index.__getitem__):
            if n is not start and any(src in on for src in n.all_input_nodes):
                on.add(n)
        return sorted(on, key=self.index.__getitem__)


def _is_empty(model: nn.Module) -> bool:
    emb = (
        hf_model(model).get_input_embeddings()
        if callable(getattr(model, "get_input_embeddings", None))
        else None
    )
    return (
        emb is not None and getattr(emb, "weight", None) is not None and module_tensor(emb, "weight").is_meta
    )


#: blocks of the real copy an empty (meta-device) model is discovered on
_SHALLOW = 2


def _discover_shallow(model: nn.Module) -> tuple[LayoutSpec, list[_Found]]:
    """Discovery for an empty skeleton (streaming): trace a real copy with :data:`_SHALLOW` blocks, the
    same config otherwise, and give every block of ``model`` the branches found in the copy's first block.

    Blocks whose modules differ from the copy's (heterogeneous stacks) are refused.
    """
    import copy

    cls = type(model).__name__
    config = copy.deepcopy(hf_config(model))
    text = config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    text.num_hidden_layers = min(n, _SHALLOW)
    for attr in ("layer_types", "mlp_layer_types"):
        if isinstance(getattr(text, attr, None), list):
            setattr(text, attr, getattr(text, attr)[: text.num_hidden_layers])
    with torch.device("cpu"):
        small = type(model)(config).eval()
    layout, small_branches = _discover(small)
    del small
    branches = [small_branches[0]] * n
    for i, block in enumerate(iter_modules(get_module(model, layout.blocks))):
        for spec, module_type in branches[i]:
            module = _get_or_none(block, spec.module)
            if module is None or type(module).__name__ != module_type:
                raise UnsupportedPatternError(
                    cls,
                    f"block {i} differs from block 0 ({spec.module}), so the branches of an empty (streaming) "
                    "skeleton cannot be discovered on a shallow copy: score this model in memory",
                )
    return layout, branches


def _discover(model: nn.Module) -> tuple[LayoutSpec, list[_Found]]:
    cls = type(model).__name__
    config = hf_config(model).get_text_config(decoder=True)
    emb = hf_model(model).get_input_embeddings()
    hidden = int(getattr(config, "hidden_size", 0) or module_attr(emb, "embedding_dim"))
    vocab = int(getattr(config, "vocab_size", 0) or module_attr(emb, "num_embeddings"))
    device = module_tensor(emb, "weight").device
    ids = (torch.arange(_SEQ, device=device) % max(vocab - 3, 1) + min(3, vocab - 1)).unsqueeze(0)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    was_training = model.training
    model.eval()  # dropout off: eval-mode dropout is an alias the tracing follows
    try:
        outputs = _module_outputs(model, kwargs)
        exported = torch.export.export(model, (), kwargs, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedPatternError(
            cls, f"torch.export could not trace its forward ({type(exc).__name__}: {first[:200]})"
        ) from exc
    finally:
        model.train(was_training)
    g = _Graph(exported.graph, hidden, _SEQ)
    additions = _residual_additions(g, model, cls)
    if not additions:
        raise UnsupportedPatternError(
            cls,
            f"no residual addition x + f(x) over a stream of width {hidden} was found in the exported graph "
            "(a model without skip connections has no branch to remove)",
        )
    blocks_path, by_block = _group_blocks(model, additions, cls)
    container = list(iter_modules(get_module(model, blocks_path)))
    if len(container) != config.num_hidden_layers:
        raise UnsupportedPatternError(
            cls,
            f"the blocks sit in {blocks_path} ({len(container)} modules), but config.num_hidden_layers is "
            f"{config.num_hidden_layers}",
        )
    branches = []
    for i, block in enumerate(container):
        block_path = f"{blocks_path}.{i}"
        branches.append(
            _block_branches(g, model, block, block_path, by_block.get(block_path, []), outputs, cls)
        )
    return _layout(g, model, blocks_path, additions, cls), branches


def _module_outputs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, tuple[bool, bool]]:
    """Per module path: (returns a tuple, output shape equals first-input shape), from one eager run."""
    seen: dict[str, tuple[bool, bool]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def record(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kw.get("hidden_states")
            y = out[0] if isinstance(out, tuple) and out else out
            same = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
            seen.setdefault(name, (isinstance(out, tuple), same))

        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _residual_additions(g: _Graph, model: nn.Module, cls: str) -> list[_Addition]:
    found: list[_Addition] = []
    by_node: dict[fx.Node, _Addition] = {}
    for n in g.nodes:
        if n.op != "call_function" or _op_name(n) not in _ADDS or len(n.args) < 2 or n.kwargs.get("alpha"):
            continue
        a, b = n.args[0], n.args[1]
        if not (g.is_stream(a) and g.is_stream(b) and g.is_stream(n)):
            continue
        ra, rb = g.root(a), g.root(b)
        owner = _deepest(n)
        extended = None
        if ra in g.ancestors(b, ra):
            residual, branch = ra, b
        elif rb in g.ancestors(a, rb):
            residual, branch = rb, a
        else:
            # (x + attn(ln(x))) + mlp(ln(x)): a parallel branch added to an addition of the same stream
            for prev, other in ((by_node.get(ra), b), (by_node.get(rb), a)):
                if (
                    prev is not None
                    and prev.owner == owner
                    and prev.residual in g.ancestors(other, prev.residual)
                ):
                    extended, residual, branch = prev, prev.residual, other
                    break
            else:
                continue  # two independent values (token + position embeddings, or two parallel branches)
        terms = _terms(g, model, branch, owner, residual, in_place=False)
        for t in terms:
            if t.child is None:
                raise UnsupportedPatternError(
                    cls,
                    f"the residual addition `{n.name}` in {owner or 'the top-level model'} adds a value that "
                    f"{owner or 'the model'} computes itself with `{t.node.target}` (a gate or a learned "
                    "scale on the branch; a constant multiplier is understood), not the output of a child module",
                )
        terms = [t for t in terms if not isinstance(get_module(model, t.child), RemovedBranch)]
        if extended is not None:
            extended.terms += terms
            extended.node = n
            by_node[n] = extended
        elif terms:
            found.append(_Addition(node=n, owner=owner, residual=residual, terms=terms))
            by_node[n] = found[-1]
    # a residual addition inside a branch (a nested skip connection) belongs to that branch
    branch_modules = {t.child for a in found for t in a.terms}
    return [a for a in found if not any(a.owner.startswith(m + ".") or a.owner == m for m in branch_modules)]


def _terms(
    g: _Graph, model: nn.Module, value: fx.Node, owner: str, residual: fx.Node, *, in_place: bool
) -> list[_Term]:
    """Split a branch value into the child-module outputs it sums (parallel branches)."""
    r = g.root(value)
    if (
        r is not residual
        and r.op == "call_function"
        and _op_name(r) in _ADDS
        and _deepest(r) == owner
        and len(r.args) >= 2
        and g.is_stream(r.args[0])
        and g.is_stream(r.args[1])
    ):
        inplace = _op_name(r) == "add_"
        return _terms(g, model, r.args[0], owner, residual, in_place=inplace) + _terms(
            g, model, r.args[1], owner, residual, in_place=False
        )
    r, scale = _peel_scale(g, r, owner)
    # child is None where owner computes the value itself: _residual_additions refuses such a term at once
    return [
        _Term(node=r, child=_child_of(owner, r), in_place=in_place, scale=scale)  # type: ignore[arg-type]  # see above
    ]


def _peel_scale(g: _Graph, node: fx.Node, owner: str) -> tuple[fx.Node, float | None]:
    """``node`` without the constant multipliers ``owner`` applies to it (Granite's ``residual_multiplier``:
    ``residual + out * 0.22``), and their product (``None``: there were none)."""
    scale: float | None = None
    while node.op == "call_function" and _op_name(node) in ("mul", "div") and _deepest(node) == owner:
        if len(node.args) != 2:
            break
        a, b = node.args
        if _op_name(node) == "mul" and _is_number(a) and isinstance(b, fx.Node):
            a, b = b, a
        if not (isinstance(a, fx.Node) and g.is_stream(a) and _is_number(b)):
            break
        c = float(b)  # type: ignore[arg-type]  # _is_number above
        if _op_name(node) == "div":
            if c == 0:
                break
            c = 1.0 / c
        scale = c if scale is None else scale * c
        node = g.root(a)
    return node, scale


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _group_blocks(
    model: nn.Module, additions: list[_Addition], cls: str
) -> tuple[str, dict[str, list[_Addition]]]:
    by_block: dict[str, list[_Addition]] = {}
    for a in additions:
        block = _enclosing_block(model, a.owner)
        if block is None:
            raise UnsupportedPatternError(
                cls,
                f"the residual addition `{a.node.name}` in {a.owner or 'the top-level model'} is not inside a "
                "block of an nn.ModuleList, so there is no block to delete",
            )
        if a.owner != block:
            raise UnsupportedPatternError(
                cls,
                f"the residual addition `{a.node.name}` happens inside {a.owner}, a module within block "
                f"{block} that receives the residual as an input, so no stand-in can remove its branch alone "
                "(the Bloom pattern)",
            )
        by_block.setdefault(block, []).append(a)
    containers = sorted({b.rpartition(".")[0] for b in by_block})
    if len(containers) > 1:
        raise UnsupportedPatternError(
            cls,
            f"residual blocks sit in more than one nn.ModuleList ({', '.join(containers)}); the generic "
            "adapter describes one stack of blocks",
        )
    return containers[0], by_block


def _enclosing_block(model: nn.Module, owner: str) -> str | None:
    parts = owner.split(".") if owner else []
    for k in range(len(parts), 0, -1):
        if parts[k - 1].isdigit() and isinstance(
            _get_or_none(model, ".".join(parts[: k - 1])), nn.ModuleList
        ):
            return ".".join(parts[:k])
    return None


def _block_branches(
    g: _Graph,
    model: nn.Module,
    block: nn.Module,
    block_path: str,
    additions: list[_Addition],
    outputs: dict[str, tuple[bool, bool]],
    cls: str,
) -> _Found:
    module_nodes: dict[str, set[fx.Node]] = {}
    for n in g.nodes:
        for p in _stack(n):
            if p.startswith(block_path + "."):
                module_nodes.setdefault(p, set()).add(n)
    rel = len(block_path) + 1
    raw: list[tuple[int, _Term, str, str | None, tuple[str, ...], tuple[str, ...], fx.Node]] = []
    for edge, add in enumerate(additions):
        for term in add.terms:
            on_path = g.path(add.residual, term.node)
            if not on_path:
                raise UnsupportedPatternError(
                    cls, f"the branch added by `{add.node.name}` in {add.owner} does not depend on the stream"
                )
            # what the module outputs may flow into: this branch, and from its end on to the addition
            path_set = set(on_path) | set(g.path(term.node, add.node))
            order: list[str] = []
            for n in on_path[1:]:  # on_path[0] is the stream value itself, whoever computed it
                c = _child_of(add.owner, n)
                if c and c not in order and count_params([get_module(model, c)]) > 0:
                    order.append(c)
            main = term.child
            if main not in order:
                raise UnsupportedPatternError(
                    cls,
                    f"the branch added by `{add.node.name}` in {add.owner} ends in {main}, which holds no "
                    "parameters; there is nothing to remove",
                )
            # a norm that ends the branch is its post-norm (Gemma 2/3, OLMo2): the branch is the module
            # before it, and the norm belongs to the branch (counted and removed with it)
            post: list[str] = []
            while order.index(main) > 0 and _is_norm(get_module(model, main)):
                post.insert(0, main)
                main = order[order.index(main) - 1]

            # nodes of the post modules read the branch's output (a dtype check) without being on the path
            inside = path_set.union(*(module_nodes.get(p, set()) for p in post))

            def exclusive(c: str, inside: set[fx.Node] = inside) -> bool:
                own = module_nodes.get(c, set())
                return all(u in inside or u in own for n in own for u in n.users)

            for m in (main, *post):
                if not exclusive(m):
                    raise UnsupportedPatternError(
                        cls,
                        f"the output of {m} is read outside the branch that `{add.node.name}` adds, so a "
                        "zero stand-in would change more than that branch",
                    )
            others = [c for c in order if c != main and c not in post and exclusive(c)]
            norm = None
            if others and others[0] == order[0] and _is_norm(get_module(model, others[0])):
                norm = others.pop(0)
            # the branch module's own output: the last node on the path that it computed
            last = [n for n in on_path if _child_of(add.owner, n) == main][-1] if post else term.node
            raw.append((edge, term, main, norm, tuple(others), tuple(post), last))
    raw.sort(key=lambda r: (r[0], g.index[r[1].node]))  # parallel branches in the order they run
    kinds = [_kind(get_module(model, r[2])) for r in raw]
    branches = []
    for (edge, term, main, norm, parts, posts, last), kind in zip(raw, kinds, strict=True):
        module = get_module(model, main)
        name = "attn" if kind == "attention" else "mlp"
        if kinds.count(kind) > 1:
            name = main.rpartition(".")[2]
        is_tuple, same_shape = outputs.get(main, (False, False))
        if term.in_place and not same_shape:
            raise UnsupportedPatternError(
                cls,
                f"{term.child}'s output is added into in place, but its output shape differs from its input "
                "shape, so no zero stand-in can take its place",
            )
        out_proj = _out_proj(model, main, last)
        spec = BranchSpec(
            name=name,
            kind=kind,
            module=main[rel:],
            norm=norm[rel:] if norm else None,
            output="tuple" if is_tuple else "tensor",
            uses_cache=_has_cache_slot(module),
            edge=edge,
            parts=tuple(p[rel:] for p in parts),
            full_zero=term.in_place,
            out_proj=out_proj[rel:] if out_proj else None,
            post=tuple(p[rel:] for p in posts),
            # no writer found: what stands between the branch's last linear map and the add is unknown
            post_kind=None if out_proj or posts else "opaque",
            scale=term.scale,
        )
        branches.append((spec, type(module).__name__))
    return tuple(branches)


def _out_proj(model: nn.Module, main: str, node: fx.Node) -> str | None:
    """The nn.Linear inside the branch module ``main`` that computes its output ``node``, if one does."""
    path = _deepest(node)
    inside = path == main or path.startswith(main + ".")
    return path if inside and isinstance(_get_or_none(model, path), nn.Linear) else None


def _is_norm(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.dim() == 1 for p in params)


def _has_cache_slot(module: nn.Module) -> bool:
    return any(
        isinstance(getattr(m, "layer_idx", None), int) and not isinstance(m.layer_idx, bool)
        for m in module.modules()
    )


def _kind(module: nn.Module) -> SublayerKind:
    name = type(module).__name__.lower()
    return "attention" if _has_cache_slot(module) or "attention" in name or "attn" in name else "mlp"


def _layout(
    g: _Graph, model: nn.Module, blocks_path: str, additions: list[_Addition], cls: str
) -> LayoutSpec:
    embed_path = _path_of(model, hf_model(model).get_input_embeddings())
    if embed_path is None:
        raise UnsupportedPatternError(cls, "get_input_embeddings() is not a submodule of the model")
    head = (
        hf_model(model).get_output_embeddings()
        if callable(getattr(model, "get_output_embeddings", None))
        else None
    )
    head_path = _path_of(model, head) if head is not None else None
    # the final norm: the first parameter-holding module outside the blocks that reads the last stream
    last = max((a.node for a in additions), key=g.index.__getitem__)
    final_norm = None
    frontier = {last}
    for n in g.nodes[g.index[last] + 1 :]:
        if not any(src in frontier for src in n.all_input_nodes):
            continue
        frontier.add(n)
        owner = _deepest(n)
        if owner and not owner.startswith(blocks_path + ".") and owner != head_path:
            module = _get_or_none(model, owner)
            if module is not None and _is_norm(module):
                final_norm = owner
                break
        if owner and owner == head_path:
            break
    taken = [blocks_path, embed_path] + [p for p in (head_path, final_norm) if p]
    others: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(path == t or path.startswith(t + ".") for t in taken + [o for o, _ in others]):
            continue
        others.append((path, "embedding" if isinstance(module, nn.Embedding) else "other"))
    return LayoutSpec(
        blocks=blocks_path, embed=embed_path, final_norm=final_norm, head=head_path, others=tuple(others)
    )


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    path: str
    for path, m in model.named_modules():
        if m is module:
            return path
    return None
