"""Pruning plans: what to remove, for which model, and why.

A :class:`PrunePlan` is a versioned pydantic model that round-trips through JSON. It names units by their
IR ids and carries the fingerprint of the model it was made for; applying it to another model is a
:class:`~prunekit_core.ir.errors.PlanMismatchError`.

This module serialises (:meth:`PrunePlan.to_json`, :meth:`PrunePlan.from_json`) and touches no file: plan
files are written and read by :func:`prunekit_core.io.checkpoint.save_plan` and
:func:`~prunekit_core.io.checkpoint.load_plan` (atomic writes belong to the I/O layer, above the IR).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .defaults import Granularity, RepairName
from .errors import PlanError, PlanMismatchError
from .model import ModelIR

PLAN_VERSION = 2
#: how to get a plan again, for the errors about a plan file that cannot be read
REMAKE = "make it again with `prunekit prune MODEL --plan-only --out PLAN.json` (or plan_pruning)"


class Fingerprint(BaseModel):
    """Identifies a model: its structure, and a digest of its weights."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    structure: str = Field(description="sha256 of the IR's units and parameter counts")
    weights: str = Field(description="sha256 over a fixed sample of every parameter's values")


class CandidatePlan(BaseModel):
    """One candidate the self-validating default compared (:attr:`PrunePlan.candidates`)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="planner:metric, as PrunePlan.method")
    granularity: Granularity = "block"
    repair: RepairName = "none"
    remove: list[str] = Field(default_factory=list)
    removed_params: int = 0
    heldout_loss: float | None = Field(
        None, description="mean next-token loss on the held-out calibration windows after surgery and repair"
    )
    chosen: bool = False
    note: str = Field("", description="why it was not measured, or which candidate made the same plan")


class Selection(BaseModel):
    """How the self-validating default chose among its candidates (:attr:`PrunePlan.selection`)."""

    model_config = ConfigDict(extra="forbid")

    heldout: str = Field(description="which windows were held out, and how they were split from the rest")
    heldout_windows: int
    heldout_tokens: int
    fit_windows: int = Field(description="windows the candidates were scored and repaired on")
    reason: str = Field(description="why the chosen candidate won")


class PrunePlan(BaseModel):
    """Units to remove from one specific model."""

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    fingerprint: Fingerprint
    remove: list[str] = Field(
        description="unit ids: blocks (text.blocks.3) or sublayers (text.blocks.3.attn)"
    )
    remove_groups: dict[str, list[int]] = Field(
        default_factory=dict,
        description="width pruning: channel-group family id (text.blocks.3.mlp.channels) -> indices of the "
        "groups to remove, counted in the model the plan was made for",
    )
    top_k_policy: Literal["error", "clamp"] = Field(
        "error",
        description="routed families (MoE experts) left with fewer groups than the router's top_k: error, "
        "or clamp (top_k becomes the number left in that layer)",
    )
    width_uniform: bool = Field(
        True, description="every family of a kind keeps the same number of groups (config describes it)"
    )
    method: str = ""
    granularity: Granularity = "block"
    target_ratio: float | None = None
    repair: RepairName = Field(
        "none",
        description="lsq: fold removed branches into surviving projections and refit narrowed output "
        "projections on their kept channels, when applied (needs windows); refit, refit_cosine: as lsq, and "
        "the writers around each gap are refitted to the unpruned stream (surgery/refit.py)",
    )
    removed_params: int = 0
    block_params: int = Field(0, description="parameters of all blocks before pruning (the budget base)")
    scores: dict[str, float] = Field(default_factory=dict, description="metric value per unit, for reports")
    notes: list[str] = Field(default_factory=list)
    recovery: dict[str, Any] = Field(
        default_factory=dict,
        description="what healed the model after surgery (e.g. LoRA: rank, steps, lr, seed, tokens, wall time)",
    )
    candidates: list[CandidatePlan] = Field(
        default_factory=list,
        description="the self-validating default (no metric named): every candidate plan it compared, with "
        "its held-out calibration loss; empty for a plan made with a named metric",
    )
    selection: Selection | None = Field(None, description="how the held-out windows were split; why it won")

    @property
    def achieved_ratio(self) -> float:
        return self.removed_params / self.block_params if self.block_params else 0.0

    @property
    def is_uniform(self) -> bool:
        """True when the config alone describes the result: plain ``from_pretrained`` reloads it.

        That holds when only whole blocks are removed and the config describes every tensor's shape
        (``width_uniform``: every narrowed family of a kind keeps the same number of groups, and no earlier
        cut of a reloaded model left other shapes).
        """
        return all(_is_block_id(u) for u in self.remove) and self.width_uniform

    def to_json(self) -> str:
        """The plan as the JSON text of a plan file (indented, one trailing newline)."""
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, raw: str | bytes, *, source: str = "plan") -> PrunePlan:
        """The plan in ``raw`` (a plan file's content); ``source`` names it in errors.

        Raises :class:`PlanError`, saying how to make the plan again, for an empty text, one that is not
        JSON or not a plan, or a plan of a newer version than this prunekit reads.
        """
        if not raw.strip():
            raise PlanError(f"plan file {source} is empty (an interrupted write?); {REMAKE}")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(
                f"plan file {source} is not valid JSON ({exc}): it is truncated or corrupted; {REMAKE}"
            ) from exc
        if isinstance(data, dict) and data.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise PlanError(
                f"plan {source} has version {data['version']}; this prunekit reads up to {PLAN_VERSION}. Upgrade."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PlanError(f"plan file {source} is not a prunekit plan ({exc}); {REMAKE}") from exc


def _is_block_id(unit: str) -> bool:
    return unit.rsplit(".", 1)[-1].isdigit()


def weight_sample(p: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
    """What the weights fingerprint reads of one tensor: its shape and 64 evenly spaced values."""
    with torch.no_grad():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        return tuple(p.shape), flat[::step][:64].to(torch.float64).numpy().tobytes()


def digest_samples(samples: dict[str, tuple[tuple[int, ...], bytes]]) -> str:
    """The weights fingerprint from :func:`weight_sample` of every state-dict entry (by name)."""
    h = hashlib.sha256()
    for name in sorted(samples):
        shape, data = samples[name]
        h.update(name.encode())
        h.update(str(shape).encode())
        h.update(data)
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, ir: ModelIR, *, weights: str | None = None) -> Fingerprint:
    """The fingerprint of ``model`` as it is now (pruning changes it).

    ``weights`` is the weights digest when the weights are not in ``model`` (an empty streaming skeleton:
    the digest its streaming pass sampled block by block, ``Calibration.weights_digest``).
    """
    sig = json.dumps([ir.architecture, ir.structure_signature()], separators=(",", ":"))
    if weights is None:
        weights = digest_samples({name: weight_sample(p) for name, p in model.state_dict().items()})
    return Fingerprint(
        architecture=ir.architecture,
        structure=hashlib.sha256(sig.encode()).hexdigest()[:16],
        weights=weights,
    )


def check_fingerprint(plan: PrunePlan, actual: Fingerprint) -> None:
    want = plan.fingerprint
    if want.architecture != actual.architecture or want.structure != actual.structure:
        raise PlanMismatchError(
            f"this plan was made for another model ({want.architecture}, structure {want.structure}); "
            f"the model given is {actual.architecture}, structure {actual.structure}. "
            "Make a new plan for this model (prunekit prune / prunekit_core.plan_pruning)."
        )
    if want.weights != actual.weights:
        raise PlanMismatchError(
            f"this plan was made for a model with the same structure but different weights "
            f"(weights {want.weights}, given {actual.weights}). Scores do not transfer between checkpoints: "
            "make a new plan for this model."
        )
