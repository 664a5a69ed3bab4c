"""Typed errors raised by prunekit.

Every error derives from :class:`PrunekitError`. Callers (the CLI in particular) may catch
``PrunekitError`` and print ``str(err)`` to the user: the message always says what is wrong and
how to fix it, so no traceback is needed.
"""

from __future__ import annotations

import difflib


class PrunekitError(Exception):
    """Base class; message says what is wrong and how to fix it."""


class ModelNotFoundError(PrunekitError):
    """A model spec (alias, folder, GGUF file or hub id) could not be resolved or loaded."""


class TextNotFoundError(PrunekitError):
    """A text spec (alias or file path) could not be resolved to a readable file."""


class CalibrationError(PrunekitError):
    """Text is unusable for calibration/evaluation (empty, too short for one window, ...)."""


class PluginError(PrunekitError):
    """A plugin registered something invalid (wrong type, duplicate name, failing hook)."""


class UnsupportedModelError(PrunekitError):
    """No installed architecture adapter matches the model."""

    def __init__(
        self, *, model_class: str, model_type: str | None, installed: list[str], failures: list[str]
    ) -> None:
        self.model_class = model_class
        self.model_type = model_type
        self.installed = installed
        self.failures = failures
        msg = (
            f"no prunekit adapter supports {model_class} (model_type={model_type!r}). "
            f"Installed adapters: {', '.join(installed) if installed else 'none'}. "
        )
        if failures:
            msg += f"Plugins that failed to load: {', '.join(failures)} (see `prunekit plugins`). "
        msg += (
            "Install the plugin for this family (Llama/Mistral/Qwen2: pip install -e plugins/llama), "
            "or write one: `prunekit new-plugin NAME --model-class CLASS` writes a working skeleton "
            "(docs/plugins/writing-a-plugin.md)."
        )
        super().__init__(msg)


class AmbiguousAdapterError(PrunekitError):
    """Two adapters claim the same model with the same score."""

    def __init__(self, model_class: str, score: float, contenders: list[tuple[str, str]]) -> None:
        names = ", ".join(f"{a} (plugin {p})" for a, p in contenders)
        super().__init__(
            f"adapters tie for {model_class} with match score {score}: {names}. "
            "Uninstall one of the plugins, or pass adapter=NAME to choose explicitly."
        )


class UnknownMetricError(PrunekitError):
    """A metric name that no plugin registered."""

    def __init__(self, name: str, available: list[str]) -> None:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown metric {name!r}.{hint} Available: {', '.join(available) or 'none'}.")


class PlanError(PrunekitError):
    """A pruning plan is invalid for the model (unknown unit, nothing left, wrong budget)."""


class PlanMismatchError(PlanError):
    """A plan was made for another model (its fingerprint differs)."""


class CheckpointError(PrunekitError):
    """A pruned checkpoint is missing, incomplete or inconsistent."""


class UnsafeCheckpointError(PrunekitError):
    """Loading would run code from the checkpoint (pickled weights, model code) without the user's consent."""


class UnsupportedPatternError(PrunekitError):
    """The generic adapter found a structure it cannot map into the IR; the message names the pattern."""

    def __init__(self, model_class: str, pattern: str) -> None:
        self.model_class = model_class
        self.pattern = pattern
        super().__init__(
            f"the generic adapter cannot describe {model_class}: {pattern}. Declare this family in a plugin "
            "written by hand (`prunekit new-plugin` reads models the same way, so it cannot write this one): "
            "copy examples/prunekit-gptj and set its layout and branches (docs/plugins/writing-a-plugin.md, "
            "section 2)."
        )
