"""Export a pruned model as a GGUF file that llama.cpp runs, heterogeneous layers included.

What callers may rely on:

* :func:`export_gguf` reads a :func:`~prunekit_core.io.checkpoint.save_pruned` folder (with
  :func:`~prunekit_core.io.checkpoint.load_pruned`, so removed sublayers and per-layer widths come back) and
  writes one GGUF file atomically (:func:`~prunekit_core.io.atomic.atomic_path`): a killed export leaves
  no file at ``out``.
* The family's tensor names come from a :class:`GGUFLayout` that a plugin returns from the
  ``prunekit_gguf_layout`` hook (the Llama plugin: Llama and Mistral; the Mixtral plugin: Mixtral). The
  core names no family.
* Every layer alike (whole-block plans, one width everywhere) -> llama.cpp's plain ``llama``
  architecture. Per-layer head, KV-head or FFN widths, or removed attention or MLP sublayers -> ``deci``
  (llama.cpp's architecture for Llama-3.1-Nemotron-51B, which reads per-layer arrays and has layers with
  no attention). Two llama.cpp facts shape what is written for ``deci`` (its ``src/models/deci.cpp``):

  - a layer whose FFN length is 0 is skipped *whole* (its attention too), so a removed MLP under a kept
    attention is written as a zero FFN of :data:`STANDIN_FFN` channels whose down projection is 0: it adds
    exactly nothing;
  - the head size is read from layer 0's head count, so a removed attention in layer 0 is written as one
    head whose output projection is 0 (exactly nothing again).

  Both stand-ins are listed in :attr:`GGUFExport.standins`; they cost ``3 * 32 * hidden`` and
  ``4 * head_dim * hidden`` parameters per layer.
* Anything llama.cpp cannot represent raises :class:`GGUFExportError` naming the unit and the reason:
  a parameter the layout does not place (a bias a repair added, a norm llama.cpp has no slot for), MoE with
  per-layer expert counts or widths, removed sublayers in a MoE model, a rope scaling llama.cpp's
  ``llama`` graph does not take.
* ``--type``: ``f32``, ``f16``, ``bf16`` and the block types the ``gguf`` package quantizes (``q8_0``,
  ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``), with the rules of llama.cpp's own converter: 1-D tensors (norms)
  and the MoE router stay f32; a 2-D tensor whose rows are not a multiple of the block size falls back to
  f16. :func:`prunekit_core.quant.ggml.tensor_type` is that rule, and the size accountant's GGUF formats
  (:mod:`prunekit_core.quant.builtin_formats`) count bits with it.
* The tokenizer (byte-level BPE: Llama 3, SmolLM, Qwen2, GPT-2 families) goes in with its merges, special
  tokens and chat template (the ``gguf`` package's ``SpecialVocab``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import RemovedBranch, get_module, hf_model
from ..ir.errors import PrunekitError
from ..quant.ggml import GGML_TYPES, qtype, quantize, tensor_type
from .atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "GGUF_TYPES",
    "STANDIN_FFN",
    "GGUFExport",
    "GGUFExportError",
    "GGUFLayout",
    "export_gguf",
    "write_gguf",
]

#: the ``--type`` names (:data:`prunekit_core.quant.ggml.GGML_TYPES`)
GGUF_TYPES = GGML_TYPES
#: FFN channels of the zero stand-in for a removed MLP under a kept attention (one quantization block)
STANDIN_FFN = 32


class GGUFExportError(PrunekitError):
    """A model or plan that llama.cpp cannot represent, or an export request that cannot be met."""


@dataclass(frozen=True)
class GGUFLayout:
    """How a decoder family's modules map onto llama.cpp's Llama graph (declared tables).

    Module paths are relative to the model returned by ``hf_model``; parameter names inside a block are
    relative to the block. ``tensors`` maps each block parameter to its GGUF name (``attn_q`` ->
    ``blk.N.attn_q.weight``); ``q``/``k`` are permuted to llama.cpp's rotary layout (the permutation of
    llama.cpp's ``convert_hf_to_gguf.py`` for Llama). A MoE family names its router and its fused expert
    tensors (transformers 5's ``experts.gate_up_proj`` [E, 2F, H] and ``experts.down_proj`` [E, H, F]).
    """

    name: str
    arch: str = "llama"
    #: the architecture for per-layer widths and removed sublayers (``None``: the family has none)
    heterogeneous_arch: str | None = "deci"
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm.weight"
    ffn_norm: str = "post_attention_layernorm.weight"
    q: str = "self_attn.q_proj.weight"
    k: str = "self_attn.k_proj.weight"
    v: str = "self_attn.v_proj.weight"
    o: str = "self_attn.o_proj.weight"
    gate: str | None = "mlp.gate_proj.weight"
    up: str | None = "mlp.up_proj.weight"
    down: str | None = "mlp.down_proj.weight"
    router: str | None = None
    experts_gate_up: str | None = None
    experts_down: str | None = None


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    arch: str
    type: str
    layers: int
    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]
    #: ``blk.N.attn`` / ``blk.N.ffn`` written as exact zero stand-ins (see the module docstring)
    standins: list[str] = field(default_factory=list)
    #: bytes of tensor data, by GGUF tensor name
    tensor_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "arch": self.arch,
            "type": self.type,
            "layers": self.layers,
            "head_count": self.head_count,
            "head_count_kv": self.head_count_kv,
            "feed_forward_length": self.feed_forward_length,
            "standins": self.standins,
            "tensor_bytes": sum(self.tensor_bytes.values()),
        }


def find_layout(model: nn.Module) -> GGUFLayout:
    """The :class:`GGUFLayout` an installed plugin gives for ``model``."""
    from ..registry.plugins import gguf_layouts

    found = [x for x in gguf_layouts(model) if isinstance(x, GGUFLayout)]
    if not found:
        raise GGUFExportError(
            f"no installed plugin describes {type(model).__name__} for GGUF export. prunekit exports the "
            "families whose plugin implements the prunekit_gguf_layout hook (Llama and Mistral: "
            "pip install -e plugins/llama; Mixtral: pip install -e plugins/mixtral)"
        )
    return found[0]


def _rotary_order(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a Q or K projection reordered from Hugging Face's half-split rotary layout to llama.cpp's
    interleaved one (``LlamaModel.permute`` in llama.cpp's converter), head by head."""
    heads = w.shape[0] // head_dim
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Layer:
    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict[str, torch.Tensor]


def _check_config(cfg: Any, layout: GGUFLayout) -> None:
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"hidden_act {act!r}: llama.cpp's {layout.arch} graph applies SiLU only")
    rope = getattr(cfg, "rope_scaling", None) or {}
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = (rope.get("rope_type") or rope.get("type") or params.get("rope_type") or "default").lower()
    if rope_type not in ("default", "linear"):
        raise GGUFExportError(
            f"rope scaling {rope_type!r} is not written by prunekit's GGUF export yet (default and linear "
            "are); convert the unpruned model's rope settings with llama.cpp's convert_hf_to_gguf.py"
        )


class _Taker:
    """Moves a block's parameters to their GGUF names and remembers which it used."""

    def __init__(self, params: dict[str, torch.Tensor], unit: str) -> None:
        self.params, self.unit = params, unit
        self.used: set[str] = set()
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str | None, gguf_name: str) -> torch.Tensor:
        if name is None or name not in self.params:
            raise GGUFExportError(f"{self.unit}: no parameter {name!r}, which llama.cpp's {gguf_name} needs")
        self.used.add(name)
        self.tensors[gguf_name] = self.params[name].detach()
        return self.tensors[gguf_name]


def _layers(model: nn.Module, layout: GGUFLayout, head_dim: int) -> tuple[list[_Layer], list[str]]:
    """Each kept block as llama.cpp sees it, and the stand-ins written for it."""
    root = hf_model(model)
    blocks: list[nn.Module] = list(get_module(root, layout.blocks).children())
    hidden = int(root.config.hidden_size)
    out: list[_Layer] = []
    standins: list[str] = []
    for i, block in enumerate(blocks):
        params: dict[str, torch.Tensor] = dict(block.named_parameters())
        attn_gone = isinstance(get_module(block, layout.attention), RemovedBranch)
        mlp_gone = isinstance(get_module(block, layout.mlp), RemovedBranch)
        unit = f"{layout.blocks}.{i}"
        if attn_gone and mlp_gone:
            continue  # an empty block adds nothing: leave it out
        take = _Taker(params, unit)
        t = take.tensors
        n_head = n_kv = n_ff = 0
        if not attn_gone:
            take(layout.attn_norm, "attn_norm")
            q, k = take(layout.q, "attn_q"), take(layout.k, "attn_k")
            take(layout.v, "attn_v")
            take(layout.o, "attn_output")
            n_head, n_kv = q.shape[0] // head_dim, k.shape[0] // head_dim
            t["attn_q"], t["attn_k"] = _rotary_order(q, head_dim), _rotary_order(k, head_dim)
        if not mlp_gone:
            take(layout.ffn_norm, "ffn_norm")
            if layout.router is not None:
                take(layout.router, "ffn_gate_inp")
                gate_up = take(layout.experts_gate_up, "experts_gate_up")
                del t["experts_gate_up"]
                n_ff = gate_up.shape[1] // 2
                t["ffn_gate_exps"], t["ffn_up_exps"] = gate_up[:, :n_ff], gate_up[:, n_ff:]
                take(layout.experts_down, "ffn_down_exps")
            else:
                gate = take(layout.gate, "ffn_gate")
                take(layout.up, "ffn_up")
                take(layout.down, "ffn_down")
                n_ff = gate.shape[0]
        extra = sorted(n for n, p in params.items() if n not in take.used and p.numel())
        if extra:
            raise GGUFExportError(
                f"{unit}: llama.cpp's Llama graph has no place for {', '.join(extra)} (a bias, scale or "
                "module the plan or its repair added); export a plan without it, e.g. prune with --repair none"
            )
        if mlp_gone:
            n_ff = STANDIN_FFN  # deci skips a layer whose FFN length is 0 whole: a zero FFN instead
            dtype = t["attn_q"].dtype
            t["ffn_norm"] = torch.ones(hidden, dtype=dtype)
            t["ffn_gate"] = torch.zeros(n_ff, hidden, dtype=dtype)
            t["ffn_up"] = torch.zeros(n_ff, hidden, dtype=dtype)
            t["ffn_down"] = torch.zeros(hidden, n_ff, dtype=dtype)
            standins.append(f"blk.{len(out)}.ffn")
        if attn_gone and not out:
            # deci reads the head size from layer 0's head count: one head whose output is exactly zero
            n_head = n_kv = 1
            dtype = t["ffn_norm"].dtype
            t["attn_norm"] = torch.ones(hidden, dtype=dtype)
            for name in ("attn_q", "attn_k", "attn_v"):
                t[name] = torch.zeros(head_dim, hidden, dtype=dtype)
            t["attn_output"] = torch.zeros(hidden, head_dim, dtype=dtype)
            standins.append("blk.0.attn")
        out.append(_Layer(n_head, n_kv, n_ff, t))
    return out, standins


def _first_difference(layers: list[_Layer]) -> str:
    first = layers[0]
    for i, layer in enumerate(layers):
        for what in ("n_head", "n_head_kv", "n_ff"):
            if getattr(layer, what) != getattr(first, what):
                return f"layer {i} has {what}={getattr(layer, what)}, layer 0 has {getattr(first, what)}"
    return "a removed sublayer"


def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    type: str = "f16",  # noqa: A002 - the CLI's --type
    overwrite: bool = False,
) -> GGUFExport:
    """Write the pruned model in ``checkpoint`` (a :func:`save_pruned` folder) as GGUF to ``out``."""
    from .checkpoint import check_parents, load_pruned, make_parents, remove_made

    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise GGUFExportError(f"{out} already exists; choose another --out or pass --force")
    if out.is_dir():
        raise GGUFExportError(f"{out} is a folder; --out names the .gguf file to write")
    check_parents(out)
    model = load_pruned(checkpoint, dtype=torch.float32)
    tokenizer = _tokenizer(Path(checkpoint))
    made = make_parents(out)
    try:
        return write_gguf(model, tokenizer, out, type=type, source=Path(checkpoint))
    except BaseException:
        remove_made(made)  # nothing is left behind: not the file, not the folders made for it
        raise


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    type: str = "f16",  # noqa: A002 - the CLI's --type
    source: Path | None = None,
) -> GGUFExport:
    """Write an in-memory (pruned) ``model`` and its ``tokenizer`` as GGUF to ``out``, atomically."""
    import gguf

    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    layout = find_layout(model)
    root = hf_model(model)
    cfg = root.config
    _check_config(cfg, layout)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads)
    layers, standins = _layers(model, layout, head_dim)
    if not layers:
        raise GGUFExportError("every block is removed: there is no model left to export")
    uniform = not standins and all(
        (x.n_head, x.n_head_kv, x.n_ff) == (layers[0].n_head, layers[0].n_head_kv, layers[0].n_ff)
        for x in layers
    )
    removed_any = any(x.n_head == 0 for x in layers)
    uniform = uniform and not removed_any
    arch = layout.arch
    if not uniform:
        if layout.heterogeneous_arch is None or layout.router is not None:
            raise GGUFExportError(
                f"{layout.name}: {_first_difference(layers)}; llama.cpp runs {layout.name} only with every "
                "layer alike (MoE layers have no per-layer form in llama.cpp). Prune whole blocks, or one "
                "width for every layer"
            )
        arch = layout.heterogeneous_arch
    n_experts = 0
    if layout.router is not None:
        counts = {x.tensors["ffn_gate_inp"].shape[0] for x in layers}
        if len(counts) != 1:
            raise GGUFExportError(
                f"{layout.name}: expert counts differ between layers ({sorted(counts)}); llama.cpp takes one "
                "expert count for every layer. Prune the same number of experts in each layer"
            )
        n_experts = counts.pop()

    params_dict = dict(root.named_parameters(remove_duplicate=False))
    embed = params_dict[layout.embed].detach()
    head = params_dict.get(layout.head)
    tied = head is None or head.data_ptr() == embed.data_ptr()
    vocab_size = int(embed.shape[0])

    writer_path = Path(out)
    with atomic_path(writer_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(str(getattr(cfg, "_name_or_path", "") or (source.name if source else "pruned")))
        w.add_block_count(len(layers))
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        heads = [x.n_head for x in layers]
        kv = [x.n_head_kv for x in layers]
        ffn = [x.n_ff for x in layers]
        if uniform:
            w.add_head_count(heads[0])
            w.add_head_count_kv(kv[0])
            w.add_feed_forward_length(ffn[0])
        else:
            w.add_head_count(heads)
            w.add_head_count_kv(kv)
            w.add_feed_forward_length(ffn)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
            "rope_theta"
        )
        if theta is not None:
            w.add_rope_freq_base(float(theta))
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        if (rope.get("rope_type") or rope.get("type")) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(vocab_size)
        if n_experts:
            w.add_expert_count(n_experts)
            w.add_expert_used_count(int(cfg.num_experts_per_tok))
        w.add_file_type(_file_type(type))
        _add_vocab(w, tokenizer, vocab_size, source)

        tensor_bytes: dict[str, int] = {}

        def put(name: str, t: torch.Tensor, *, router: bool = False) -> None:
            kind = tensor_type(type, tuple(t.shape), router=router)
            data = quantize(t.detach().to(torch.float32).cpu().numpy(), kind)
            w.add_tensor(name, data, raw_dtype=qtype(kind) if kind not in ("f32", "f16") else None)
            tensor_bytes[name] = int(data.nbytes)

        put("token_embd.weight", embed)
        put("output_norm.weight", params_dict[layout.final_norm].detach())
        if not tied:
            assert head is not None
            put("output.weight", head.detach())
        for j, layer in enumerate(layers):
            for base, tensor in layer.tensors.items():
                put(f"blk.{j}.{base}.weight", tensor, router=base == "ffn_gate_inp")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return GGUFExport(
        path=writer_path,
        arch=arch,
        type=type,
        layers=len(layers),
        head_count=heads,
        head_count_kv=kv,
        feed_forward_length=ffn,
        standins=standins,
        tensor_bytes=tensor_bytes,
    )


def _file_type(kind: str) -> int:
    import gguf

    return int(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
            "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        }[kind]
    )


# --- the tokenizer ------------------------------------------------------------------------------------

#: The pre-tokenizer names llama.cpp knows, by the digest of the token ids of its check text
#: (``get_vocab_base_pre`` in llama.cpp's converter; a few of its entries: the families prunekit exports)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}
#: llama.cpp's check text for pre-tokenizers (``chktxt`` in its converter)
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise GGUFExportError(
            f"{folder} has no tokenizer.json: a GGUF file carries its tokenizer. Save the pruned model with "
            "its tokenizer (prunekit prune --out does; save_pruned(..., tokenizer=tok))"
        )
    return AutoTokenizer.from_pretrained(folder)


def _pre_tokenizer(tokenizer: Any) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    name = _PRE_TOKENIZERS.get(digest)
    if name is None:
        log.warning(
            "the tokenizer's pre-tokenizer is not one prunekit names for llama.cpp (digest %s): written as "
            "'default'; llama.cpp's tokenization of text may then differ from transformers'",
            digest[:12],
        )
        return "default"
    return name


def _add_vocab(w: Any, tokenizer: Any, vocab_size: int, source: Path | None) -> None:
    """Byte-level BPE vocabulary, merges, special tokens and chat template (as llama.cpp's converter)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_type = json.loads(backend.to_str())["model"]["type"] if backend is not None else None
    if backend is None or model_type != "BPE":
        raise GGUFExportError(
            f"the tokenizer is {model_type or type(tokenizer).__name__}, not a BPE tokenizer: prunekit writes "
            "byte-level BPE vocabularies (Llama 3, SmolLM, Qwen2, Mistral-Nemo) into GGUF"
        )
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has {vocab_size} rows"
        )
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = json.loads(backend.to_str())["model"].get("merges", [])  # BPE: backend is set
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int):
            getattr(w, f"add_{kind}_token_id")(tid)
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if isinstance(add_bos, bool):
        w.add_add_bos_token(add_bos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)
