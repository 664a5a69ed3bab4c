"""Zero-shot task accuracy through lm-evaluation-harness, on a model already in memory (issue 19).

lm-eval's ``HFLM`` wraps the loaded ``nn.Module`` and its tokenizer (``HFLM(pretrained=model,
tokenizer=tok)``) instead of loading a checkpoint by name, so every model prunekit can load runs, including
the non-uniform checkpoints (removed sublayers, per-layer widths) that only
:func:`prunekit_core.load_pruned` rebuilds. lm-eval is an optional extra: ``pip install -e '.[lmeval]'``.

Standard tasks (hellaswag, arc_easy, piqa, winogrande, ...) download their data sets from the Hugging Face
hub the first time they run; without hub access only tasks whose YAML reads local files work (pass the
folder holding those YAMLs as ``include_path``; docs/lm-eval.md shows one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..ir.errors import PrunekitError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LmEvalMissingError", "LmEvalTaskError", "check_tasks", "run_tasks"]

INSTALL_HINT = "pip install -e '.[lmeval]'"


class LmEvalMissingError(PrunekitError):
    """lm-evaluation-harness is not installed."""


class LmEvalTaskError(PrunekitError):
    """A task name lm-eval does not know (or cannot load)."""


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise LmEvalMissingError(
            f"--tasks needs lm-evaluation-harness, which is not installed ({exc}). Install the optional "
            f"extra: {INSTALL_HINT} (from the prunekit checkout)"
        ) from exc
    return lm_eval


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and other non-JSON leaves turned into floats or strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def check_tasks(tasks: Sequence[str], include_path: str | os.PathLike[str] | None = None) -> Any:
    """lm-eval's ``TaskManager`` (with the YAMLs under ``include_path``) once every name in ``tasks`` is known
    to it; raises :class:`LmEvalMissingError` without lm-eval and :class:`LmEvalTaskError` for an unknown
    task or a missing folder. Cheap next to a model load: callers run it first."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise LmEvalTaskError("--tasks names no task: give one or more, comma-separated (e.g. arc_easy,piqa)")
    if include_path is not None and not os.path.isdir(include_path):
        raise LmEvalTaskError(f"--include-path {include_path} is not a folder: give the folder of task YAMLs")
    if include_path is not None:
        # only the local YAMLs first: indexing lm-eval's ~15,000 built-in tasks takes 20 s of CPU or more,
        # needed only when a name is not among the local ones
        local = TaskManager(include_path=os.fspath(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in names):
            return local
    manager = TaskManager(include_path=os.fspath(include_path) if include_path is not None else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        where = (
            f" or in {include_path}"
            if include_path is not None
            else " (add --include-path DIR for local ones)"
        )
        raise LmEvalTaskError(
            f"lm-eval knows no task {', '.join(unknown)}{where}; `python -m lm_eval ls tasks` lists them"
        )
    return manager


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 4,
    include_path: str | os.PathLike[str] | None = None,
    manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` (in memory) and return ``{"results": {task: {metric: value}},
    "n_samples": {task: {"original": N, "effective": n}}, "versions": {...}, "limit": limit}``.

    ``limit``: at most that many documents per task (lm-eval's ``--limit``; the accuracies then describe a
    subset). ``include_path``: a folder of extra task YAMLs (local data). ``manager``: what
    :func:`check_tasks` returned for these tasks (it is run here otherwise, so unknown tasks fail before
    anything runs).
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if manager is None:
        manager = check_tasks(names, include_path)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    if out is None:  # simple_evaluate returns None on non-zero ranks only
        raise LmEvalTaskError("lm-eval returned no results")
    return {
        "results": _plain(out.get("results", {})),
        "n_samples": _plain(out.get("n-samples", {})),
        "versions": _plain(out.get("versions", {})),
        "limit": limit,
    }
