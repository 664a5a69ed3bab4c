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

and ``pk.recover`` heals a pruned folder afterwards (what ``prunekit recover`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from .adapters.base import ArchitectureAdapter, DecoderAdapter, RemovedBranch
    from .adapters.compose import ComposedAdapter, map_submodel
    from .adapters.declared import BranchSpec, DeclaredDecoderAdapter, GroupFactory, LayoutSpec
    from .adapters.groups import ffn_channels, kv_groups
    from .adapters.vision import feature_fidelity, image_features
    from .io.checkpoint import load_plan, load_pruned, read_plan, save_plan, save_pruned, verify_checkpoint
    from .io.loading import MODEL_ALIASES, load_model
    from .io.text import TEXT_ALIASES, load_windows
    from .ir.errors import (
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
    from .ir.kinds import register_group_kind, register_sublayer_kind
    from .ir.model import (
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
    from .ir.plan import Fingerprint, PrunePlan, fingerprint
    from .ir.stream import StreamWrite
    from .planning.planner import plan_pruning

    # (the list_* names keep prunekit_core.registry.plugins and prunekit_core.scoring.metrics naming the modules)
    from .quant.base import QuantFormat
    from .registry.hookspecs import hookimpl
    from .registry.plugins import adapters as list_adapters
    from .registry.plugins import check_pending, load_failures, select_adapter
    from .registry.plugins import metrics as list_metrics
    from .registry.plugins import plugins as list_plugins
    from .registry.plugins import quant_formats as list_quant_formats
    from .scoring.api import calibrate, inspect, score
    from .scoring.calibration import Calibration, ScoringContext
    from .scoring.metrics import ImportanceMetric, Scores
    from .study.commands import RecoverResult, recover
    from .study.evaluate import PerplexityResult, count_parameters, perplexity, size_on_disk
    from .study.pipeline import PruneResult, Reporter, prune
    from .surgery.apply import AppliedPlan, apply_plan

# public name -> (submodule, attribute). Importing prunekit_core imports none of them, so that the
# command line (`prunekit --help`, `prunekit plugins`) starts without torch, transformers or torchao.
_LAZY: dict[str, tuple[str, str]] = {
    "ArchitectureAdapter": ("adapters.base", "ArchitectureAdapter"),
    "DecoderAdapter": ("adapters.base", "DecoderAdapter"),
    "calibrate": ("scoring.api", "calibrate"),
    "inspect": ("scoring.api", "inspect"),
    "score": ("scoring.api", "score"),
    "load_plan": ("io.checkpoint", "load_plan"),
    "load_pruned": ("io.checkpoint", "load_pruned"),
    "read_plan": ("io.checkpoint", "read_plan"),
    "save_plan": ("io.checkpoint", "save_plan"),
    "save_pruned": ("io.checkpoint", "save_pruned"),
    "verify_checkpoint": ("io.checkpoint", "verify_checkpoint"),
    "ComposedAdapter": ("adapters.compose", "ComposedAdapter"),
    "map_submodel": ("adapters.compose", "map_submodel"),
    "BranchSpec": ("adapters.declared", "BranchSpec"),
    "DeclaredDecoderAdapter": ("adapters.declared", "DeclaredDecoderAdapter"),
    "LayoutSpec": ("adapters.declared", "LayoutSpec"),
    "GroupFactory": ("adapters.declared", "GroupFactory"),
    "ffn_channels": ("adapters.groups", "ffn_channels"),
    "kv_groups": ("adapters.groups", "kv_groups"),
    "register_group_kind": ("ir.kinds", "register_group_kind"),
    "register_sublayer_kind": ("ir.kinds", "register_sublayer_kind"),
    "AmbiguousAdapterError": ("ir.errors", "AmbiguousAdapterError"),
    "CalibrationError": ("ir.errors", "CalibrationError"),
    "CheckpointError": ("ir.errors", "CheckpointError"),
    "ModelNotFoundError": ("ir.errors", "ModelNotFoundError"),
    "PlanError": ("ir.errors", "PlanError"),
    "PlanMismatchError": ("ir.errors", "PlanMismatchError"),
    "PluginError": ("ir.errors", "PluginError"),
    "PrunekitError": ("ir.errors", "PrunekitError"),
    "TextNotFoundError": ("ir.errors", "TextNotFoundError"),
    "UnknownMetricError": ("ir.errors", "UnknownMetricError"),
    "UnsafeCheckpointError": ("ir.errors", "UnsafeCheckpointError"),
    "UnsupportedModelError": ("ir.errors", "UnsupportedModelError"),
    "UnsupportedPatternError": ("ir.errors", "UnsupportedPatternError"),
    "PerplexityResult": ("study.evaluate", "PerplexityResult"),
    "count_parameters": ("study.evaluate", "count_parameters"),
    "perplexity": ("study.evaluate", "perplexity"),
    "size_on_disk": ("study.evaluate", "size_on_disk"),
    "hookimpl": ("registry.hookspecs", "hookimpl"),
    "Block": ("ir.model", "Block"),
    "ChannelGroup": ("ir.model", "ChannelGroup"),
    "Dim": ("ir.model", "Dim"),
    "Expert": ("ir.model", "Expert"),
    "GroupMember": ("ir.model", "GroupMember"),
    "ModelIR": ("ir.model", "ModelIR"),
    "ResidualEdge": ("ir.model", "ResidualEdge"),
    "StreamWrite": ("ir.stream", "StreamWrite"),
    "Stage": ("ir.model", "Stage"),
    "Sublayer": ("ir.model", "Sublayer"),
    "Tower": ("ir.model", "Tower"),
    "MODEL_ALIASES": ("ir.defaults", "MODEL_ALIASES"),
    "load_model": ("io.loading", "load_model"),
    "ImportanceMetric": ("scoring.metrics", "ImportanceMetric"),
    "Scores": ("scoring.metrics", "Scores"),
    "Fingerprint": ("ir.plan", "Fingerprint"),
    "PrunePlan": ("ir.plan", "PrunePlan"),
    "fingerprint": ("ir.plan", "fingerprint"),
    "plan_pruning": ("planning.planner", "plan_pruning"),
    "PruneResult": ("study.pipeline", "PruneResult"),
    "Reporter": ("study.pipeline", "Reporter"),
    "prune": ("study.pipeline", "prune"),
    "RecoverResult": ("study.commands", "RecoverResult"),
    "recover": ("study.commands", "recover"),
    "list_adapters": ("registry.plugins", "adapters"),
    "check_pending": ("registry.plugins", "check_pending"),
    "load_failures": ("registry.plugins", "load_failures"),
    "select_adapter": ("registry.plugins", "select_adapter"),
    "list_metrics": ("registry.plugins", "metrics"),
    "list_plugins": ("registry.plugins", "plugins"),
    "list_quant_formats": ("registry.plugins", "quant_formats"),
    "QuantFormat": ("quant.base", "QuantFormat"),
    "Calibration": ("scoring.calibration", "Calibration"),
    "ScoringContext": ("scoring.calibration", "ScoringContext"),
    "RemovedBranch": ("adapters.base", "RemovedBranch"),
    "AppliedPlan": ("surgery.apply", "AppliedPlan"),
    "apply_plan": ("surgery.apply", "apply_plan"),
    "TEXT_ALIASES": ("ir.defaults", "TEXT_ALIASES"),
    "load_windows": ("io.text", "load_windows"),
    "feature_fidelity": ("adapters.vision", "feature_fidelity"),
    "image_features": ("adapters.vision", "image_features"),
}

__version__ = "0.1.0"

__all__ = [
    "GroupFactory",
    "ffn_channels",
    "kv_groups",
    "register_group_kind",
    "register_sublayer_kind",
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
    "Reporter",
    "PrunekitError",
    "QuantFormat",
    "RecoverResult",
    "RemovedBranch",
    "ResidualEdge",
    "StreamWrite",
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
    "recover",
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
        # a submodule (prunekit_core.planning.planner, ...): reachable as an attribute, as when this package imported
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
