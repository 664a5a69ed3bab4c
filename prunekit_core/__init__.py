"""prunekit core: the pruning IR, plugin system, metrics, planners, surgery, evaluation and checkpoints.

Ten lines do what ``prunekit prune`` does::

    import prunekit_core as pk

    model, tok, _ = pk.load_model("smollm2-135m")
    calib = pk.load_windows(tok, "c4", seq_len=256, num_windows=32).ids
    cal = pk.calibrate(model, calib)
    plan = pk.plan_pruning(model, cal, ratio=0.1)  # prunekit's best: an angular-distance span + least-squares repair
    applied = pk.apply_plan(model, plan, repair_windows=calib)  # in place; the plan as applied
    print(pk.perplexity(model, pk.load_windows(tok, "wiki", seq_len=1024, num_windows=4).ids))
    pk.save_pruned(model, "out/smollm2-pruned", tokenizer=tok, plan=applied.plan)
    model = pk.load_pruned("out/smollm2-pruned")

or one call, with the command's checks and a result that holds the plan, the report and the timings::

    res = pk.prune("smollm2-135m", ratio=0.1, calib="c4", eval="wiki", out="out/smollm2-pruned")
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from .adapter import ArchitectureAdapter, DecoderAdapter, RemovedBranch
    from .api import calibrate, inspect, score
    from .checkpoint import load_plan, load_pruned, read_plan, save_plan, save_pruned, verify_checkpoint
    from .compose import ComposedAdapter, map_submodel
    from .declared import BranchSpec, DeclaredDecoderAdapter, LayoutSpec
    from .errors import (
        AmbiguousAdapterError,
        CalibrationError,
        CheckpointError,
        ModelNotFoundError,
        PlanError,
        PlanMismatchError,
        PluginError,
        PrunekitError,
        TextNotFoundError,
        UnknownMetricError,
        UnsafeCheckpointError,
        UnsupportedModelError,
        UnsupportedPatternError,
    )
    from .evaluate import PerplexityResult, count_parameters, perplexity, size_on_disk
    from .hookspecs import hookimpl
    from .ir import (
        Block,
        ChannelGroup,
        Dim,
        Expert,
        GroupMember,
        ModelIR,
        ResidualEdge,
        Stage,
        Sublayer,
        Tower,
    )
    from .loading import MODEL_ALIASES, load_model
    from .metrics import ImportanceMetric, Scores
    from .pipeline import PruneResult, prune
    from .plan import Fingerprint, PrunePlan, fingerprint
    from .planning import plan_pruning
    from .plugins import adapters as list_adapters
    from .plugins import check_pending, load_failures, select_adapter
    from .plugins import metrics as list_metrics
    from .plugins import plugins as list_plugins
    from .plugins import quant_formats as list_quant_formats

    # (the list_* names keep prunekit_core.plugins and prunekit_core.metrics naming the modules)
    from .quant import QuantFormat
    from .scoring import Calibration, ScoringContext
    from .surgery import AppliedPlan, apply_plan
    from .text import TEXT_ALIASES, load_windows
    from .vision import feature_fidelity, image_features

# public name -> (submodule, attribute). Importing prunekit_core imports none of them, so that the
# command line (`prunekit --help`, `prunekit plugins`) starts without torch, transformers or torchao.
_LAZY: dict[str, tuple[str, str]] = {
    "ArchitectureAdapter": ("adapter", "ArchitectureAdapter"),
    "DecoderAdapter": ("adapter", "DecoderAdapter"),
    "calibrate": ("api", "calibrate"),
    "inspect": ("api", "inspect"),
    "score": ("api", "score"),
    "load_plan": ("checkpoint", "load_plan"),
    "load_pruned": ("checkpoint", "load_pruned"),
    "read_plan": ("checkpoint", "read_plan"),
    "save_plan": ("checkpoint", "save_plan"),
    "save_pruned": ("checkpoint", "save_pruned"),
    "verify_checkpoint": ("checkpoint", "verify_checkpoint"),
    "ComposedAdapter": ("compose", "ComposedAdapter"),
    "map_submodel": ("compose", "map_submodel"),
    "BranchSpec": ("declared", "BranchSpec"),
    "DeclaredDecoderAdapter": ("declared", "DeclaredDecoderAdapter"),
    "LayoutSpec": ("declared", "LayoutSpec"),
    "AmbiguousAdapterError": ("errors", "AmbiguousAdapterError"),
    "CalibrationError": ("errors", "CalibrationError"),
    "CheckpointError": ("errors", "CheckpointError"),
    "ModelNotFoundError": ("errors", "ModelNotFoundError"),
    "PlanError": ("errors", "PlanError"),
    "PlanMismatchError": ("errors", "PlanMismatchError"),
    "PluginError": ("errors", "PluginError"),
    "PrunekitError": ("errors", "PrunekitError"),
    "TextNotFoundError": ("errors", "TextNotFoundError"),
    "UnknownMetricError": ("errors", "UnknownMetricError"),
    "UnsafeCheckpointError": ("errors", "UnsafeCheckpointError"),
    "UnsupportedModelError": ("errors", "UnsupportedModelError"),
    "UnsupportedPatternError": ("errors", "UnsupportedPatternError"),
    "PerplexityResult": ("evaluate", "PerplexityResult"),
    "count_parameters": ("evaluate", "count_parameters"),
    "perplexity": ("evaluate", "perplexity"),
    "size_on_disk": ("evaluate", "size_on_disk"),
    "hookimpl": ("hookspecs", "hookimpl"),
    "Block": ("ir", "Block"),
    "ChannelGroup": ("ir", "ChannelGroup"),
    "Dim": ("ir", "Dim"),
    "Expert": ("ir", "Expert"),
    "GroupMember": ("ir", "GroupMember"),
    "ModelIR": ("ir", "ModelIR"),
    "ResidualEdge": ("ir", "ResidualEdge"),
    "Stage": ("ir", "Stage"),
    "Sublayer": ("ir", "Sublayer"),
    "Tower": ("ir", "Tower"),
    "MODEL_ALIASES": ("defaults", "MODEL_ALIASES"),
    "load_model": ("loading", "load_model"),
    "ImportanceMetric": ("metrics", "ImportanceMetric"),
    "Scores": ("metrics", "Scores"),
    "Fingerprint": ("plan", "Fingerprint"),
    "PrunePlan": ("plan", "PrunePlan"),
    "fingerprint": ("plan", "fingerprint"),
    "plan_pruning": ("planning", "plan_pruning"),
    "PruneResult": ("pipeline", "PruneResult"),
    "prune": ("pipeline", "prune"),
    "list_adapters": ("plugins", "adapters"),
    "check_pending": ("plugins", "check_pending"),
    "load_failures": ("plugins", "load_failures"),
    "select_adapter": ("plugins", "select_adapter"),
    "list_metrics": ("plugins", "metrics"),
    "list_plugins": ("plugins", "plugins"),
    "list_quant_formats": ("plugins", "quant_formats"),
    "QuantFormat": ("quant", "QuantFormat"),
    "Calibration": ("scoring", "Calibration"),
    "ScoringContext": ("scoring", "ScoringContext"),
    "RemovedBranch": ("adapter", "RemovedBranch"),
    "AppliedPlan": ("surgery", "AppliedPlan"),
    "apply_plan": ("surgery", "apply_plan"),
    "TEXT_ALIASES": ("defaults", "TEXT_ALIASES"),
    "load_windows": ("text", "load_windows"),
    "feature_fidelity": ("vision", "feature_fidelity"),
    "image_features": ("vision", "image_features"),
}

__version__ = "0.1.0"

__all__ = [
    "AmbiguousAdapterError",
    "AppliedPlan",
    "ArchitectureAdapter",
    "Block",
    "Calibration",
    "CalibrationError",
    "BranchSpec",
    "ChannelGroup",
    "ComposedAdapter",
    "CheckpointError",
    "DecoderAdapter",
    "DeclaredDecoderAdapter",
    "Dim",
    "Expert",
    "Fingerprint",
    "GroupMember",
    "ImportanceMetric",
    "LayoutSpec",
    "MODEL_ALIASES",
    "ModelIR",
    "ModelNotFoundError",
    "PerplexityResult",
    "PlanError",
    "PlanMismatchError",
    "PluginError",
    "PrunePlan",
    "PruneResult",
    "PrunekitError",
    "QuantFormat",
    "RemovedBranch",
    "ResidualEdge",
    "Scores",
    "ScoringContext",
    "Stage",
    "Sublayer",
    "TEXT_ALIASES",
    "TextNotFoundError",
    "Tower",
    "UnknownMetricError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "UnsupportedPatternError",
    "list_adapters",
    "apply_plan",
    "calibrate",
    "check_pending",
    "count_parameters",
    "feature_fidelity",
    "fingerprint",
    "hookimpl",
    "image_features",
    "inspect",
    "load_failures",
    "load_model",
    "load_plan",
    "load_pruned",
    "load_windows",
    "map_submodel",
    "list_metrics",
    "perplexity",
    "plan_pruning",
    "prune",
    "read_plan",
    "list_plugins",
    "list_quant_formats",
    "save_plan",
    "save_pruned",
    "score",
    "select_adapter",
    "size_on_disk",
    "verify_checkpoint",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use (PEP 562), then keep it in the package."""
    if name not in _LAZY:
        # a submodule (prunekit_core.planning, ...): reachable as an attribute, as when this package imported
        # every submodule eagerly
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
