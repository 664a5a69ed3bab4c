"""Saving and loading pruned models.

A checkpoint is a Hugging Face folder (safetensors + config + tokenizer) plus two prunekit files:
``plan.json`` (the plan that made it) and ``prunekit.json`` (the structure record: which branches are
removed stand-ins, every KV-cache index, the size of every file and a fingerprint of the weights). Folders
are written atomically (:mod:`prunekit_core.io.atomic`): everything goes into a hidden sibling
``.NAME.partial-*`` that is moved into place only when complete, so a killed save never leaves a folder that
looks like a checkpoint, and loading refuses hidden temporaries and damaged folders
(:func:`verify_checkpoint`).

Uniform plans (whole blocks, one width everywhere) reload with plain ``AutoModelForCausalLM.from_pretrained``;
any plan reloads with :func:`load_pruned`, which also verifies that no weight is missing or unexpected. A
non-uniform checkpoint (removed sublayers, per-layer widths or expert counts) is one that ``config.json``
cannot describe: plain ``from_pretrained`` would build the full model and fill the missing branches with
random weights. So its ``config.json`` carries :data:`PLAIN_LOAD_GUARD` under ``transformers_weights`` (the
key transformers reads to find the weight file): every plain ``from_pretrained`` (auto or concrete class,
language or vision-language model) refuses it before reading a weight, with an error that names
:func:`load_pruned`; :func:`load_pruned` drops the key. The config alone still loads with ``AutoConfig``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import RemovedBranch, get_module, hf_model, set_module
from ..ir.errors import CheckpointError, PlanError
from ..ir.plan import REMAKE, PrunePlan
from ..surgery.width import config_describes_shapes, set_tensor, sync_module_shape
from .atomic import atomic_folder, is_temporary, recover, write_text
from .integrity import (
    check_manifest,
    check_weight_files,
    file_manifest,
    pickled_files,
    safetensors_files,
    weights_digest,
)

log = logging.getLogger(__name__)

RECORD_FILE = "prunekit.json"
PLAN_FILE = "plan.json"
RECORD_FORMAT = "prunekit-checkpoint"
RECORD_VERSION = 2

#: ``config.json`` key of a non-uniform checkpoint that makes plain transformers refuse it. transformers
#: reads it (in ``PreTrainedModel.from_pretrained``, before any weight) as the name of the weight file and
#: raises ``ValueError`` quoting it when it is neither ``*.safetensors`` nor ``*.safetensors.index.json``.
PLAIN_LOAD_GUARD_KEY = "transformers_weights"
PLAIN_LOAD_GUARD = (
    "this folder is a non-uniform prunekit checkpoint (removed sublayers, or per-layer widths or expert "
    "counts that config.json cannot describe); plain from_pretrained would fill the removed parts with "
    "random weights. Load it with prunekit_core.load_pruned(folder)"
)


def structure_record(model: nn.Module, *, width_uniform: bool | None = None) -> dict[str, Any]:
    """What :func:`load_pruned` needs to rebuild ``model``'s module tree from its config.

    ``width_uniform`` (whether the config builds every tensor at its shape) is computed from the model
    (:func:`~prunekit_core.surgery.width.config_describes_shapes`) when not given.
    """
    removed = []
    cache_indices: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, RemovedBranch):
            removed.append(
                {
                    "module": name,
                    "kind": module.kind,
                    "output": module.output,
                    "norm": module.norm_path,
                    "full": module.full,
                }
            )
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool):
            cache_indices[name] = idx
    if width_uniform is None:
        width_uniform = config_describes_shapes(model)
    counters: dict[str, int] = {}
    try:  # module counters the plugin declares, at the model's current module paths
        from ..registry.plugins import select_adapter

        for _sub, fam in select_adapter(model).build_ir(model).channel_groups().values():
            paths = [f"{c.module}.{c.attr}" for c in fam.counters] + list(
                fam.top_k.counters if fam.top_k else ()
            )
            for path in paths:
                module, _, attr = path.rpartition(".")
                counters[path] = int(getattr(get_module(model, module), attr))
    except Exception as exc:  # noqa: BLE001 - a model no plugin describes still saves
        log.debug("no channel-group counters recorded: %s", exc)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "architecture": type(model).__name__,
        "uniform": not removed and width_uniform,
        "width_uniform": width_uniform,
        "removed_branches": removed,
        "cache_indices": cache_indices,
        # width pruning: every parameter's and buffer's shape (per-layer widths the config cannot describe)
        # and the module counters the plugin declared
        "param_shapes": {
            n: list(p.shape) for n, p in [*model.named_parameters(), *model.named_buffers()] if p.dim()
        },
        "counters": counters,
    }


def check_target(out: Path, overwrite: bool) -> None:
    """Raise :class:`CheckpointError` unless ``out`` may become a saved model's folder: not a temporary's
    name, and an existing folder only with ``overwrite`` and only a prunekit checkpoint or an empty one."""
    if is_temporary(out):
        raise CheckpointError(
            f"{out.name} is the name prunekit gives to unfinished saves; choose another --out folder name"
        )
    recover(out)  # an interrupted replacement: put the old folder back, drop dead temporaries
    if out.exists():
        if not overwrite:
            raise CheckpointError(
                f"{out} already exists; choose another --out or pass overwrite=True / --force"
            )
        if not out.is_dir():
            raise CheckpointError(f"{out} exists and is not a folder; refusing to replace it")
        if any(out.iterdir()) and not (out / RECORD_FILE).is_file():
            raise CheckpointError(
                f"{out} is a non-empty folder that is not a prunekit checkpoint; refusing to replace it"
            )
    check_parents(out)


def check_parents(out: Path) -> None:
    """Raise :class:`CheckpointError` unless the missing folders above ``out`` can be created: the nearest
    existing one must be a folder. Creates nothing (see :func:`make_parents`)."""
    for parent in Path(os.path.normpath(out.absolute())).parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{parent} is a file, not a folder: {out} cannot be written under it")
            return


def make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out`` (as every Hugging Face tool does); returns the ones this
    call created, outermost first, so that a failed write can take them away again with
    :func:`remove_made`. A folder that appears meanwhile (another save, ``..`` in the path) is not ours."""
    made: list[Path] = []
    try:
        for folder in reversed(Path(os.path.normpath(out.absolute())).parents):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            made.append(folder)
    except BaseException:
        remove_made(made)
        raise
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, innermost first, where they are still empty: a
    failed write leaves nothing behind."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or gone: leave it
            pass


_MIN_SHARD = 100 * 1000**2
_MAX_SHARD = 2 * 1000**3


def default_shard_size(model: nn.Module) -> int:
    """An eighth of ``model``'s weights in bytes (tied tensors counted once), between 100 MB and 2 GB."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return min(max(total // 8, _MIN_SHARD), _MAX_SHARD)


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    plan: PrunePlan | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (and tokenizer, plan) to ``out_dir`` atomically; returns the folder.

    ``extra_files`` (file name -> text) are written into the folder with the rest, and counted in its
    manifest (``prunekit compress`` keeps its record of choices there).

    ``plan`` (the plan as applied: ``apply_plan(...).plan``) is written as ``plan.json`` and read back with
    :func:`read_plan`; without it the folder has no plan. Whether the config describes every narrowed
    module (so plain ``from_pretrained`` reloads the folder) is read from the model itself. The folder is
    built in a hidden sibling and moved into place when complete (:func:`prunekit_core.io.atomic.atomic_folder`):
    a save that is killed leaves the previous folder (or none), never a mix. ``prunekit.json`` records the
    size of every file and a fingerprint of the weights, which :func:`load_pruned` checks.

    ``max_shard_size`` (bytes, or a string such as ``"2GB"``) defaults to an eighth of the weights, between
    100 MB and 2 GB: the disk writes of each finished shard run while the next is serialized
    (:func:`~prunekit_core.io.atomic.atomic_folder` starts them early), so the ``fsync`` before the rename waits
    for little more than the last shard.
    """
    out = Path(out_dir).absolute()
    check_target(out, overwrite)
    if plan is not None and not isinstance(plan, PrunePlan):
        raise TypeError(
            f"save_pruned's plan must be a PrunePlan, got {type(plan).__name__}; pass apply_plan(...).plan"
        )
    width_uniform = config_describes_shapes(model)
    made = make_parents(out)
    try:
        with atomic_folder(out, replace=overwrite) as tmp:
            # per-layer widths: write tensors under the model's own parameter names (not a family's legacy
            # layout, e.g. Mixtral's per-expert keys), so load_pruned can read the narrowed ones back by name
            shard = max_shard_size if max_shard_size is not None else default_shard_size(model)
            hf_model(model).save_pretrained(tmp, max_shard_size=shard, save_original_format=width_uniform)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if plan is not None:
                save_plan(plan, tmp / PLAN_FILE)
            for name, text in (extra_files or {}).items():
                if Path(name).name != name or name in (RECORD_FILE, PLAN_FILE):
                    raise CheckpointError(
                        f"extra file name {name!r} must be a plain file name, not a prunekit one"
                    )
                write_text(tmp / name, text)
            record = structure_record(model, width_uniform=width_uniform)
            if not record["uniform"]:
                _guard_plain_load(tmp / "config.json")
            record["files"] = file_manifest(tmp, exclude=(RECORD_FILE,))
            record["weights_digest"] = weights_digest(tmp)
            if plan is not None:
                record["plan_sha256"] = hashlib.sha256((tmp / PLAN_FILE).read_bytes()).hexdigest()
            write_text(tmp / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    except FileExistsError as exc:
        remove_made(made)
        raise CheckpointError(f"{out} was created by someone else while saving; nothing was written") from exc
    except BaseException:
        remove_made(made)  # the parents this save created go too: nothing is left half-written
        raise
    return out


def _guard_plain_load(config_file: Path) -> None:
    """Add :data:`PLAIN_LOAD_GUARD` to a saved ``config.json`` (``save_pretrained`` drops the key itself)."""
    config = json.loads(config_file.read_text())
    config[PLAIN_LOAD_GUARD_KEY] = PLAIN_LOAD_GUARD
    write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _is_guarded(path: Path) -> bool:
    try:
        return PLAIN_LOAD_GUARD_KEY in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    rec_path = path / RECORD_FILE
    if is_temporary(path):
        raise CheckpointError(
            f"{path} is an unfinished save (a hidden temporary folder left by an interrupted or running "
            "prunekit save), not a checkpoint. Load the folder without the hidden prefix and suffix; "
            "delete this one if no save is running."
        )
    if not path.exists():
        recover(path.absolute())  # a replacement killed between its two renames left the old folder aside
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder that `prunekit prune --out` wrote")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a saved model")
    if not rec_path.is_file() and _is_guarded(path):
        raise CheckpointError(
            f"{path} has no {RECORD_FILE}, but its config.json marks it as a non-uniform prunekit checkpoint: "
            "the structure record that rebuilds it was lost. Copy the folder again from its source, or re-run "
            "the command that wrote it"
        )
    if not rec_path.is_file():
        raise CheckpointError(
            f"{path} has no {RECORD_FILE}: it was not written by prunekit. Load it with "
            "AutoModelForCausalLM.from_pretrained, or prunekit_core.load_model."
        )
    fix = "copy the folder again from its source, or re-run the command that wrote it"
    try:
        record = json.loads(rec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{rec_path} is not valid JSON ({exc}): the file is corrupt; {fix}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"{rec_path} is not a prunekit structure record; {fix}")
    if record.get("version", 0) > RECORD_VERSION:
        raise CheckpointError(f"{rec_path} has version {record['version']}; upgrade prunekit to read it")
    missing = [
        k for k in ("removed_branches", "cache_indices") if not isinstance(record.get(k), (list, dict))
    ]
    if missing:
        raise CheckpointError(f"{rec_path} is damaged: it lacks {', '.join(missing)}; {fix}")
    return record


def verify_checkpoint(path: str | Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a saved folder against its record before loading it; returns the record.

    Raises :class:`CheckpointError` naming the problem when a file is missing, truncated or changed, a
    safetensors file does not hold the bytes its header describes, the weights are not the ones saved
    (fingerprint), or ``plan.json`` is not the plan saved with them. Folders saved by older prunekit
    versions (without sizes and fingerprints) get only the safetensors checks.
    """
    path = Path(path)
    record = read_record(path) if record is None else record
    manifest = record.get("files") or {}
    absent = sorted(rel for rel in manifest if not (path / rel).is_file())
    if absent:
        raise CheckpointError(
            f"{path} is incomplete: {', '.join(absent)} missing (recorded in {RECORD_FILE} when saved). Copy "
            "the folder again from its source, or re-run the command that wrote it"
        )
    if not safetensors_files(path):
        pickled = pickled_files(path)
        raise CheckpointError(
            f"{path} holds no .safetensors weights"
            + (f" (only pickled files: {', '.join(p.name for p in pickled)})" if pickled else "")
            + "; a prunekit checkpoint always has them: copy the folder again or re-run the command that wrote it"
        )
    check_weight_files(path)  # truncated safetensors files and missing shards, named as such
    if "files" in record:
        check_manifest(path, record["files"], record=RECORD_FILE)
    if "weights_digest" in record:
        actual = weights_digest(path)
        if actual != record["weights_digest"]:
            raise CheckpointError(
                f"{path}: the weights are not the ones this checkpoint was saved with (weights fingerprint "
                f"{actual}, {RECORD_FILE} records {record['weights_digest']}): weight files were replaced or "
                "edited after saving. Restore the original files, or re-run prunekit prune to write a new "
                "checkpoint"
            )
    _check_plan_file(path, record)
    return record


def _check_plan_file(path: Path, record: dict[str, Any]) -> None:
    """``plan.json`` is the plan the record was saved with (when the record names one)."""
    plan_file = path / PLAN_FILE
    if "plan_sha256" in record:
        if not plan_file.is_file():
            raise CheckpointError(f"{path}: {PLAN_FILE} is missing; copy the folder again or re-run prune")
        if hashlib.sha256(plan_file.read_bytes()).hexdigest() != record["plan_sha256"]:
            raise CheckpointError(
                f"{path}: {PLAN_FILE} is not the plan these weights were made with (its digest differs from "
                f"the one in {RECORD_FILE}): it was edited or copied from another checkpoint. Restore the "
                "original plan.json, or re-run prunekit prune"
            )


def _load_narrowed(model: nn.Module, path: Path, keys: list[str]) -> None:
    """Replace parameters built at the config's width by the narrower tensors the checkpoint holds."""
    from safetensors import safe_open

    wanted = set(keys)
    found: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in wanted & set(fh.keys()):
                found[key] = fh.get_tensor(key)
    if wanted - set(found):
        raise CheckpointError(f"{path}: narrowed weights {sorted(wanted - set(found))[:5]} are not on disk")
    for key, tensor in found.items():
        module_path, _, leaf = key.rpartition(".")
        module = get_module(model, module_path)
        set_tensor(module, leaf, tensor.to(getattr(module, leaf).dtype))
        sync_module_shape(module)


#: byte alignment of the CPU allocator's blocks (``c10::gAlignment``); a freshly allocated tensor starts on it
ALLOCATOR_ALIGNMENT = 64


def align_weights(model: nn.Module, alignment: int = ALLOCATOR_ALIGNMENT) -> int:
    """Move every parameter and buffer of ``model`` that does not start on an ``alignment``-byte boundary
    into memory of its own (a copy with the same values and shape; a dense tensor keeps its strides); return how many moved.

    ``from_pretrained`` memory-maps safetensors, so a reloaded tensor starts wherever the file puts it
    (often 8 bytes past a 64-byte boundary). CPU kernels may pick another vectorised path for an unaligned
    operand, summing in another order: on AMD EPYC (with and without AVX-512), cached decoding of a reloaded MoE model
    differed from the same model in memory by up to 1.3e-6 although every weight was bitwise equal. A model
    whose tensors all start aligned, like one built in memory, runs the same kernels as that model.
    """
    moved = 0
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is None or tensor.device.type != "cpu" or tensor.data_ptr() % alignment == 0:
                        continue
                    tensor.data = tensor.clone()  # keeps the strides of a dense tensor
                    moved += 1
    return moved


def model_class(architecture: str | None, default: Any) -> Any:
    """The transformers class named ``architecture`` (e.g. ``LlavaForConditionalGeneration``), else ``default``.

    A causal LM reloads through ``AutoModelForCausalLM``; a vision-language model is not one, so the class
    the checkpoint was saved from is built instead.
    """
    import transformers

    cls = getattr(transformers, architecture, None) if architecture else None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else default


def load_pruned(path: str | Path, *, dtype: Any = "auto", trust_remote_code: bool = False) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned`, rebuilding removed branches.

    Raises :class:`CheckpointError` if the folder fails :func:`verify_checkpoint` (missing, truncated or
    changed files, weights or plan that are not the ones saved), or if any weight is missing or unexpected
    beyond the removed branches. Weights are read from safetensors only; ``trust_remote_code`` (off by
    default) lets transformers run model code shipped in the folder.
    The guard that makes plain ``from_pretrained`` refuse a non-uniform folder (:data:`PLAIN_LOAD_GUARD`)
    is dropped from the config; folders saved before it existed load the same way.
    The returned model is in eval mode; :func:`read_plan` gives the plan saved with it (prunekit keeps
    nothing on the model).
    Its tensors are in aligned memory of their own (:func:`align_weights`; one copy of the weights, in
    memory as it would be without the memory map), so on the same thread count it runs the kernels the
    saved model ran in memory, and computes bitwise what it computed, whatever CPU picks by alignment.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    record = verify_checkpoint(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # missing keys of removed branches are expected
    shapes: dict[str, list[int]] = record.get("param_shapes", {})
    model: nn.Module
    info: dict[str, Any]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if PLAIN_LOAD_GUARD_KEY in vars(config):  # the guard against plain loads (older folders lack it)
            delattr(config, PLAIN_LOAD_GUARD_KEY)
        model, info = model_class(record.get("architecture"), AutoModelForCausalLM).from_pretrained(
            path,
            config=config,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            use_safetensors=True,  # never unpickle: a prunekit checkpoint always has safetensors
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # missing or corrupt weight files: OSError, SafetensorError, ...
        raise CheckpointError(f"{path} could not be loaded: {type(exc).__name__}: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    expected_missing: set[str] = set()
    for rb in record["removed_branches"]:
        for p in (rb["module"], rb["norm"]):
            if p:
                expected_missing |= {f"{p}.{n}" for n, _ in get_module(model, p).named_parameters()}
    missing = set(info.get("missing_keys", ()))
    problems = []
    if missing != expected_missing:
        if missing - expected_missing:
            problems.append(f"missing weights {sorted(missing - expected_missing)[:5]}")
        if expected_missing - missing:
            problems.append(f"weights present for removed branches {sorted(expected_missing - missing)[:5]}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected weights {sorted(info['unexpected_keys'])[:5]}")
    narrowed = []
    for key, *rest in info.get("mismatched_keys", ()) or ():
        saved_shape = list(rest[0]) if rest else None
        if key in shapes and saved_shape == shapes[key]:
            narrowed.append(key)
        else:
            problems.append(
                f"weight {key} has shape {saved_shape}, the structure record says {shapes.get(key)}"
            )
    if problems:
        raise CheckpointError(f"{path} does not match its structure record: " + "; ".join(problems))
    if narrowed:
        _load_narrowed(model, path, narrowed)
    for rb in record["removed_branches"]:
        stand_in = RemovedBranch(rb["kind"], rb["output"], rb["norm"], full=bool(rb.get("full", False)))
        set_module(model, rb["module"], stand_in)
        if rb["norm"]:
            set_module(model, rb["norm"], nn.Identity())
    for name, idx in record["cache_indices"].items():
        get_module(model, name).layer_idx = idx
    for name, value in record.get("counters", {}).items():
        module, _, attr = name.rpartition(".")
        setattr(get_module(model, module), attr, value)
    align_weights(model)  # run the kernels the model ran in memory: see align_weights
    model.eval()
    return model


def save_plan(plan: PrunePlan, path: str | Path) -> None:
    """Write ``plan`` to the file ``path`` as JSON, atomically (a killed write leaves the old file or none)."""
    write_text(path, plan.to_json())


def load_plan(path: str | Path) -> PrunePlan:
    """Read the plan file ``path`` (written by :func:`save_plan` or ``prunekit prune --plan-only``).

    Raises :class:`PlanError` for a missing file, an unfinished write (a hidden temporary), or a file that is
    empty, not JSON or not a plan (:meth:`PrunePlan.from_json`).
    """
    path = Path(path)
    if is_temporary(path):
        raise PlanError(
            f"{path} is an unfinished write (a hidden temporary file left by an interrupted save), not a "
            f"plan; pass the plan file without the hidden prefix and suffix, or {REMAKE}"
        )
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist")
    return PrunePlan.from_json(path.read_bytes(), source=str(path))


def read_plan(path: str | Path) -> PrunePlan | None:
    """The plan a checkpoint folder was saved with (its ``plan.json``), or ``None`` when it has none.

    When the folder has a prunekit record, the plan must be the one it was saved with (the record's
    digest of ``plan.json``; :class:`CheckpointError` otherwise). The weights are checked by
    :func:`verify_checkpoint` (and :func:`load_pruned`), not here.
    """
    path = Path(path)
    plan_file = path / PLAN_FILE
    if not plan_file.is_file():
        return None
    if (path / RECORD_FILE).is_file():
        _check_plan_file(path, read_record(path))
    return load_plan(plan_file)
