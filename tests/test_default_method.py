"""The self-validating default (no metric named): candidate plans compared on held-out calibration windows.

On a tiny model of every family the tests build, the plan lists every candidate with its held-out loss, the
chosen one is never above ShortGPT BI's on that loss, and the loss recorded for it is the loss of the model
the plan makes (applied for real, with its repair). The held-out windows are disjoint from the windows that
score the units and fit the repair, and the plan says how they were split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, words

import prunekit_core as pk
from prunekit_core.ir.defaults import DEFAULT_CANDIDATES, DEFAULT_HELDOUT_WINDOWS, Candidate
from prunekit_core.ir.errors import CalibrationError, PlanError
from prunekit_core.ir.plan import PrunePlan
from prunekit_core.planning.select import heldout_loss, label
from prunekit_core.registry.plugins import select_adapter
from prunekit_core.study.pipeline import Reporter
from prunekit_core.testing.tiny import TINY_MODELS, VISION_LANGUAGE, tiny_windows

FIT, HELD, SEQ = 8, 4, 32


def _bi(plan: PrunePlan) -> float:
    row = next(c for c in plan.candidates if label(c) == "bi")
    assert row.heldout_loss is not None, "ShortGPT BI is always measured"
    return row.heldout_loss


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_the_default_is_never_worse_than_bi_on_held_out_loss(family: str) -> None:
    model = TINY_MODELS[family]()
    ids = tiny_windows(FIT + HELD, SEQ)
    fit, held = ids[:FIT], ids[FIT:]
    adapter = select_adapter(model)
    cal_ids, extra = adapter.calibration_inputs(model, fit)
    cal = pk.calibrate(model, cal_ids, inputs=extra)
    scope = ["text"] if family in VISION_LANGUAGE else None
    plan = pk.plan_pruning(model, cal, ratio=0.3, heldout=held, repair_windows=fit, scope=scope)

    assert [label(c) for c in plan.candidates] == [label(c) for c in DEFAULT_CANDIDATES]
    chosen = [c for c in plan.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].heldout_loss is not None
    assert chosen[0].heldout_loss <= _bi(plan)
    assert all(c.heldout_loss is None or chosen[0].heldout_loss <= c.heldout_loss for c in plan.candidates)
    assert (plan.remove, plan.repair, plan.method) == (chosen[0].remove, chosen[0].repair, chosen[0].method)
    assert plan.selection is not None and plan.selection.heldout_windows == HELD
    assert plan.selection.fit_windows == FIT
    assert any(n.startswith("default method: ") for n in plan.notes)
    # what was recorded is the model the plan makes: the surgery and its repair, applied for real
    pk.apply_plan(model, plan, repair_windows=fit)
    held_ids, held_extra = adapter.calibration_inputs(model, held)
    assert heldout_loss(model, held_ids, held_extra) == pytest.approx(chosen[0].heldout_loss, abs=1e-5)


def test_the_winner_is_the_lowest_loss_not_the_first() -> None:
    """With BI listed last, a tie or a win by another candidate still picks the lowest loss; the table
    rows keep the order of the candidates."""
    model = TINY_MODELS["phi3"]()  # here the candidates' losses differ (see the test above)
    ids = tiny_windows(FIT + HELD, SEQ)
    cal = pk.calibrate(model, ids[:FIT])
    order = [*DEFAULT_CANDIDATES[2:], DEFAULT_CANDIDATES[0]]
    plan = pk.plan_pruning(model, cal, ratio=0.3, heldout=ids[FIT:], candidates=order)
    losses = [c.heldout_loss for c in plan.candidates]
    assert [label(c) for c in plan.candidates] == [label(c) for c in order]
    measured = [v for v in losses if v is not None]
    assert next(c for c in plan.candidates if c.chosen).heldout_loss == min(measured)
    assert len(set(measured)) > 1, "the candidates must differ for this test to mean anything"


def test_without_held_out_windows_the_last_quarter_of_the_calibration_is_held_out() -> None:
    model = tiny_llama(layers=4, seed=3)
    ids = tiny_windows(8, 16)
    plan = pk.plan_pruning(model, pk.calibrate(model, ids), ratio=0.3)
    assert plan.selection is not None
    assert (plan.selection.fit_windows, plan.selection.heldout_windows) == (6, 2)
    assert "the last 2 of the 8 calibration windows" in plan.selection.heldout
    # the candidates were scored on the first 6 windows only: the same plan as calibrating on those
    again = pk.plan_pruning(model, pk.calibrate(model, ids[:6]), ratio=0.3, heldout=ids[6:])
    assert [c.heldout_loss for c in again.candidates] == [c.heldout_loss for c in plan.candidates]
    with pytest.raises(CalibrationError, match="--windows"):
        pk.plan_pruning(model, pk.calibrate(model, ids[:1]), ratio=0.3)


def test_a_named_repair_or_granularity_narrows_the_candidates() -> None:
    model = tiny_llama(layers=4, seed=3)
    ids = tiny_windows(12, 16)
    cal = pk.calibrate(model, ids[:8])
    plan = pk.plan_pruning(model, cal, ratio=0.3, heldout=ids[8:], repair="none", granularity="block")
    assert [label(c) for c in plan.candidates] == ["bi", "angular"]
    # a repair no default candidate names: every candidate plan with it
    refit = pk.plan_pruning(model, cal, ratio=0.3, heldout=ids[8:], repair="refit", granularity="block")
    assert len(refit.candidates) == 2 and {c.repair for c in refit.candidates} == {"refit"}
    with pytest.raises(PlanError, match="--metric"):
        pk.plan_pruning(model, cal, ratio=0.3, heldout=ids[8:], candidates=[Candidate("bi", "mixed", "none")])
    named = pk.plan_pruning(model, cal, ratio=0.3, metric="bi")
    assert named.candidates == [] and named.selection is None


class Recorder(Reporter):
    def __init__(self) -> None:
        self.tables: list[tuple[str, Sequence[str], Sequence[Sequence[str]]]] = []
        self.lines: list[str] = []

    def say(self, message: str) -> None:
        self.lines.append(message)

    def info(self, message: str) -> None:
        self.lines.append(message)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.tables.append((title, columns, rows))


def test_prune_prints_the_candidates_and_holds_out_windows_after_the_calibration(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(words(3000, seed=1) + "\n")
    rec = Recorder()
    model = tiny_llama(layers=4, seed=3)
    res = pk.prune(
        model, tokenizer=tiny_tokenizer(), ratio=0.3, calib=str(text), seq_len=16, windows=4, reporter=rec
    )
    every = pk.load_windows(
        tiny_tokenizer(), str(text), seq_len=16, num_windows=4 + DEFAULT_HELDOUT_WINDOWS
    ).ids
    # the calibration (scores and repair) read the first 4 windows, the candidates were compared on the next 8
    assert res.calibration is not None and torch.equal(res.calibration.windows, every[:4])
    sel = res.plan.selection
    assert sel is not None and sel.heldout_windows == DEFAULT_HELDOUT_WINDOWS and sel.fit_windows == 4
    assert "windows 4-11" in sel.heldout
    chosen = next(c for c in res.plan.candidates if c.chosen)
    assert heldout_loss(model, every[4:]) == pytest.approx(chosen.heldout_loss, abs=1e-5)
    title, columns, rows = next(t for t in rec.tables if t[0].startswith("default method"))
    assert "held-out loss" in columns and len(rows) == len(DEFAULT_CANDIDATES)
    assert [r[0] for r in rows] == [label(c) for c in DEFAULT_CANDIDATES]
    assert sum(r[-1] == "chosen" for r in rows) == 1
    assert any(line.startswith("chosen: ") for line in rec.lines)
    assert res.report["plan"]["candidates"] and json.dumps(res.report)


def test_an_old_plan_file_without_candidates_still_loads() -> None:
    model = tiny_llama(layers=4, seed=3)
    plan = pk.plan_pruning(model, pk.calibrate(model, tiny_windows(4, 16)), ratio=0.3, metric="bi")
    old = json.loads(plan.to_json())
    del old["candidates"], old["selection"]
    loaded = PrunePlan.from_json(json.dumps(old))
    assert loaded == plan and loaded.candidates == [] and loaded.selection is None
