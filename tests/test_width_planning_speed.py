"""The width and mixed planners' fast path: the least uniform widths measured in place, mixed splits left
out before they are measured, and a long step's progress lines when stderr is not a terminal."""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import threading
from typing import Any

import pytest
import torch
from test_width import model_, windows

import prunekit_core as pk
import prunekit_core.planning.width as width_mod
from prunekit_core.registry.plugins import select_adapter
from prunekit_core.scoring.calibration import Calibration, TrialRunner
from prunekit_core.surgery.repair import collect_width_stats


def _plan(model: Any, ids: torch.Tensor, *, estimate: bool, monkeypatch: Any, **kw: Any) -> Any:
    with monkeypatch.context() as m:
        m.setattr(width_mod, "plan_width", functools.partial(width_mod.plan_width, estimate=estimate))
        return pk.plan_pruning(model, Calibration(windows=ids), **kw)


def test_uniform_frontier_is_the_least_widths_that_meet_the_budget() -> None:
    model = model_(heads=4, kv=4)
    ir = pk.inspect(model)
    fams = ir.channel_groups()
    shapes = width_mod.shape_costs(fams, {f: list(range(fams[f][1].count)) for f in fams}, 8)
    for target in (1000, 5000, 9000):
        options, more = width_mod.uniform_frontier(shapes, ir, target, limit=100)
        got = {tuple(sorted((fc.family, fc.ks[p[fc.family]]) for fc in shapes)) for p in options}
        # brute force: every uniform choice (one cut per kind) that fits, none removing more of every kind
        kinds: dict[str, list[Any]] = {}
        for fc in shapes:
            kinds.setdefault(fams[fc.family][1].kind, []).append(fc)
        levels = {k: sorted(set.intersection(*(set(fc.ks) for fc in v))) for k, v in kinds.items()}
        names = sorted(kinds)
        fits = [
            c
            for c in itertools.product(*(levels[n] for n in names))
            if sum(fc.params[fc.ks.index(k)] for n, k in zip(names, c, strict=True) for fc in kinds[n])
            >= target
        ]
        least = [
            c
            for c in fits
            if not any(d != c and all(a <= b for a, b in zip(d, c, strict=True)) for d in fits)
        ]
        want = {
            tuple(sorted((fc.family, k) for n, k in zip(names, c, strict=True) for fc in kinds[n]))
            for c in least
        }
        assert not more and got == want and len(want) >= 1, target


def test_uniform_plan_is_the_old_one_where_one_width_fits(monkeypatch: Any) -> None:
    model = model_(heads=4, kv=1)  # one KV group: only the FFN channels can narrow, one least width
    ids = windows()
    kw = {"ratio": 0.15, "metric": "obs", "granularity": "width", "repair": "lsq", "round_to": 8}
    new = _plan(model, ids, estimate=False, monkeypatch=monkeypatch, **kw)
    old = _plan(model, ids, estimate=True, monkeypatch=monkeypatch, **kw)
    assert new.remove_groups and (new.remove, new.remove_groups) == (old.remove, old.remove_groups)
    assert "one least uniform width meets the budget" in " ".join(new.notes)


@pytest.mark.parametrize("seed", [0, 1])
def test_measured_uniform_width_is_never_worse_than_the_estimated_one(seed: int, monkeypatch: Any) -> None:
    """On the loss it measures (the removal trials' windows, each width cut in place with its refit), the
    new choice is at most the old cost model's choice."""
    model = model_(heads=4, kv=4, seed=seed)
    ids = windows(seed=seed)
    kw = {"ratio": 0.25, "metric": "obs", "granularity": "width", "repair": "lsq", "round_to": 8}
    new = _plan(model, ids, estimate=False, monkeypatch=monkeypatch, **kw)
    old = _plan(model, ids, estimate=True, monkeypatch=monkeypatch, **kw)
    ir = pk.inspect(model)
    runner = TrialRunner(model, select_adapter(model), ids[:8], loss_stride=4)
    stats = collect_width_stats(model, ir, ids)

    def loss(groups: dict[str, list[int]]) -> float:
        with width_mod.width_cut(model, ir, groups, stats):
            return runner.loss(start="text.blocks.0")

    assert "least uniform widths meet the budget" in " ".join(new.notes)
    assert loss(new.remove_groups) <= loss(old.remove_groups) + 1e-6
    torch.testing.assert_close(loss({}), runner.base_loss)  # the cut is undone


def test_mixed_leaves_out_splits_whose_width_part_cannot_win(monkeypatch: Any) -> None:
    model = model_(layers=6)
    ids = windows()
    measured: list[int] = []

    def costly(ctx: Any, runner: Any, costs: Any, options: Any, **_kw: Any) -> list[float]:
        measured.append(len(options))
        return [10.0] * len(options)  # every width part alone costs more than any depth plan

    monkeypatch.setattr(width_mod, "measure_uniform", costly)
    plan = pk.plan_pruning(
        model, Calibration(windows=ids), ratio=0.3, metric="obs", granularity="mixed", repair="lsq"
    )
    notes = " ".join(plan.notes)
    assert measured and plan.remove and not plan.remove_groups
    assert "left out unmeasured" in notes and "uniform width only +10.0000" in notes
    assert "chosen: depth only" in notes


def test_mixed_plan_applies_and_lists_its_candidates() -> None:
    model = model_(layers=6)
    ids = windows()
    plan = pk.plan_pruning(
        model, Calibration(windows=ids), ratio=0.3, metric="wanda", granularity="mixed", repair="lsq"
    )
    assert plan.achieved_ratio >= 0.3 and "depth only" in " ".join(plan.notes)
    removed = plan.removed_params
    pk.apply_plan(model, plan, repair_windows=ids)
    assert pk.inspect(model).block_params() == plan.block_params - removed


def test_a_long_step_prints_progress_when_stderr_is_not_a_terminal() -> None:
    from prunekit_core.cli.ui import heartbeat

    lines: list[str] = []
    seen = threading.Event()

    class Fake:
        def info(self, message: str) -> None:
            lines.append(message)
            if "trial 3/60" in message:
                seen.set()

    log = logging.getLogger("prunekit_core.planning.width")
    old = log.level
    log.setLevel(logging.INFO)
    try:
        with heartbeat(Fake(), "plan", every=0.01):  # type: ignore[arg-type]  # only info() is called
            log.info("width: sublayer removal trial %d/%d", 3, 60)
            assert seen.wait(10)
    finally:
        log.setLevel(old)
    assert any(
        line.startswith("plan: ") and "so far; width: sublayer removal trial 3/60" in line for line in lines
    )


@pytest.mark.parametrize("kv", [2, 4])
def test_obs_scores_all_groups_at_once_equal_the_per_group_formula(kv: int) -> None:
    from prunekit_core.adapters.base import get_module, module_tensor
    from prunekit_core.scoring.builtin_metrics import obs_scores
    from prunekit_core.surgery.repair import out_member, out_proj_path
    from prunekit_core.surgery.width import width_families

    model = model_(heads=4, kv=kv)
    ir = pk.inspect(model)
    stats = collect_width_stats(model, ir, windows())
    for fid, (sub, fam) in width_families(ir).items():
        member = out_member(sub, fam)
        assert member is not None
        path = out_proj_path(sub)
        W = module_tensor(get_module(model, path), "weight").detach().double()
        G = stats.gram[path] + stats.gram_hold.get(path, 0)
        G = G + 1e-6 * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
        Gi = torch.linalg.inv(G)
        ref = []
        for g in range(fam.count):
            s = slice(member.offset + g * member.width, member.offset + (g + 1) * member.width)
            ref.append((W[:, s] @ torch.linalg.inv(Gi[s, s]) * W[:, s]).sum())
        got = obs_scores(model, sub, fam, stats)
        torch.testing.assert_close(got, torch.stack(ref), rtol=1e-9, atol=0)
        assert torch.equal(torch.argsort(got, stable=True), torch.argsort(torch.stack(ref), stable=True)), fid


def test_an_in_place_cut_computes_what_the_surgery_does() -> None:
    from prunekit_core.ir.plan import PrunePlan, fingerprint

    model = model_(heads=4, kv=2)
    ids = windows()
    ir = pk.inspect(model)
    groups = {"text.blocks.1.attn.kv_groups": [1], "text.blocks.2.mlp.channels": list(range(0, 64, 3))}
    runner = TrialRunner(model, select_adapter(model), ids[:8], loss_stride=4)
    with width_mod.width_cut(model, ir, groups, None):
        cut = runner.loss(start="text.blocks.1")
    pruned = copy.deepcopy(model)
    pk.apply_plan(
        pruned, PrunePlan(fingerprint=fingerprint(model, ir), remove=[], remove_groups=groups, repair="none")
    )
    after = TrialRunner(pruned, select_adapter(pruned), ids[:8], loss_stride=4).base_loss
    assert cut != runner.base_loss
    torch.testing.assert_close(cut, after, rtol=1e-6, atol=1e-6)
