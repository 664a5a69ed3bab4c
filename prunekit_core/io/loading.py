"""Resolve a model spec and load it as a Hugging Face causal LM.

A *model spec* is one of:

* an alias from :data:`MODEL_ALIASES` (e.g. ``smollm2-135m``),
* a local Hugging Face folder (contains ``config.json``; folders written by prunekit also contain
  ``prunekit.json`` and are loaded through :func:`prunekit_core.io.checkpoint.load_pruned`),
* a path to a ``.gguf`` file,
* a hub id ``org/name`` that is not a local path (loaded by transformers; fails offline).

A spec that looks like a local path (it starts with ``.``, ``/`` or ``~``, has more than one ``/``, a
backslash or a trailing ``/``, or its first folder exists here) is never taken for a hub id: when it is not
an existing folder or ``.gguf`` file, resolving it fails at once, naming the path.

What callers may rely on:

* :func:`resolve_model_source` never loads weights and never touches the network; it raises
  :class:`~prunekit_core.ir.errors.ModelNotFoundError` for anything it cannot resolve.
* :func:`load_model` returns a model in ``eval()`` mode with every weight loaded from the source
  (missing or unexpected checkpoint keys raise :class:`~prunekit_core.ir.errors.PrunekitError` instead of
  being silently re-initialised), and a tokenizer that always has a pad token (``None`` with
  ``tokenizer=False``; a folder without tokenizer files is an error only when a tokenizer is asked for).
* A hub id is looked up once (:func:`check_hub_model`, no retries) before anything is downloaded.
* GGUF sources are dequantized once into a safetensors cache folder (see :func:`default_cache_dir`);
  the cache is written atomically, so an interrupted conversion never leaves a folder that looks
  complete. Nothing is printed on stdout; progress goes through :mod:`logging`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, overload

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prunekit_core.adapters.base import from_pretrained_with_info, hf_model
from prunekit_core.io.atomic import atomic_folder
from prunekit_core.io.integrity import check_weight_files
from prunekit_core.io.sources import (
    ModelSource,
    aliases_text,
    check_hub_model,
    check_tokenizer,
    resolve_model_source,
)
from prunekit_core.ir.defaults import MODEL_ALIASES
from prunekit_core.ir.errors import ModelNotFoundError, PrunekitError, UnsafeCheckpointError

__all__ = [
    "MODEL_ALIASES",
    "ModelSource",
    "check_hub_model",
    "check_tokenizer",
    "default_cache_dir",
    "ensure_pad_token",
    "gguf_folder",
    "load_model",
    "resolve_model_source",
]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The GGUF conversion cache root: ``$PRUNEKIT_CACHE`` if set, else ``~/.cache/prunekit``."""
    env = os.environ.get("PRUNEKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunekit"


def _gguf_cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", gguf_path.stem)
    return f"{stem}-{digest}"


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer`` with its end-of-sequence token as padding token when it has none (batched windows)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_loading_info(info: dict[str, Any], where: str) -> None:
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(key) or []))
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{key.replace('_', ' ')}: {shown}")
    if problems:
        raise PrunekitError(
            f"Checkpoint {where} does not match its config ({'; '.join(problems)}). Loading it would "
            "silently re-initialise weights at random. Re-save the model with save_pretrained, or, for a "
            "pruned model, keep the prunekit.json written by prunekit next to the weights."
        )


def _safety_kwargs(allow_pickle: bool, trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained`` arguments of the load policy: safetensors only unless pickle is allowed, and
    then only ``weights_only=True``; model code from the checkpoint only when asked."""
    return {
        "use_safetensors": None if allow_pickle else True,
        "weights_only": True,
        "trust_remote_code": trust_remote_code,
    }


def _remote_code_error(where: str, exc: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{where} ships its own model code (config.json auto_map), which prunekit does not run unless asked. "
        "If you trust the source, pass --trust-remote-code (API: trust_remote_code=True). "
        f"Details: {exc}"
    )


def _from_pretrained(source: str | Path, where: str, dtype: torch.dtype, **safety: Any) -> PreTrainedModel:
    from .checkpoint import model_class

    try:
        try:
            model, info = from_pretrained_with_info(AutoModelForCausalLM, source, dtype=dtype, **safety)
        except ValueError as exc:  # "Unrecognized configuration class": not a causal LM
            if "trust_remote_code" in str(exc):
                raise
            # a vision-language model (LLaVA) is no causal LM: build the class its config names
            config = AutoConfig.from_pretrained(
                source, trust_remote_code=safety.get("trust_remote_code", False)
            )
            cls = model_class((config.architectures or [None])[0], None)
            if cls is None:
                raise
            logger.debug("%s is not a causal LM (%s); loading it as %s", where, exc, cls.__name__)
            model, info = from_pretrained_with_info(cls, source, dtype=dtype, **safety)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(where, exc) from exc
        raise
    _check_loading_info(info, where)
    return hf_model(model)


def _load_hf_folder(
    folder: Path, dtype: torch.dtype, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> PreTrainedModel:
    check_weight_files(folder, allow_pickle=allow_pickle)
    return _from_pretrained(folder, str(folder), dtype, **_safety_kwargs(allow_pickle, trust_remote_code))


def _load_tokenizer(source: str | Path, where: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(where, exc) from exc
        raise


def gguf_folder(source: ModelSource, cache_dir: str | Path | None = None) -> Path:
    """The safetensors folder of the GGUF model ``source``: its dequantized copy in the cache
    (``cache_dir`` or :func:`default_cache_dir`), converted on first use."""
    assert source.path is not None and source.gguf_file is not None
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final_dir = root / _gguf_cache_key(source.path / source.gguf_file)
    if not (final_dir / "config.json").is_file():
        _convert_gguf(source, final_dir)
    else:
        logger.info("Loading cached conversion of %s from %s", source.gguf_file, final_dir)
    return final_dir


def _convert_gguf(source: ModelSource, final_dir: Path) -> None:
    """Dequantize ``source`` into ``final_dir`` (fp32 safetensors + tokenizer), atomically."""
    assert source.path is not None and source.gguf_file is not None
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Converting GGUF %s to a safetensors cache at %s (one-time, ~20 s for a 135M model) ...",
        source.path / source.gguf_file,
        final_dir,
    )
    t0 = time.perf_counter()
    try:
        # atomic_folder also removes temporaries of conversions that were killed (their process is gone)
        with atomic_folder(final_dir) as tmp_dir:
            model = AutoModelForCausalLM.from_pretrained(
                source.path, gguf_file=source.gguf_file, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            # save_pretrained refuses a GGUF-loaded model until the quantizer state is cleared; the
            # weights are already dequantized to plain float tensors.
            model.hf_quantizer = None  # type: ignore[assignment]  # a plain attribute transformers does not declare
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
    except FileExistsError:
        if not (final_dir / "config.json").is_file():
            raise
        # another process finished first: use theirs
    logger.info("GGUF conversion done in %.1f s", time.perf_counter() - t0)


@overload
def load_model(
    spec: str,
    *,
    dtype: torch.dtype = ...,
    cache_dir: Path | None = ...,
    allow_pickle: bool = ...,
    trust_remote_code: bool = ...,
    tokenizer: Literal[True] = ...,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]: ...


@overload
def load_model(
    spec: str,
    *,
    dtype: torch.dtype = ...,
    cache_dir: Path | None = ...,
    allow_pickle: bool = ...,
    trust_remote_code: bool = ...,
    tokenizer: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, ModelSource]: ...


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tokenizer: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, ModelSource]:
    """Load the causal LM named by ``spec`` (see :func:`resolve_model_source`).

    Returns ``(model, tokenizer, source)``; with ``tokenizer=False`` no tokenizer is loaded (the folder need
    not have one) and the tokenizer returned is ``None``. Guarantees:

    * ``model`` is in ``eval()`` mode, parameters in ``dtype``, on CPU; every weight comes from the
      checkpoint (missing/unexpected keys raise :class:`PrunekitError`).
    * ``tokenizer`` has a pad token: if the checkpoint defines none, ``pad_token`` is set to
      ``eos_token`` (so batches can be padded; evaluation in prunekit never pads anyway).
    * GGUF sources (alias or ``.gguf`` path) are dequantized to fp32 once into
      ``cache_dir or default_cache_dir()`` / ``<file stem>-<hash of name, size, mtime>`` and later
      loaded from there (well under a second for 135M params), then cast to ``dtype``.
    * Folders holding ``prunekit.json`` are loaded via ``prunekit_core.io.checkpoint.load_pruned``.
    * Hub ids that cannot be fetched raise :class:`ModelNotFoundError`.
    * Weights come from safetensors only; every safetensors file is checked against its header first
      (truncated files raise :class:`~prunekit_core.ir.errors.CheckpointError`). Pickled weights
      (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused with
      :class:`~prunekit_core.ir.errors.UnsafeCheckpointError` unless ``allow_pickle=True``, and then read with
      ``torch.load(weights_only=True)``. Model or tokenizer code shipped with the checkpoint runs only with
      ``trust_remote_code=True``.
    """
    source = resolve_model_source(spec)
    if tokenizer:
        check_tokenizer(source)
    check_hub_model(source)
    tok: PreTrainedTokenizerBase | None = None
    if source.is_gguf:
        assert source.path is not None and source.gguf_file is not None
        final_dir = gguf_folder(source, cache_dir)
        model = _load_hf_folder(final_dir, dtype)
        if tokenizer:
            tok = AutoTokenizer.from_pretrained(final_dir)
    elif source.kind == "hf_dir":
        assert source.path is not None
        if (source.path / "prunekit.json").is_file():
            from prunekit_core.io.checkpoint import load_pruned  # lazy: optional sibling module

            model = hf_model(load_pruned(source.path, trust_remote_code=trust_remote_code))
            if model.dtype != dtype:
                # transformers' wrapper around PreTrainedModel.to types its first argument as the model
                model = model.to(dtype)  # type: ignore[arg-type]  # see the line above
        else:
            model = _load_hf_folder(
                source.path, dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
            )
        if tokenizer:
            tok = _load_tokenizer(source.path, str(source.path), trust_remote_code)
    else:  # hub
        assert source.hub_id is not None
        try:
            model = _from_pretrained(
                source.hub_id, f"'{spec}'", dtype, **_safety_kwargs(allow_pickle, trust_remote_code)
            )
            if tokenizer:
                tok = _load_tokenizer(source.hub_id, f"'{spec}'", trust_remote_code)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load '{spec}' from the Hugging Face hub (no internet? use a local folder "
                f"or a GGUF file; aliases: {aliases_text()}). Details: {exc}"
            ) from exc
    model.eval()
    return model, ensure_pad_token(tok) if tok is not None else None, source
