"""Integrity checks for model folders: truncated safetensors, changed files, pickled weights.

* :func:`check_safetensors` reads a ``.safetensors`` header and checks that the file holds exactly the bytes
  the header describes (a copy or save cut short fails here, before any weight is read).
* :func:`file_manifest` / :func:`check_manifest`: the size of every file of a checkpoint, recorded when it
  is saved and compared when it is loaded.
* :func:`weights_digest`: a fingerprint of the weights on disk (every tensor's name, dtype, shape and its
  first and last rows) that ties ``plan.json`` and ``prunekit.json`` to the weight files they were saved
  with; reading it costs a few kilobytes per tensor, not a pass over the weights.
* :func:`pickled_files`: the weight files that only ``torch.load`` (pickle) can read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from ..ir.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "PICKLE_SUFFIXES",
    "check_manifest",
    "check_safetensors",
    "check_weight_files",
    "file_manifest",
    "pickled_files",
    "safetensors_files",
    "weights_digest",
]

#: weight files read with ``torch.load`` (pickle): refused unless the caller allows pickle
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def pickled_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    size = path.stat().st_size
    fix = (
        "the file was cut short (an interrupted save or copy): copy the folder again from its source, "
        "or re-run the command that wrote it"
    )
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes, not even a safetensors header): {fix}")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated: its header says {n} header bytes but the file has {size} bytes: {fix}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file (corrupt header: {exc}): {fix}"
        ) from None
    return n, header


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """Raise :class:`CheckpointError` unless ``path`` holds exactly the bytes its header describes.

    Returns the header (tensor name -> dtype, shape, data_offsets; plus ``__metadata__``).
    """
    path = Path(path)
    n, header = _header(path)
    size = path.stat().st_size
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: header entry for {key!r} is malformed; the file is corrupt"
            ) from None
        if width is not None and stop - start != numel * width:
            raise CheckpointError(
                f"{path}: tensor {key!r} takes {stop - start} bytes but its shape and dtype need "
                f"{numel * width}; the file is corrupt: copy it again or re-run the command that wrote it"
            )
        end = max(end, stop)
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(
            f"{path} is {what}: its header describes {expected} bytes, the file has {size}. The save or copy "
            "was interrupted or the file was changed: copy the folder again from its source, or re-run the "
            "command that wrote it"
        )
    return header


def file_manifest(folder: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under ``folder`` (sorted), less ``exclude``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = p.stat().st_size
    return out


def check_manifest(folder: Path, manifest: dict[str, int], *, record: str) -> None:
    """Raise :class:`CheckpointError` naming every file that is missing or has another size than recorded."""
    problems = []
    for rel, size in manifest.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != size:
            actual = p.stat().st_size
            state = "shorter (truncated?)" if actual < size else "longer"
            problems.append(f"{rel} is {state} than when saved ({actual} bytes, {size} when saved)")
    if problems:
        raise CheckpointError(
            f"{folder} is not the checkpoint {record} describes: {'; '.join(problems)}. The folder was "
            "damaged or partly copied: copy it again from its source, or re-run the command that wrote it"
        )


def weights_digest(folder: Path) -> str:
    """A sampled fingerprint of the weights in ``folder``'s safetensors files (checked for truncation)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for file in safetensors_files(folder):
        header = check_safetensors(file)
        with safe_open(str(file), framework="pt") as fh:
            for key in sorted(k for k in header if k != "__metadata__"):
                info = header[key]
                h.update(f"{key}|{info['dtype']}|{info['shape']}".encode())
                if not info["shape"]:  # a scalar
                    h.update(fh.get_tensor(key).reshape(1).float().numpy().tobytes())
                    continue
                if 0 in info["shape"]:
                    continue
                sl = fh.get_slice(key)
                for part in (sl[:1], sl[-1:]):
                    h.update(part.contiguous().view(-1).float().numpy().tobytes())
    return h.hexdigest()[:32]


def check_weight_files(folder: str | Path, *, allow_pickle: bool = False) -> list[Path]:
    """Check the weight files of a Hugging Face folder before loading it; returns the safetensors files.

    Every ``.safetensors`` file must hold the bytes its header describes, and every shard named by a
    ``*.safetensors.index.json`` must exist. A folder with pickled weights only is refused with
    :class:`UnsafeCheckpointError` unless ``allow_pickle`` (the caller then loads them with
    ``torch.load(weights_only=True)``).
    """
    folder = Path(folder)
    fix = "copy the folder again from its source, or re-run the command that wrote it"
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index ({exc}); {fix}") from None
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise CheckpointError(
                f"{folder}: shards named by {index.name} are missing: {', '.join(absent)}; {fix}"
            )
    files = safetensors_files(folder)
    for f in files:
        check_safetensors(f)
    if not files:
        pickled = pickled_files(folder)
        if pickled and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{folder} holds only pickled weights ({', '.join(p.name for p in pickled)}). Unpickling can "
                "run arbitrary code hidden in the file, so prunekit loads safetensors only. If you trust "
                "the source, pass --allow-pickle (API: allow_pickle=True): the file is then read with "
                "torch.load(weights_only=True). Better, convert it once to safetensors (load it that way "
                "and save_pretrained) and use the converted folder"
            )
    return files
