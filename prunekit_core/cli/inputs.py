"""The checks every command runs before any expensive work, and the loading of models and texts.

Cheap checks first (a text is readable, a model path exists, --out can be written): nothing is loaded,
computed or written before they pass. Heavy modules are imported inside the functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CalibrationError, ModelNotFoundError, PrunekitError
from .ui import UI

if TYPE_CHECKING:
    from ..text import TextWindows


def check_text(spec: str) -> Path:
    """Resolve a text alias or file and make sure it is readable and not empty (cheap: no tokenizer)."""
    from ..text import read_text, resolve_text

    path = resolve_text(spec)
    read_text(spec)
    return path


def check_model(spec: str, *, tokenizer: bool = True) -> Any:
    """Resolve a model spec before anything is loaded: a path that does not exist fails at once (never a
    hub lookup), a folder without a tokenizer fails when the command reads text, and a hub id is looked up
    once, without retries."""
    from ..sources import check_hub_model, check_tokenizer, resolve_model_source

    source = resolve_model_source(spec)
    if tokenizer:
        check_tokenizer(source)
    check_hub_model(source)
    return source


def check_out(out: Path, *, plan_only: bool, force: bool) -> None:
    """--out can be written: missing parent folders are fine (they are created when the result is)."""
    from ..checkpoint import _check_target, check_parents
    from ..errors import CheckpointError

    if not plan_only:
        _check_target(out.absolute(), force)
        return
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --force")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; with --plan-only, --out is the plan file to write")
    check_parents(out)


def check_heal_texts(args: argparse.Namespace) -> tuple[str, ...]:
    """The --lora-text texts, checked before anything is loaded (never the --eval text)."""
    import peft  # noqa: F401  (a missing install fails here, before anything is loaded)

    texts = tuple(t.strip() for t in args.lora_text.split(",") if t.strip())
    if not texts:
        raise CalibrationError("--lora-text names no text: give one or more texts, comma-separated")
    for t in texts:
        check_text(t)
    if args.eval is not None and args.eval in texts:
        raise CalibrationError(f"--lora-text includes the evaluation text {args.eval!r}: heal on other texts")
    return texts


def load_model(
    ui: UI, spec: str, args: argparse.Namespace | None = None, *, tokenizer: bool = True
) -> tuple[Any, Any, Any]:
    """Load ``spec`` under the load policy of ``args`` (--allow-pickle, --trust-remote-code), timed."""
    from ..loading import load_model as load

    allow_pickle = bool(getattr(args, "allow_pickle", False))
    trust_remote_code = bool(getattr(args, "trust_remote_code", False))
    if allow_pickle:
        ui.info("--allow-pickle: pickled weights are read with torch.load(weights_only=True)")
    if trust_remote_code:
        ui.info("--trust-remote-code: model code shipped with the checkpoint will run")
    with ui.step(f"load {spec}"):
        try:
            return load(
                spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, tokenizer=tokenizer
            )
        except PrunekitError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(f"could not load model {spec!r}: {type(exc).__name__}: {exc}") from exc


def text_windows(
    tok: Any, spec: str, *, seq_len: int, num_windows: int | None, max_tokens: int | None = None
) -> TextWindows:
    from ..text import load_windows

    return load_windows(tok, spec, seq_len=seq_len, num_windows=num_windows, max_tokens=max_tokens)


def multimodal(model: Any, ids: Any) -> tuple[Any, dict[str, Any]]:
    """Calibration windows and the further inputs (images) that reach every tower of ``model``."""
    from ..plugins import select_adapter

    return select_adapter(model).calibration_inputs(model, ids)


def sample_images(model: Any, count: int = 8) -> Any:
    """Sample images for a vision-language model's image-feature fidelity, or ``None`` for a text model."""
    import torch

    if not callable(getattr(model, "get_image_features", None)):
        return None
    # windows long enough for any image's placeholder tokens; only the images are used
    _ids, extra = multimodal(model, torch.zeros((count, 4096), dtype=torch.long))
    return extra.get("pixel_values")
