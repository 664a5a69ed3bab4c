"""Calibration / evaluation text: resolve a text spec, read it, cut it into token windows.

A *text spec* is an alias from :data:`TEXT_ALIASES` (files shipped by the pip package
``exllamav2==0.3.2``, located without importing it) or a path to a UTF-8 text file.

What callers may rely on:

* :func:`resolve_text` returns an existing file or raises :class:`~prunekit_core.ir.errors.TextNotFoundError`.
* :func:`read_text` returns non-blank text with wiki-dump ``<doc ...>`` / ``</doc>`` tag lines removed,
  or raises :class:`~prunekit_core.ir.errors.CalibrationError`.
* :func:`token_windows` returns a ``LongTensor [n, seq_len]`` of NON-overlapping consecutive windows
  taken from the start of the text, tokenized once WITHOUT special tokens (no BOS/EOS is added, so
  every position holds real text; the first token of each window is only context, never predicted).
  The result is deterministic for a given tokenizer and text.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where windows are made: checking a text spec (the CLI) needs none
    import torch
    from transformers import PreTrainedTokenizerBase

from prunekit_core.ir.defaults import TEXT_ALIASES
from prunekit_core.ir.errors import CalibrationError, TextNotFoundError

__all__ = [
    "TEXT_ALIASES",
    "TextWindows",
    "load_windows",
    "read_text",
    "resolve_text",
    "token_windows",
]

logger = logging.getLogger(__name__)

_TEXT_PACKAGE = "exllamav2"
_TEXT_PIP = "pip install --no-deps exllamav2==0.3.2"
_TEXT_SUBDIR = ("conversion", "standard_cal_data")

_DOC_TAG_LINE = re.compile(r"^[ \t]*(?:<doc\b[^>\n]*>|</doc>)[ \t]*\r?\n?", re.MULTILINE)


def _aliases_text() -> str:
    return ", ".join(TEXT_ALIASES)


def resolve_text(spec: str | Path) -> Path:
    """Return the file for a text alias or path.

    Raises :class:`TextNotFoundError` naming the spec, listing the aliases (with a "did you mean"
    hint for near misses), and giving the pip command when the alias package is not installed.
    """
    raw = str(spec).strip()
    if raw in TEXT_ALIASES:
        found = importlib.util.find_spec(_TEXT_PACKAGE)  # locate without importing
        if found is None or not found.submodule_search_locations:
            raise TextNotFoundError(
                f"Text alias '{raw}' needs the Python package '{_TEXT_PACKAGE}', which is not installed. "
                f"Install it with: {_TEXT_PIP}"
            )
        path = Path(list(found.submodule_search_locations)[0]).joinpath(*_TEXT_SUBDIR, TEXT_ALIASES[raw])
        if not path.is_file():
            raise TextNotFoundError(
                f"Text alias '{raw}': expected file {path} is missing. Reinstall with: "
                f"{_TEXT_PIP} --force-reinstall"
            )
        return path

    path = Path(raw).expanduser()
    if raw and path.is_file():
        return path
    reason = f"{path} is a folder, not a text file" if raw and path.is_dir() else "no such alias or file"
    close = difflib.get_close_matches(raw, list(TEXT_ALIASES), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise TextNotFoundError(
        f"Text '{raw}' not found: {reason}.{hint} Use an alias ({_aliases_text()}; they need "
        f"`{_TEXT_PIP}`) or a path to a UTF-8 text file."
    )


def read_text(spec: str | Path) -> str:
    """Read the text named by ``spec`` as UTF-8, dropping ``<doc ...>`` and ``</doc>`` tag lines.

    Raises :class:`TextNotFoundError` (see :func:`resolve_text`) or :class:`CalibrationError` when the
    file is not valid UTF-8 or holds only whitespace.
    """
    path = resolve_text(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"Text file {path} is not valid UTF-8 ({exc}). Convert it to UTF-8.") from exc
    text = _DOC_TAG_LINE.sub("", text)
    if not text.strip():
        raise CalibrationError(
            f"Text file {path} is empty (or only whitespace/<doc> tags). Use a longer text."
        )
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenize ``text`` once, without special tokens and without the max-length warning."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: call the Rust tokenizer directly (no truncation/warnings)
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))


# Tokens past the requested count that a prefix must also yield before it is trusted (see _encode_prefix).
_PREFIX_MARGIN = 64


def _first_prefix_chars(need: int) -> int:
    """Characters to try first for ``need`` tokens: about twice what English needs."""
    return max(4096, 8 * (need + _PREFIX_MARGIN))


def _encode_prefix(tokenizer: PreTrainedTokenizerBase, text: str, need: int | None) -> list[int]:
    """The first ``need`` tokens of ``text`` (all of them for ``None``), tokenizing only a prefix.

    Tokenizing a 2 MB text takes seconds; a few windows need a few kB of it. The prefix is cut at a line
    break and grown until it yields ``need`` tokens plus a margin: tokenization is local (pre-tokenizers
    split on whitespace and punctuation, merges stay inside a piece), so tokens far from the cut equal the
    whole text's. ``tests/test_text.py`` checks this against whole-text tokenization of every packaged text.
    """
    if need is None:
        return _encode(tokenizer, text)
    chars = _first_prefix_chars(need)
    while chars < len(text):
        cut = text.rfind("\n", 0, chars)
        ids = _encode(tokenizer, text[: cut if cut > chars // 2 else chars])
        if len(ids) >= need + _PREFIX_MARGIN:
            return ids[:need]
        chars *= 2
    return _encode(tokenizer, text)


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    seq_len: int,
    num_windows: int | None = None,
    max_tokens: int | None = None,
    source: str = "<text>",
) -> torch.Tensor:
    """Cut ``text`` (the text itself, not a spec) into non-overlapping token windows.

    The text is tokenized once without special tokens; window ``i`` is tokens
    ``[i*seq_len, (i+1)*seq_len)``; a trailing partial window is dropped. ``num_windows`` caps the
    number of windows and ``max_tokens`` caps the total token count (floored to whole windows); both
    may be given. If fewer windows exist than requested, all existing windows are returned and a
    warning is logged. Returns ``torch.long`` of shape ``[n, seq_len]`` with ``n >= 1``.

    Raises :class:`CalibrationError` if ``seq_len < 2``, a cap is below one window, or the text has
    fewer than ``seq_len`` tokens (the message gives both numbers). ``source`` names the text in
    messages.
    """
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2 (got {seq_len}).")
    wanted: int | None = None
    if num_windows is not None:
        if num_windows < 1:
            raise CalibrationError(f"num_windows must be at least 1 (got {num_windows}).")
        wanted = num_windows
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise CalibrationError(
                f"max_tokens={max_tokens} is smaller than one window of seq_len={seq_len}; "
                "raise --max-tokens or lower --seq-len."
            )
        cap = max_tokens // seq_len
        wanted = cap if wanted is None else min(wanted, cap)

    ids = _encode_prefix(tokenizer, text, None if wanted is None else wanted * seq_len)
    available = len(ids) // seq_len
    if available < 1:
        raise CalibrationError(
            f"Text {source} has only {len(ids)} tokens but one window needs seq_len={seq_len}; "
            "use a smaller --seq-len or a longer text."
        )
    n = available if wanted is None else min(wanted, available)
    if wanted is not None and available < wanted:
        logger.warning(
            "Text %s yields only %d window(s) of %d tokens (%d tokens); %d requested. Using %d.",
            source,
            available,
            seq_len,
            len(ids),
            wanted,
            available,
        )
    import torch

    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass(frozen=True)
class TextWindows:
    """Token windows plus where they came from.

    Attributes:
        ids: ``LongTensor [n, seq_len]`` (see :func:`token_windows`).
        source: the text spec (alias or path) the windows were cut from.
        seq_len: tokens per window.
    """

    ids: torch.Tensor
    source: str
    seq_len: int

    @property
    def num_windows(self) -> int:
        """Number of windows ``n``."""
        return int(self.ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Total tokens ``n * seq_len``."""
        return int(self.ids.numel())


def load_windows(
    tokenizer: PreTrainedTokenizerBase,
    spec: str | Path,
    *,
    seq_len: int,
    num_windows: int | None = None,
    max_tokens: int | None = None,
) -> TextWindows:
    """:func:`read_text` + :func:`token_windows` for a text spec (alias or path)."""
    text = read_text(spec)
    ids = token_windows(
        tokenizer,
        text,
        seq_len=seq_len,
        num_windows=num_windows,
        max_tokens=max_tokens,
        source=str(spec),
    )
    return TextWindows(ids=ids, source=str(spec), seq_len=seq_len)
