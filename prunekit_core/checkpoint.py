"""Saving and loading pruned models.

A checkpoint is a Hugging Face folder (safetensors + config + tokenizer) plus two prunekit files:
``plan.json`` (the plan that made it) and ``prunekit.json`` (the structure record: which branches are
removed stand-ins, and every KV-cache index). Folders are written atomically: everything goes into a hidden
sibling ``.NAME.partial-*`` that is renamed into place only when complete, so a killed save never leaves a
folder that looks like a checkpoint.

Uniform plans (whole blocks only) reload with plain ``AutoModelForCausalLM.from_pretrained``; any plan
reloads with :func:`load_pruned`, which also verifies that no weight is missing or unexpected.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from torch import nn

from .adapter import get_module, set_module
from .errors import CheckpointError
from .plan import PrunePlan
from .surgery import RemovedBranch

log = logging.getLogger(__name__)

RECORD_FILE = "prunekit.json"
PLAN_FILE = "plan.json"
RECORD_FORMAT = "prunekit-checkpoint"
RECORD_VERSION = 2


def structure_record(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_pruned` needs to rebuild ``model``'s module tree from its config."""
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
    width = getattr(model, "_prunekit_width", None) or {"uniform": True}
    counters: dict[str, int] = {}
    try:  # module counters the plugin declares, at the model's current module paths
        from .plugins import select_adapter

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
        "uniform": not removed and width["uniform"],
        "width_uniform": width["uniform"],
        "removed_branches": removed,
        "cache_indices": cache_indices,
        # width pruning: every parameter's and buffer's shape (per-layer widths the config cannot describe)
        # and the module counters the plugin declared
        "param_shapes": {
            n: list(p.shape) for n, p in [*model.named_parameters(), *model.named_buffers()] if p.dim()
        },
        "counters": counters,
    }


def _check_target(out: Path, overwrite: bool) -> None:
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
    if not out.parent.exists():
        raise CheckpointError(f"parent folder {out.parent} does not exist")


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    plan: PrunePlan | None = None,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Write ``model`` (and tokenizer, plan) to ``out_dir`` atomically; returns the folder.

    ``plan`` defaults to the plan :func:`~prunekit_core.apply_plan` attached to the model.
    """
    out = Path(out_dir).absolute()
    _check_target(out, overwrite)
    plan = plan if plan is not None else getattr(model, "_prunekit_plan", None)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        width = getattr(model, "_prunekit_width", None) or {"uniform": True}
        # per-layer widths: write tensors under the model's own parameter names (not a family's legacy
        # layout, e.g. Mixtral's per-expert keys), so load_pruned can read the narrowed ones back by name
        model.save_pretrained(tmp, max_shard_size=max_shard_size, save_original_format=width["uniform"])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / PLAN_FILE)
        record = structure_record(model)
        # the record goes last: its presence marks a complete folder even before the rename
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    rec_path = path / RECORD_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder that `prunekit prune --out` wrote")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a saved model")
    if not rec_path.is_file():
        raise CheckpointError(
            f"{path} has no {RECORD_FILE}: it was not written by prunekit. Load it with "
            "AutoModelForCausalLM.from_pretrained, or prunekit_core.load_model."
        )
    try:
        record = json.loads(rec_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{rec_path} is not valid JSON: {exc}") from exc
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"{rec_path} is not a prunekit structure record")
    if record.get("version", 0) > RECORD_VERSION:
        raise CheckpointError(f"{rec_path} has version {record['version']}; upgrade prunekit to read it")
    return record


def _load_narrowed(model: nn.Module, path: Path, keys: list[str]) -> None:
    """Replace parameters built at the config's width by the narrower tensors the checkpoint holds."""
    from safetensors import safe_open

    from .width import set_tensor, sync_module_shape

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


def model_class(architecture: str | None, default: Any) -> Any:
    """The transformers class named ``architecture`` (e.g. ``LlavaForConditionalGeneration``), else ``default``.

    A causal LM reloads through ``AutoModelForCausalLM``; a vision-language model is not one, so the class
    the checkpoint was saved from is built instead.
    """
    import transformers

    cls = getattr(transformers, architecture, None) if architecture else None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else default


def load_pruned(path: str | Path, *, dtype: Any = "auto") -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned`, rebuilding removed branches.

    Raises :class:`CheckpointError` if any weight is missing or unexpected beyond the removed branches.
    The returned model is in eval mode; ``model._prunekit_plan`` holds the plan when the folder has one.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    path = Path(path)
    record = read_record(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # missing keys of removed branches are expected
    shapes: dict[str, list[int]] = record.get("param_shapes", {})
    try:
        model, info = model_class(record.get("architecture"), AutoModelForCausalLM).from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
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
    if record.get("counters") or narrowed:
        model._prunekit_width = {"uniform": bool(record.get("width_uniform", True))}  # type: ignore[attr-defined]
    if (path / PLAN_FILE).is_file():
        model._prunekit_plan = PrunePlan.load(path / PLAN_FILE)  # type: ignore[attr-defined]
    model.eval()
    return model
