"""Tiny offline models, tokenizers and texts shared by tests (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from prunekit_core.surgery.apply import AppliedPlan

WORDS = 100


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``w<i>`` -> id ``i + 3`` for ``i < 100``; ids 0-2 are [UNK], <s>, </s>."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def tiny_llama(*, layers: int = 2, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A seeded random Llama small enough to run in milliseconds (vocab covers :func:`tiny_tokenizer`)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(folder: Path, **kwargs) -> Path:
    """Save :func:`tiny_llama` and :func:`tiny_tokenizer` as a Hugging Face folder; returns it."""
    tiny_llama(**kwargs).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def words(n: int, seed: int | None = None) -> str:
    """``n`` words of the tiny vocabulary (a fixed pseudo-random sequence when ``seed`` is given)."""
    if seed is None:
        return " ".join(f"w{i % WORDS}" for i in range(n))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, WORDS, (n,), generator=gen).tolist()
    return " ".join(f"w{i}" for i in ids)


def tiny_pruned(seed: int = 0) -> LlamaForCausalLM:
    """A 3-block :func:`tiny_llama` with block 0 and block 2's attention removed (a non-uniform plan)."""
    return tiny_pruned_applied(seed).model


def tiny_pruned_applied(seed: int = 0) -> AppliedPlan:
    """:func:`tiny_pruned` as ``apply_plan`` returns it: the model and the plan as applied."""
    from prunekit_llama import LlamaFamilyAdapter

    from prunekit_core.ir.plan import PrunePlan, fingerprint
    from prunekit_core.surgery.apply import apply_plan

    model = tiny_llama(layers=3, seed=seed)
    adapter = LlamaFamilyAdapter()
    plan = PrunePlan(
        fingerprint=fingerprint(model, adapter.build_ir(model)),
        remove=["text.blocks.0", "text.blocks.2.attn"],
    )
    return apply_plan(model, plan, adapter=adapter)


def logits_of(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a full forward without cache on ``ids`` (default: tokens 3..12, one row)."""
    ids = torch.arange(3, 13).unsqueeze(0) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def write_tiny_gguf(
    path: Path, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2, tied: bool = False
) -> Path:
    """A real (unquantized F32) GGUF file of a tiny random Llama with a byte-level BPE vocabulary, written
    with the ``gguf`` package as llama.cpp lays it out (tensor names, metadata), so transformers loads it
    through its own GGUF conversion. ``tied``: no ``output.weight`` (the head reads the embeddings, as in
    SmolLM2's GGUF)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    ffn, head_dim = hidden * 3 // 2, hidden // heads
    tokens = [*bytes_to_unicode().values(), "th", "the", "an", "in", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_merges(["t h", "th e", "a n", "i n"])
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is a control token
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    def add(name: str, *shape: int, around: float = 0.0) -> None:
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(shape)).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, around=1.0)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden, around=1.0)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    add("output_norm.weight", hidden, around=1.0)
    if not tied:
        add("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@torch.no_grad()
def sampled_windows(model: torch.nn.Module, n: int = 16, seq: int = 24, seed: int = 1) -> torch.Tensor:
    """``n`` token windows sampled from ``model`` itself (a first token drawn uniformly from its vocabulary).

    On its own samples the unpruned model has the lowest expected loss, so a repair that restores what a
    removal took has a loss to win on them, as on real text (the repair keeps a fold only where it lowers
    the held-out loss); on uniform random tokens a random model has nothing to win.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (n, 1), generator=g)
    for _ in range(seq - 1):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].double()
        ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], dim=1)
    return ids


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the kind GGUF carries) with a few merges; ids below the model's vocab."""
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghĠ")}}
    vocab.update({"ab": 11, "cd": 12, "abcd": 13, "Ġa": 14})
    merges = [("a", "b"), ("c", "d"), ("ab", "cd"), ("Ġ", "a")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast
