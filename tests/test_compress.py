"""``prunekit compress``: the budget per the exact accountant, the simulation against real surgery, the saved
record, the held-out objective that never reads the evaluation text, and clear budget errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import save_tiny_model, tiny_llama, tiny_tokenizer, words

from prunekit_core.ir.errors import CheckpointError
from prunekit_core.quant.base import get_quant_format, size_report_mixed
from prunekit_core.study import compress as cz
from prunekit_core.study.compress import (
    Choice,
    CompressBudgetError,
    Compressor,
    HeldOutLoss,
    compress,
    load_compressed,
    parse_size,
)

FORMATS = ["int8", "int4_g16", "int3_g16", "int2a_g16"]


@pytest.fixture()
def texts(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(words(3000, seed=1))
    ev = tmp_path / "eval.txt"
    ev.write_text(words(3000, seed=2))
    ev2 = tmp_path / "eval2.txt"
    ev2.write_text(words(3000, seed=3))
    return calib, ev, ev2


def run(model, texts, **kw):
    calib, ev, _ = texts
    args = dict(
        tokenizer=tiny_tokenizer(),
        formats=FORMATS,
        calib=str(calib),
        eval=str(ev),
        calib_windows=3,
        heldout_windows=2,
        seq_len=32,
        eval_windows=2,
        eval_seq_len=32,
        steps=6,
    )
    return compress(model, **(args | kw))


def windows(n=2, seed=0):
    return torch.randint(3, 103, (n, 24), generator=torch.Generator().manual_seed(seed))


def random_choice(space, rng, max_removed):
    removable = [i for i, ok in enumerate(space.removable) if ok]
    removed = frozenset(rng.sample(removable, rng.randint(0, max_removed)))
    return Choice(removed, tuple((f.key, rng.choice(space.formats)) for f in space.families))


def test_parse_size():
    assert parse_size("60MB") == 60_000_000
    assert parse_size("1.5MiB") == int(1.5 * 2**20)
    assert parse_size("800kb") == 800_000
    assert parse_size("1234") == 1234
    with pytest.raises(CompressBudgetError, match="60MB"):
        parse_size("sixty megs")


def test_space_bits_equal_the_accountant_after_real_surgery():
    model = tiny_llama(layers=4, tied=False)
    comp = Compressor(
        model, calib=windows(), heldout=windows(seed=1), formats=[*FORMATS, "ternary_g16", "none"]
    )
    rng = random.Random(0)
    for _ in range(5):
        choice = random_choice(comp.space, rng, comp.max_removed)
        work, plan, rep = comp.materialize(choice)  # raises if the search's count differs from the accountant
        assert rep.total_bits == comp.space.total_bits(choice)
        assert len(plan.remove) == len(choice.removed)
        fresh = size_report_mixed(work, {n: get_quant_format(q) for n, q in rep.tensor_formats.items()})
        assert fresh.total_bits == rep.total_bits
    assert {f.key for f in comp.space.families} >= {"embeddings", "head"}  # untied: both get a format


def test_heldout_loss_simulation_matches_real_surgery_and_its_cache():
    model = tiny_llama(layers=4)
    held = windows(seed=3)
    comp = Compressor(model, calib=windows(), heldout=held, formats=FORMATS)
    runner = HeldOutLoss(model, comp.space, held)
    runner.detect_output()
    rng = random.Random(1)
    base = Choice(frozenset(), tuple((f.key, "none") for f in comp.space.families))
    runner.loss(base, anchor=True)
    for k in range(6):
        choice = random_choice(comp.space, rng, comp.max_removed)
        cached = runner.loss(choice, anchor=k % 2 == 0)  # from the anchor's cached block inputs
        runner.restore()  # the original weights back, before another runner copies them
        scratch = HeldOutLoss(model, comp.space, held)
        scratch.tuple_out = runner.tuple_out
        fresh = scratch.loss(choice)  # no anchor: every block runs
        scratch.restore()
        work, _, _ = comp.materialize(choice)  # the real thing: surgery, fake-quantized weights
        with torch.inference_mode():
            real = work(input_ids=held, labels=held).loss.item()
        assert cached == pytest.approx(fresh, abs=1e-5)
        assert fresh == pytest.approx(real, abs=1e-5)
    runner.restore()
    # the runner leaves the model's weights as they were
    assert all(torch.equal(p, runner.orig[n]) for n, p in runner.params.items())


def test_compress_meets_the_byte_budget_and_reloads(texts, tmp_path):
    model = tiny_llama(layers=4)
    ref = sum(p.numel() for p in model.parameters())
    budget_bytes = int(ref * 4.2 / 8)
    out = tmp_path / "out"
    res = run(model, texts, target_size=f"{budget_bytes}B", out=out)
    rec = res.record
    assert rec["budget"]["bits"] == budget_bytes * 8
    assert rec["achieved"]["bits"] <= budget_bytes * 8
    assert rec["achieved"]["bytes"] <= budget_bytes
    # the accountant, on the returned model, under the recorded formats
    fmts = {n: get_quant_format(q) for n, q in rec["tensor_formats"].items()}
    assert size_report_mixed(res.model, fmts, reference_params=ref).total_bits == rec["achieved"]["bits"]
    # every family has a recorded format, the embeddings included
    assert rec["families"]["embeddings"]["format"] in FORMATS
    assert all(f["format"] in [*FORMATS, "removed"] for f in rec["families"].values())
    on_disk = json.loads((out / "compress.json").read_text())
    assert on_disk["achieved"] == json.loads(json.dumps(rec["achieved"]))
    loaded, record = load_compressed(out)
    assert record["achieved"]["bits"] == rec["achieved"]["bits"]
    ids = windows(seed=7)
    with torch.inference_mode():
        assert torch.allclose(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits, atol=1e-5)
    assert record["evaluation"]["perplexity"] > 0


def test_a_changed_folder_is_refused(texts, tmp_path):
    out = tmp_path / "out"
    run(tiny_llama(layers=3), texts, target_bits=6.0, out=out, steps=0, eval=None)
    rec = json.loads((out / "compress.json").read_text())
    b = rec["achieved"]["bits"]
    rec["achieved"]["bits"] = b + 1 if b % 10 != 9 else b - 1  # same length: the manifest's size check passes
    (out / "compress.json").write_text(json.dumps(rec, indent=2) + "\n")
    with pytest.raises(CheckpointError, match="recorded formats"):
        load_compressed(out)
    (out / "compress.json").write_text("{}")  # another length: the checkpoint's manifest refuses it
    with pytest.raises(CheckpointError, match="compress.json"):
        load_compressed(out)


def test_the_objective_never_reads_the_evaluation_text(texts, monkeypatch):
    import prunekit_core.io.text as text_mod

    events: list[str] = []
    real_load = text_mod.load_windows
    real_search = Compressor.search

    def spy_load(tok, spec, **kw):
        events.append(f"read {spec}")
        return real_load(tok, spec, **kw)

    def spy_search(self, *a, **kw):
        out = real_search(self, *a, **kw)
        events.append("search done")
        return out

    monkeypatch.setattr(text_mod, "load_windows", spy_load)
    monkeypatch.setattr(Compressor, "search", spy_search)
    calib, ev, ev2 = texts
    a = run(tiny_llama(layers=4), texts, target_bits=4.5).record
    assert events == [f"read {calib}", "search done", f"read {ev}"]
    b = run(tiny_llama(layers=4), texts, target_bits=4.5, eval=str(ev2)).record
    c = run(tiny_llama(layers=4), texts, target_bits=4.5, eval=None).record
    # the choices and the objective do not depend on the evaluation text; its perplexity does
    for r in (b, c):
        assert r["families"] == a["families"] and r["removed_blocks"] == a["removed_blocks"]
        assert r["objective"]["heldout_loss"] == a["objective"]["heldout_loss"]
    assert a["evaluation"]["perplexity"] != b["evaluation"]["perplexity"] and c["evaluation"] is None
    assert a["objective"]["text"] == str(calib) and a["objective"]["heldout_windows"] == [3, 5]


def test_search_never_leaves_the_budget_and_beats_or_ties_the_additive_start(texts):
    model = tiny_llama(layers=4)
    res = run(model, texts, target_bits=3.8, eval=None, steps=10)
    obj = res.record["objective"]
    assert obj["heldout_loss"] <= obj["additive_loss"]
    assert res.record["achieved"]["bits"] <= res.record["budget"]["bits"]
    assert [s for s in obj["steps"] if s["accepted"]][0]["move"] == "additive model"


def test_a_budget_too_small_errors_clearly_and_writes_nothing(texts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    called = []
    monkeypatch.setattr(cz, "local_errors", lambda *a, **k: called.append(1) or {})
    with pytest.raises(CompressBudgetError) as err:
        run(tiny_llama(layers=4), texts, target_size="2KB", out=out)
    msg = str(err.value)
    assert "cannot be met" in msg and "smallest this search reaches is" in msg and "Raise the budget" in msg
    assert not out.exists() and not called  # nothing measured, nothing written
    with pytest.raises(CompressBudgetError, match="exactly one budget"):
        run(tiny_llama(layers=2), texts, target_bits=4.0, target_size="1MB")


def test_cli_compress(texts, tmp_path, capsys):
    from prunekit_core.cli import main

    calib, _, _ = texts
    folder = save_tiny_model(tmp_path / "m", layers=3)
    out = tmp_path / "c"
    rc = main(
        [
            "compress",
            str(folder),
            "--target-bits",
            "5",
            "--formats",
            ",".join(FORMATS),
            "--calib",
            str(calib),
            "--calib-windows",
            "2",
            "--heldout-windows",
            "2",
            "--seq-len",
            "32",
            "--eval",
            "none",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    said = capsys.readouterr().out
    assert "achieved:" in said and "compress.json" in said
    _, rec = load_compressed(out)
    assert rec["achieved"]["bits_per_param"] <= 5.0
    rc = main(
        [
            "compress",
            str(folder),
            "--target-bits",
            "0.1",
            "--formats",
            "int8",
            "--calib",
            str(calib),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "smallest this search reaches" in err


def test_scaled_sensitivities_are_never_negative_and_follow_the_local_error(monkeypatch):
    model = tiny_llama(layers=3)
    comp = Compressor(model, calib=windows(), heldout=windows(seed=1), formats=FORMATS, reference="int4_g16")
    runner = HeldOutLoss(model, comp.space, comp.heldout)
    runner.detect_output()
    real_loss = HeldOutLoss.loss

    def noisy(self, choice, *, anchor=False):  # quantizing at the reference "lowers" the loss: noise
        value = real_loss(self, choice, anchor=anchor)
        return value if anchor or choice.removed else value - 0.5

    monkeypatch.setattr(HeldOutLoss, "loss", noisy)
    local = cz.local_errors(model, comp.space, comp.calib)
    sens = cz.measure_sensitivities(
        runner, max_removed=0, sensitivity="scaled", reference="int4_g16", local=local
    )
    for key, deltas in sens.quant.items():
        if key not in local:
            continue
        assert all(deltas[q] >= 0 for q in FORMATS)
        by_error = sorted(FORMATS, key=lambda q, key=key: local[key][q])
        assert [deltas[q] for q in by_error] == sorted(deltas[q] for q in FORMATS)
