"""``prunekit_core.prune``: the one pipeline the CLI, the demo, the sweep and the benchmarks run.

Checked against the step-by-step API (load_windows, calibrate, plan_pruning, apply_plan, perplexity,
save_pruned) on the same tiny random models and texts: the same plan, the same weights, the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import logits_of, save_tiny_model, tiny_llama, tiny_tokenizer, words

import prunekit_core as pk
from prunekit_core.ir.errors import CalibrationError, PlanError
from prunekit_core.scoring.calibration import Calibration
from prunekit_core.study.pipeline import Reporter

SEQ, N = 16, 4


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline-text") / "text.txt"
    path.write_text(words(3000, seed=1) + "\n")
    return path


def step_by_step(model: torch.nn.Module, text: Path, *, stats: bool = True, **kw: object) -> pk.PrunePlan:
    """What prune does, written out with the public API (``stats``: run the calibration pass). The default
    method (no metric) compares its candidates on the windows of the text that follow the calibration's."""
    ids = pk.load_windows(tiny_tokenizer(), str(text), seq_len=SEQ, num_windows=N).ids
    cal = pk.calibrate(model, ids) if stats else Calibration(windows=ids)
    if "metric" not in kw and kw.get("granularity", "block") == "block":
        kw["heldout"] = heldout_windows(text)
    plan = pk.plan_pruning(model, cal, **kw)  # type: ignore[arg-type]  # **kw: option values of several types
    return pk.apply_plan(model, plan, repair_windows=ids).plan  # as applied: with the repair's notes


def comparable(plan: pk.PrunePlan) -> dict[str, object]:
    """A plan's fields, less how long planning took (a note) and what the surgery found (width_uniform)."""
    data = plan.model_dump(exclude={"width_uniform"})
    # timings, and how the held-out windows are described (the same windows: checked by the weights)
    data["notes"] = [
        n for n in data["notes"] if not n.startswith(("planning took", "comparing", "held out:"))
    ]
    if data["selection"]:
        data["selection"].pop("heldout")
    return data


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    ("kw", "stats"),
    [
        ({}, True),  # prunekit's best: an angular span with the least-squares repair
        ({"metric": "bi", "granularity": "block", "planner": "rank", "repair": "none"}, True),
        ({"granularity": "sublayer"}, True),
        ({"metric": "magnitude", "granularity": "width", "repair": "lsq", "round_to": 1}, False),
    ],
    ids=["best", "bi", "sublayer", "width"],
)
def test_prune_matches_the_step_by_step_api(text: Path, kw: dict[str, object], stats: bool) -> None:
    """Same plan, weights and logits; a width plan skips the calibration pass (its planner reads the windows)."""
    want = tiny_llama(layers=4, seed=3)
    plan = step_by_step(want, text, stats=stats, ratio=0.3, **kw)
    got = tiny_llama(layers=4, seed=3)
    res = pk.prune(got, tokenizer=tiny_tokenizer(), ratio=0.3, calib=str(text), seq_len=SEQ, windows=N, **kw)  # type: ignore[arg-type]  # **kw: option values of several types
    assert res.model is got
    assert comparable(res.plan) == comparable(plan)
    same_weights(got, want)
    assert torch.equal(logits_of(got), logits_of(want))
    assert ("calibrate" in res.timings) == stats  # width planners skip calibrate()
    assert res.calibration is not None and torch.equal(res.calibration.windows, plan_windows(text))
    assert bool(res.calibration.towers) == stats


def plan_windows(text: Path) -> torch.Tensor:
    return pk.load_windows(tiny_tokenizer(), str(text), seq_len=SEQ, num_windows=N).ids


def heldout_windows(text: Path) -> torch.Tensor:
    """The 8 windows after the calibration windows: where the default method compares its candidates."""
    return pk.load_windows(tiny_tokenizer(), str(text), seq_len=SEQ, num_windows=N + 8).ids[N:]


def test_every_stage_lands_in_the_result(text: Path, tmp_path: Path) -> None:
    """Evaluate and save: the perplexities, parameter counts, saved folder, report and timings are all in
    the PruneResult, and the folder reloads to the same logits with the plan as applied."""
    model = tiny_llama(layers=4, seed=3)
    attrs_before = set(vars(model))
    ref = tiny_llama(layers=4, seed=3)
    ppl_ref = pk.perplexity(ref, plan_windows(text))
    res = pk.prune(
        model,
        tokenizer=tiny_tokenizer(),
        ratio=0.3,
        calib=str(text),
        seq_len=SEQ,
        windows=N,
        eval=str(text),
        eval_seq_len=SEQ,
        eval_tokens=N * SEQ,
        out=tmp_path / "out",
    )
    assert set(res.timings) == {"calibrate", "plan", "apply", "perplexity_before", "perplexity_after", "save"}
    assert all(t >= 0 for t in res.timings.values())
    assert res.perplexity_before == ppl_ref  # the same windows: eval_tokens of the text
    assert res.perplexity_after is not None and res.perplexity_after == pk.perplexity(
        model, plan_windows(text)
    )
    assert res.out == (tmp_path / "out").absolute()
    r = res.report
    assert r["written"] == "checkpoint" and r["out"] == str(res.out)
    assert r["removed"] == list(res.plan.remove) and r["plan"] == res.plan.model_dump(mode="json")
    assert r["params_before"] == pk.count_parameters(ref).total
    assert r["params_after"] == pk.count_parameters(model).total < r["params_before"]
    assert r["perplexity_after"]["perplexity"] == res.perplexity_after.perplexity
    assert r["budget"]["ratio"] == 0.3
    json.dumps(r)  # JSON-serialisable as the CLI prints it
    assert pk.load_plan(res.out / "plan.json") == res.plan
    assert torch.equal(logits_of(pk.load_pruned(res.out)), logits_of(model))
    # nothing is hidden on the module: no attribute is new after prune
    assert set(vars(model)) == attrs_before


def test_a_given_plan_and_plan_only(text: Path, tmp_path: Path) -> None:
    """plan_only writes the plan file and leaves the model as it was; applying that file (or the PrunePlan)
    is apply_plan's result."""
    model = tiny_llama(layers=4, seed=3)
    before = logits_of(model)
    res = pk.prune(
        model,
        tokenizer=tiny_tokenizer(),
        ratio=0.3,
        calib=str(text),
        seq_len=SEQ,
        windows=N,
        metric="angular",  # a plan that repairs, whatever the default method would choose here
        repair="lsq",
        plan_only=True,
        out=tmp_path / "plan.json",
    )
    assert torch.equal(logits_of(model), before) and set(res.timings) == {"calibrate", "plan"}
    assert res.report["written"] == "plan" and pk.load_plan(tmp_path / "plan.json") == res.plan
    assert res.plan.repair == "lsq"
    want = tiny_llama(layers=4, seed=3)
    pk.apply_plan(want, res.plan, repair_windows=plan_windows(text))
    for plan in (tmp_path / "plan.json", res.plan):
        got = tiny_llama(layers=4, seed=3)
        again = pk.prune(got, tokenizer=tiny_tokenizer(), plan=plan, calib=str(text), seq_len=SEQ, windows=N)
        assert "plan" not in again.timings and "calibrate" not in again.timings
        same_weights(got, want)


def test_a_model_spec_is_loaded_with_its_tokenizer(text: Path, tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "tiny", layers=4, seed=3)
    res = pk.prune(str(folder), ratio=0.3, calib=str(text), seq_len=SEQ, windows=N)
    assert "load" in res.timings and res.tokenizer is not None and res.report["model"] == str(folder)
    want = tiny_llama(layers=4, seed=3)
    step_by_step(want, text, ratio=0.3)
    assert res.model is not None and torch.equal(logits_of(res.model), logits_of(want))


def test_a_calibration_made_before_is_reused(text: Path) -> None:
    model = tiny_llama(layers=4, seed=3)
    cal = pk.calibrate(model, plan_windows(text))
    res = pk.prune(model, ratio=0.3, calib=plan_windows(text), calibration=cal, heldout=heldout_windows(text))
    assert res.calibration is cal and "calibrate" not in res.timings
    want = tiny_llama(layers=4, seed=3)
    step_by_step(want, text, ratio=0.3)
    same_weights(model, want)


def test_lora_healing_is_recorded_in_the_plan_passed_to_the_checkpoint(text: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="peft absent: pip install -e . installs it (a core dependency)")
    model = tiny_llama(layers=4, seed=3)
    res = pk.prune(
        model,
        tokenizer=tiny_tokenizer(),
        ratio=0.3,
        calib=str(text),
        seq_len=SEQ,
        windows=N,
        recover="lora",
        lora_texts=(str(text),),
        lora_steps=2,
        lora_batch=1,
        lora_seq_len=SEQ,
        out=tmp_path / "healed",
    )
    assert res.recovery is not None and res.recovery.steps == 2 and "recover" in res.timings
    assert res.plan.recovery == res.recovery.as_dict() == res.report["recovery"]
    assert pk.load_plan(tmp_path / "healed" / "plan.json").recovery == res.recovery.as_dict()


def test_streaming_plan_only_matches_the_in_memory_plan(text: Path, tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "tiny", layers=4, seed=3)
    kw = {"metric": "bi", "granularity": "block", "planner": "rank", "repair": "none"}
    res = pk.prune(
        str(folder), ratio=0.3, calib=str(text), seq_len=SEQ, windows=N, streaming=True, plan_only=True, **kw
    )  # type: ignore[arg-type]  # **kw: option values of several types
    assert res.model is None and {"load", "calibrate", "plan"} <= set(res.timings)
    want = tiny_llama(layers=4, seed=3)
    plan = pk.plan_pruning(want, pk.calibrate(want, plan_windows(text)), ratio=0.3, **kw)  # type: ignore[arg-type]  # **kw: option values of several types
    assert res.plan.remove == plan.remove


class Recorder(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps: list[str] = []

    def say(self, message: str) -> None:
        self.lines.append(message)

    def table(self, title: str, columns: object, rows: object) -> None:
        self.lines.append(title)


def test_the_reporter_hears_the_budget_the_plan_and_the_perplexities(text: Path) -> None:
    rec = Recorder()
    pk.prune(
        tiny_llama(layers=4, seed=3),
        tokenizer=tiny_tokenizer(),
        ratio=0.3,
        calib=str(text),
        seq_len=SEQ,
        windows=N,
        eval=str(text),
        eval_seq_len=SEQ,
        reporter=rec,
    )
    firsts = [line.split(":")[0] for line in rec.lines]
    # the default method's candidates and its choice come between the budget and the plan
    assert firsts[:5] == ["perplexity before", "budget", "default method", "chosen", "plan"]
    assert "achieved" in firsts and "perplexity after" in firsts


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"ratio": 0.3}, CalibrationError, "--calib TEXT is required"),
        ({"calib": "TEXT"}, PlanError, "--ratio is required"),
        ({"ratio": 1.5, "calib": "TEXT"}, PlanError, "strictly between 0 and 1"),
        ({"ratio": 0.3, "calib": "TEXT", "plan_only": True, "plan": "PLAN"}, PlanError, "choose one"),
        ({"ratio": 0.3, "calib": "TEXT", "recover": "none", "repair": "lsq"}, PlanError, "contradicts"),
        ({"ratio": 0.3, "calib": "TEXT", "streaming": True, "metric": "bi"}, PlanError, "model spec"),
        ({"ratio": 0.3, "calib": "TEXT", "tokenizer": None}, CalibrationError, "need a tokenizer"),
        ({"ratio": 0.3, "calib": "no-such-text"}, pk.TextNotFoundError, "no-such-text"),
        ({"ratio": 0.3, "calib": [1, 2]}, TypeError, "takes a text spec"),
    ],
)
def test_bad_input_is_refused_before_anything_is_done(
    text: Path, tmp_path: Path, kw: dict[str, object], error: type[Exception], message: str
) -> None:
    plan_file = tmp_path / "p.json"
    model = tiny_llama(layers=4, seed=3)
    pk.save_plan(
        pk.PrunePlan(fingerprint=pk.fingerprint(model, pk.inspect(model)), remove=["text.blocks.1"]),
        plan_file,
    )
    args = {"tokenizer": tiny_tokenizer(), **kw}
    args = {k: str(text) if v == "TEXT" else str(plan_file) if v == "PLAN" else v for k, v in args.items()}
    before = logits_of(model)
    with pytest.raises(error, match=message):
        pk.prune(model, out=tmp_path / "out", **args)  # type: ignore[arg-type]  # **args: option values of several types
    assert not (tmp_path / "out").exists() and torch.equal(logits_of(model), before)


def test_a_model_that_is_neither_a_spec_nor_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match="model spec"):
        pk.prune(42, ratio=0.3, calib="c4")  # type: ignore[arg-type]  # the wrong type is the point


def test_streaming_wants_a_text_it_can_tokenize_itself(text: Path, tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "tiny", layers=4, seed=3)
    with pytest.raises(CalibrationError, match="pass calib as a text spec"):
        pk.prune(str(folder), ratio=0.3, calib=plan_windows(text), streaming=True, metric="bi", repair="none")
