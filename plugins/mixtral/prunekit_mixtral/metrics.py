"""Expert importance metrics: routing frequency, routing mass, MoE-Pruner, output reconstruction, random.

One calibration pass (:func:`collect_expert_stats`, shared through the scoring context) records, at the
input of every MoE layer's fused experts (``experts(hidden, top_k_index, top_k_weights)``, the interface
every transformers fused-experts kernel takes), for each expert ``e``:

- how many tokens the router sent to it (frequency) and the sum of their routing weights (mass);
- MoE-Pruner's input norms: ``||X_j * g||`` over the tokens routed to ``e``, ``g`` their routing weight, for
  the expert's inputs (the hidden state) and for its down projection's inputs (``act(x W_gate) * (x W_up)``,
  recomputed on those tokens);
- and a sample of the MoE block's inputs, on which the reconstruction metric replays the block with each
  expert masked (its router logit at -inf, :func:`~prunekit_core.surgery.routing.router_rows_masked`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit_core.adapters.base import get_module, module_attr
from prunekit_core.ir.model import ChannelGroup, ModelIR, Sublayer
from prunekit_core.scoring.calibration import Collector, ScoringContext
from prunekit_core.scoring.metrics import ExpertMetric
from prunekit_core.surgery.routing import router_rows_masked
from prunekit_core.surgery.width import routed_families

STATS_KEY = "prunekit_mixtral.expert_stats"


@dataclass
class ExpertStats:
    """Per routed family (id): statistics of its experts over the calibration tokens."""

    frequency: dict[str, torch.Tensor] = field(default_factory=dict)  # [E] tokens routed to each expert
    mass: dict[str, torch.Tensor] = field(default_factory=dict)  # [E] sum of routing weights
    in_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # [E, H] sum of (g * x)^2
    mid_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # [E, I] sum of (g * act(x Wg) * x Wu)^2
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE block input sample [1, n, H]
    tokens: int = 0


def _moe_families(ir: ModelIR) -> dict[str, tuple[Sublayer, ChannelGroup]]:
    return {fid: v for fid, v in routed_families(ir).items() if v[0].kind == "moe"}


def expert_collector(
    model: nn.Module, ir: ModelIR, windows: torch.Tensor, *, sample_tokens: int = 2048
) -> tuple[ExpertStats, list[Any]]:
    """The hooks of :func:`collect_expert_stats` on every MoE layer of ``ir`` (a
    :data:`~prunekit_core.scoring.calibration.Collector`: the caller runs the windows; a streaming pass, one block's)."""
    stats = ExpertStats(tokens=int(windows.numel()))
    handles = []
    for fid, (sub, _fam) in _moe_families(ir).items():
        block = get_module(model, sub.module)
        experts = get_module(block, "experts")
        n_exp, two_i, hidden = experts.get_parameter("gate_up_proj").shape
        stats.frequency[fid] = torch.zeros(n_exp, dtype=torch.float64)
        stats.mass[fid] = torch.zeros(n_exp, dtype=torch.float64)
        stats.in_sq[fid] = torch.zeros(n_exp, hidden, dtype=torch.float64)
        stats.mid_sq[fid] = torch.zeros(n_exp, two_i // 2, dtype=torch.float64)
        handles.append(experts.register_forward_pre_hook(_routing_hook(fid, experts, stats)))
        handles.append(block.register_forward_pre_hook(_sample_hook(fid, stats, sample_tokens)))
    return stats, handles


@torch.inference_mode()
def collect_expert_stats(
    model: nn.Module, ir: ModelIR, windows: torch.Tensor, *, batch_size: int = 8, sample_tokens: int = 2048
) -> ExpertStats:
    """One pass over ``windows`` ([n, seq_len] token ids); keeps ``sample_tokens`` MoE inputs per layer."""
    stats, handles = expert_collector(model, ir, windows, sample_tokens=sample_tokens)
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def _routing_hook(fid: str, experts: nn.Module, stats: ExpertStats) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        hidden, index, weights = args[0], args[1], args[2]
        x = hidden.double()
        w_gate_up = experts.get_parameter("gate_up_proj")
        inter = w_gate_up.shape[1] // 2
        for e in torch.unique(index).tolist():
            if e >= module_attr(experts, "num_experts"):
                continue  # an expert-parallel sentinel
            tok, pos = torch.where(index == e)
            g = weights[tok, pos].double()
            stats.frequency[fid][e] += len(tok)
            stats.mass[fid][e] += g.sum()
            xe = x[tok]
            stats.in_sq[fid][e] += ((xe * g[:, None]) ** 2).sum(0)
            gate_up = xe @ w_gate_up[e].double().T
            mid = module_attr(experts, "act_fn")(gate_up[:, :inter]) * gate_up[:, inter:]
            stats.mid_sq[fid][e] += ((mid * g[:, None]) ** 2).sum(0)

    return hook


def _sample_hook(fid: str, stats: ExpertStats, limit: int) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        have = stats.inputs.get(fid)
        n = 0 if have is None else have.shape[1]
        if n >= limit:
            return
        x = args[0].detach().reshape(1, -1, args[0].shape[-1])[:, : limit - n].clone()
        stats.inputs[fid] = x if have is None else torch.cat([have, x], dim=1)

    return hook


def expert_stats(ctx: ScoringContext) -> ExpertStats:
    """The shared statistics of ``ctx`` (collected on first use, one pass for every expert metric; in a
    streaming pass, while each block runs)."""
    stats: ExpertStats = ctx.observed(STATS_KEY, expert_collector)
    return stats


class _StatsMetric(ExpertMetric):
    """An expert metric computed from the routing statistics and the weights of the block's experts: a
    streaming pass computes it one block at a time."""

    streaming = True

    def collectors(self) -> dict[str, Collector]:
        return {STATS_KEY: expert_collector}


class RoutingFrequency(_StatsMetric):
    name = "expert_frequency"
    description = "experts: fraction of calibration tokens the router sends to each expert (top-k hits)"
    reference = "common baseline, e.g. NAEE (arXiv 2402.14800)"

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        stats = expert_stats(ctx)
        return {fid: t / max(stats.tokens, 1) for fid, t in stats.frequency.items()}


class RoutingMass(_StatsMetric):
    name = "expert_mass"
    description = "experts: sum of the routing weights each expert receives, per calibration token"
    reference = "common baseline, e.g. NAEE (arXiv 2402.14800)"

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        stats = expert_stats(ctx)
        return {fid: t / max(stats.tokens, 1) for fid, t in stats.mass.items()}


class MoEPruner(_StatsMetric):
    name = "moe_pruner"
    description = (
        "experts: MoE-Pruner's router-weighted Wanda score |W_ij| * ||X_j * gate|| summed over each "
        "expert's weights (gate/up on the hidden state, down on the expert's own activations)"
    )
    reference = "MoE-Pruner, arXiv 2410.12013 (aggregated per expert)"

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        stats = expert_stats(ctx)
        out = {}
        for fid, (sub, _fam) in _moe_families(ctx.ir).items():
            experts = get_module(ctx.model, f"{sub.module}.experts")
            gate_up = experts.get_parameter("gate_up_proj").detach().double().abs()  # [E, 2I, H]
            down = experts.get_parameter("down_proj").detach().double().abs()  # [E, H, I]
            in_norm = stats.in_sq[fid].sqrt()  # [E, H]
            mid_norm = stats.mid_sq[fid].sqrt()  # [E, I]
            out[fid] = (gate_up * in_norm[:, None, :]).sum((1, 2)) + (down * mid_norm[:, None, :]).sum((1, 2))
        return out


class OutputReconstruction(_StatsMetric):
    name = "expert_reconstruction"
    description = (
        "experts: relative change of the MoE block's output on sampled calibration tokens when the expert "
        "is removed (its router logit at -inf; the router renormalises over the rest)"
    )
    reference = "output-reconstruction criterion, as in NAEE's layer-wise reconstruction (arXiv 2402.14800)"

    @torch.inference_mode()
    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        stats = expert_stats(ctx)
        out = {}
        for fid, (sub, fam) in _moe_families(ctx.ir).items():
            block = get_module(ctx.model, sub.module)
            x = stats.inputs[fid]
            y = block(x).double()
            energy = (y * y).sum().clamp_min(1e-30)
            scores = torch.empty(fam.count, dtype=torch.float64)
            router = fam.router
            assert router is not None  # routed_families: each of these families has its router
            for e in range(fam.count):
                with router_rows_masked(ctx.model, {router: [e]}):
                    ye = block(x).double()
                scores[e] = ((y - ye) ** 2).sum() / energy
            out[fid] = scores
        return out


class RandomExperts(ExpertMetric):
    name = "expert_random"
    description = "experts: a seeded random order (seed 0 and the family id) — the baseline every expert metric must beat"
    reference = "baseline"
    streaming = True  # nothing but the family ids: any block, any time

    def score_groups(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        # one generator per family, seeded from seed 0 and the family id: the same order whichever
        # families a context holds (a streaming pass scores one block's at a time)
        return {
            fid: torch.rand(
                fam.count,
                generator=torch.Generator().manual_seed(zlib.crc32(f"0:{fid}".encode())),
                dtype=torch.float64,
            )
            for fid, (_s, fam) in routed_families(ctx.ir).items()
        }


EXPERT_METRICS = (RoutingFrequency, RoutingMass, MoEPruner, OutputReconstruction, RandomExperts)
