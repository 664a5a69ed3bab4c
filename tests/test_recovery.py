"""LoRA healing: lowers the loss, merges exactly, is deterministic, and the result saves and reloads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, words
from torch import nn

import prunekit_core as pk
from prunekit_core.ir.errors import CalibrationError, PlanError
from prunekit_core.study.pipeline import Reporter
from prunekit_core.study.recovery import heal_lora, lora_targets, training_windows


def _pruned() -> tuple[nn.Module, torch.Tensor]:
    model = tiny_llama(layers=3)
    ir = pk.inspect(model)
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, ir), remove=["text.blocks.1"])
    pk.apply_plan(model, plan)
    gen = torch.Generator().manual_seed(1)
    # a learnable pattern: each window repeats a short random motif
    motif = torch.randint(3, 103, (8, 8), generator=gen)
    return model, motif.repeat(1, 4)


def test_lora_lowers_loss_and_merges_exactly() -> None:
    model, ids = _pruned()
    with torch.no_grad():
        before = float(model(input_ids=ids, labels=ids).loss)
    healed, report = heal_lora(model, ids, rank=4, steps=30, lr=1e-2, batch_size=4, seed=0)
    with torch.no_grad():
        after = float(healed(input_ids=ids, labels=ids).loss)
    assert after < before - 0.1, (before, after)
    assert report.merge_max_abs_diff < 1e-4
    assert not any("lora" in n for n, _ in healed.named_parameters()), "adapter weights left in the model"
    assert type(healed).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in healed.parameters()), "base weights left frozen"
    assert report.tokens == 30 * 4 * ids.shape[1]
    assert report.targets == len(lora_targets(healed, pk.inspect(healed))) == 2 * 7


def test_merged_model_equals_adapter_model() -> None:
    """Independent of heal_lora's own check: adapter logits before merging equal the merged logits."""
    from peft import LoraConfig, get_peft_model

    model, ids = _pruned()
    targets = lora_targets(model, pk.inspect(model))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        adapted = pm(input_ids=ids).logits
        merged = pm.merge_and_unload()
        assert (adapted - base).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)


def test_lora_is_deterministic_for_a_seed() -> None:
    a, ids = _pruned()
    b, _ = _pruned()
    c, _ = _pruned()
    heal_lora(a, ids, rank=4, steps=5, lr=1e-2, seed=3)
    heal_lora(b, ids, rank=4, steps=5, lr=1e-2, seed=3)
    heal_lora(c, ids, rank=4, steps=5, lr=1e-2, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_healed_model_saves_records_and_reloads(tmp_path: Path) -> None:
    model, ids = _pruned()
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, pk.inspect(model)), remove=[])  # the plan saved
    healed, report = heal_lora(model, ids, rank=4, steps=3, lr=1e-2)
    assert report.method == "lora"
    plan = plan.model_copy(update={"recovery": report.as_dict()})
    out = pk.save_pruned(healed, tmp_path / "out", tokenizer=tiny_tokenizer(), plan=plan)
    again = pk.load_pruned(out)
    assert pk.read_plan(out).recovery == report.as_dict()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, healed(input_ids=ids).logits, atol=0, rtol=0)


def test_progress_lines_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped logs get plain lines with step, loss and speed: the first and last step, then every N s."""
    model, ids = _pruned()
    _, report = heal_lora(model, ids, rank=4, steps=5, lr=1e-2, progress=True, progress_every=3600.0)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("LoRA healing step")]
    assert [ln.split(":")[0] for ln in lines] == ["LoRA healing step 1/5", "LoRA healing step 5/5"]
    last = lines[-1]
    assert "steps/s (" in last and "s/step)" in last and "1 thread" in last, last
    assert report.steps_per_s > 0 and report.threads == 1

    model, ids = _pruned()
    heal_lora(model, ids, rank=4, steps=4, lr=1e-2, progress=True, progress_every=0.0)
    steps = [ln.split(":")[0] for ln in capsys.readouterr().err.splitlines() if ln.startswith("LoRA")]
    assert steps == [f"LoRA healing step {i}/4" for i in range(1, 5)]


def test_progress_line_reports_loss_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    model, ids = _pruned()
    seen: list[tuple[int, float]] = []
    heal_lora(
        model,
        ids,
        rank=4,
        steps=2,
        lr=1e-2,
        progress=True,
        progress_every=0.0,
        on_step=lambda s, loss: seen.append((s, loss)),
    )
    err = capsys.readouterr().err
    assert [s for s, _ in seen] == [1, 2]
    for step, loss in seen:
        assert f"LoRA healing step {step}/2: loss {loss:.3f}, " in err, err


def test_busy_machine_is_named_in_the_progress(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prunekit_core.study import recovery

    model, ids = _pruned()
    monkeypatch.setattr(recovery, "load_average", lambda: 9.5)
    monkeypatch.setattr(recovery, "cpu_cores", lambda: 2)
    torch.set_num_threads(2)  # the autouse fixture restores the caller's count
    heal_lora(model, ids, rank=4, steps=1, lr=1e-2, progress=True)
    err = capsys.readouterr().err
    assert (
        "the machine is busy (load 9.5 on 2 cores, 2 torch threads here)" in err
        and "OMP_NUM_THREADS=1" in err
    ), err
    assert "load 9.5 on 2 cores" in err.splitlines()[-1]
    monkeypatch.setattr(recovery, "load_average", lambda: 3.0)  # another process keeps a core busy
    model, ids = _pruned()
    heal_lora(model, ids, rank=4, steps=1, lr=1e-2, progress=True)
    assert "the machine is busy (load 3.0 on 2 cores, 2 torch threads here)" in capsys.readouterr().err
    monkeypatch.setattr(recovery, "load_average", lambda: 2.2)  # about this run's own 2 threads: quiet
    model, ids = _pruned()
    heal_lora(model, ids, rank=4, steps=1, lr=1e-2, progress=True)
    assert "busy" not in capsys.readouterr().err
    torch.set_num_threads(1)  # one thread on a busy machine: nothing to advise
    monkeypatch.setattr(recovery, "load_average", lambda: 9.5)
    model, ids = _pruned()
    heal_lora(model, ids, rank=4, steps=1, lr=1e-2, progress=True)
    assert "busy" not in capsys.readouterr().err


def test_precision_fp32_and_bf16() -> None:
    """bf16 runs the steps under bfloat16 autocast (a different, still healing, trajectory); fp32 does not."""
    runs = {}
    for precision in ("fp32", "bf16", "fp32"):
        model, ids = _pruned()
        with torch.no_grad():
            before = float(model(input_ids=ids, labels=ids).loss)
        healed, report = heal_lora(model, ids, rank=4, steps=30, lr=1e-2, precision=precision)
        assert report.precision == precision
        with torch.no_grad():
            after = float(healed(input_ids=ids, labels=ids).loss)
        assert after < before - 0.1, (precision, before, after)
        assert report.merge_max_abs_diff < 1e-4
        assert all(p.dtype == torch.float32 for p in healed.parameters())
        state = healed.state_dict()
        if precision in runs:  # the same precision again: bitwise the same
            assert all(torch.equal(state[k], runs[precision][k]) for k in state)
        runs[precision] = state
    assert any(not torch.equal(runs["fp32"][k], runs["bf16"][k]) for k in runs["fp32"])
    with pytest.raises(PlanError, match="precision must be one of auto, fp32, bf16"):
        heal_lora(_pruned()[0], ids, precision="fp16")


def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit_core.study import recovery

    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(recovery, "native_bf16", lambda native=native: native)
        assert recovery.resolve_precision("auto", cpu) == expected
        assert recovery.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(recovery, "native_bf16", lambda: True)
    model, ids = _pruned()
    assert heal_lora(model, ids, rank=4, steps=1, lr=1e-2)[1].precision == "bf16"


def test_bad_options_and_texts_are_clear_errors() -> None:
    model, ids = _pruned()
    with pytest.raises(PlanError, match="positive"):
        heal_lora(model, ids, steps=0)
    with pytest.raises(CalibrationError, match="integer token windows"):
        heal_lora(model, ids.float())
    with pytest.raises(CalibrationError, match="evaluation text"):
        training_windows(tiny_tokenizer(), seq_len=8, texts=("wiki", "c4"), exclude=("wiki",))


def test_training_windows_skip_calibration_tokens(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(words(400, seed=0))
    tok = tiny_tokenizer()
    full = training_windows(tok, seq_len=16, texts=(str(text),))
    skipped = training_windows(tok, seq_len=16, texts=(str(text),), skip_tokens={str(text): 64})
    assert full.shape[0] == 25 and skipped.shape[0] == 21
    assert torch.equal(skipped, full[4:])


# --- CLI ------------------------------------------------------------------------------------------------


def _cli_assets(tmp_path: Path) -> tuple[Path, Path]:
    """A saved tiny 3-block model and a calibration text."""
    from helpers import save_tiny_model

    calib = tmp_path / "calib.txt"
    calib.write_text(words(600, seed=1))
    return save_tiny_model(tmp_path / "tiny", layers=3), calib


def _prune_argv(model: Path, calib: Path, out: Path, *extra: object) -> list[str]:
    """``prunekit prune`` at 30% with tiny calibration windows, plus ``extra``."""
    args = [
        "prune",
        model,
        "--ratio",
        "0.3",
        "--calib",
        calib,
        "--out",
        out,
        "--windows",
        "2",
        "--seq-len",
        "16",
    ]
    return [str(a) for a in [*args, *extra]]


# --- CLI: prunekit prune --recover ----------------------------------------------------------------------


def test_cli_prune_recover_lora_records_and_reloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from prunekit_core.cli import main

    model, calib = _cli_assets(tmp_path)
    heal = tmp_path / "heal.txt"
    heal.write_text(words(600, seed=2))
    out = tmp_path / "out"
    lora = ["--recover", "lora", "--lora-text", heal, "--lora-steps", "3", "--lora-seq-len", "16"]
    args = _prune_argv(model, calib, out, "--metric", "bi", *lora)
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert code == 0
    assert data["recovery"]["method"] == "lora" and data["recovery"]["tokens"] == 3 * 4 * 16
    # piped stderr still shows the training: the first and last step with loss and speed
    assert "LoRA healing step 1/3: loss " in captured.err and "LoRA healing step 3/3: loss " in captured.err
    assert data["recovery"]["steps_per_s"] > 0 and "steps/s" in captured.err
    from prunekit_core.study.recovery import resolve_precision

    assert data["recovery"]["precision"] == resolve_precision("auto", torch.device("cpu"))
    saved = json.loads((out / "plan.json").read_text())
    assert saved["recovery"] == data["recovery"]
    again = pk.load_pruned(out)
    assert pk.read_plan(out).recovery["steps"] == 3
    assert not any("lora" in n for n in again.state_dict())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recover", "repair", "--repair", "none"], "contradicts"),
        (["--recover", "lora", "--lora-text", "EVAL", "--eval", "EVAL"], "evaluation text"),
        (["--recover", "lora", "--lora-text", "no-such-text"], "not found"),
    ],
)
def test_cli_recover_bad_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from prunekit_core.cli import main

    model, calib = _cli_assets(tmp_path)
    extra = [str(calib) if e == "EVAL" else e for e in extra]
    out = tmp_path / "out"
    code = main(_prune_argv(model, calib, out, *extra))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# --- CLI: prunekit recover ------------------------------------------------------------------------------


def _pruned_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, Path]:
    from prunekit_core.cli import main

    model, calib = _cli_assets(tmp_path)
    out = tmp_path / "pruned"
    assert main(_prune_argv(model, calib, out, "--metric", "bi", "--recover", "none")) == 0
    capsys.readouterr()
    return model, calib, out


def test_cli_recover_lora_and_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from prunekit_core.cli import main

    model, calib, pruned = _pruned_folder(tmp_path, capsys)
    heal = tmp_path / "heal.txt"
    heal.write_text(words(600, seed=2))
    lora = ["recover", pruned, "--out", tmp_path / "healed", "--lora-text", heal, "--lora-steps", "2"]
    assert main([str(a) for a in [*lora, "--lora-seq-len", "16", "--lora-precision", "fp32", "--json"]]) == 0
    data = json.loads(capsys.readouterr().out)
    pk.load_pruned(tmp_path / "healed")  # verified and loadable
    assert pk.read_plan(tmp_path / "healed").recovery == data["recovery"] and data["recovery"]["steps"] == 2
    assert data["recovery"]["precision"] == "fp32"  # --lora-precision reaches heal_lora, whatever the CPU

    # repair re-applies the plan to the base with the least-squares fold: equals prune --recover repair
    rep = [
        "recover",
        pruned,
        "--method",
        "repair",
        "--base",
        model,
        "--calib",
        calib,
        "--out",
        tmp_path / "rep",
    ]
    assert main([str(a) for a in [*rep, "--windows", "2", "--seq-len", "16"]]) == 0
    direct = tmp_path / "direct"
    assert main(_prune_argv(model, calib, direct, "--metric", "bi", "--recover", "repair")) == 0
    capsys.readouterr()
    a, b = pk.load_pruned(tmp_path / "rep"), pk.load_pruned(direct)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=0, rtol=0)
        assert (a(input_ids=ids).logits - pk.load_pruned(pruned)(input_ids=ids).logits).abs().max() > 0

    # repair after LoRA healing is refused, and so is repair without its base model
    again = ["recover", tmp_path / "healed", "--method", "repair", "--base", model, "--calib", calib]
    assert main([str(a) for a in [*again, "--out", tmp_path / "x"]]) == 2
    assert "comes before" in capsys.readouterr().err
    assert main([str(a) for a in ["recover", pruned, "--method", "repair", "--out", tmp_path / "y"]]) == 2
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_failed_healing_leaves_the_model_as_it_was() -> None:
    model, ids = _pruned()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PlanError, match="diverged"):
        heal_lora(model, ids, rank=4, steps=20, lr=1e30)
    after = model.state_dict()
    assert set(after) == set(before), "adapter modules left in the model"
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(p.requires_grad for p in model.parameters())


# --- prunekit_core.recover: the command's steps as one call ---------------------------------------------


class _Said(Reporter):
    """Keeps the result lines and the stage labels."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps: list[str] = []

    def say(self, message: str) -> None:
        self.lines.append(message)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.steps.append(label)
        yield


def _pruned_by_api(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A saved tiny model, a calibration text, and the model pruned by ``pk.prune`` with no repair."""
    model, calib = _cli_assets(tmp_path)
    out = tmp_path / "pruned"
    pk.prune(model, ratio=0.3, calib=str(calib), metric="bi", recover="none", windows=2, seq_len=16, out=out)
    return model, calib, out


def test_recover_repair_is_apply_plan_with_lsq_on_the_base(tmp_path: Path) -> None:
    """The repair path is exactly the step-by-step API: the saved plan, ``repair="lsq"``, applied to the
    unpruned base with the calibration windows: bitwise the same weights and the same plan as applied."""
    model, calib, pruned = _pruned_by_api(tmp_path)
    said = _Said()
    res = pk.recover(
        pruned, method="repair", base=model, calib=str(calib), windows=2, seq_len=16, reporter=said
    )

    base, tok, _ = pk.load_model(str(model))
    plan = pk.read_plan(pruned)
    assert plan.repair == "none" and plan.remove  # the saved plan did not repair: recover adds it
    cal = pk.load_windows(tok, str(calib), seq_len=16, num_windows=2)
    applied = pk.apply_plan(base, plan.model_copy(update={"repair": "lsq"}), repair_windows=cal.ids)
    want, got = base.state_dict(), res.model.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert res.plan == applied.plan and res.plan is not None and res.plan.repair == "lsq"
    assert res.recovery == {"method": "repair", "calibration_tokens": 32} == res.report["recovery"]
    assert res.lora is None and res.perplexity_after is None
    assert res.out is None and res.report["out"] is None  # no out: nothing written
    assert set(res.timings) == {"load", "recover"}
    assert said.steps == [f"load {model}", "apply plan with the least-squares repair"]
    # and it differs from the pruned model without the repair
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert (
            res.model(input_ids=ids).logits - pk.load_pruned(pruned)(input_ids=ids).logits
        ).abs().max() > 0


def test_recover_lora_records_the_healing_in_the_plan(tmp_path: Path) -> None:
    """The LoRA path heals the pruned folder as ``heal_lora`` on the same windows does, evaluates, and saves
    a checkpoint whose plan records the healing; a model with no prunekit plan is healed with a note."""
    _model, calib, pruned = _pruned_by_api(tmp_path)
    heal = tmp_path / "heal.txt"
    heal.write_text(words(600, seed=2))
    out = tmp_path / "healed"
    lora = dict(lora_texts=[str(heal)], lora_steps=2, lora_seq_len=16, lora_precision="fp32", lora_rank=4)
    res = pk.recover(pruned, eval=str(calib), eval_seq_len=16, eval_tokens=64, out=out, **lora)  # type: ignore[arg-type]  # **lora: option values of several types

    direct = pk.load_pruned(pruned)
    tok = tiny_tokenizer()
    windows = training_windows(tok, seq_len=16, texts=(str(heal),), exclude=(str(calib),))
    direct, report = heal_lora(direct, windows, rank=4, steps=2, batch_size=4, seed=0, precision="fp32")
    want, got = direct.state_dict(), res.model.state_dict()
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert res.lora is not None and res.lora.tokens == report.tokens == 2 * 4 * 16
    assert res.recovery == res.lora.as_dict() == res.report["recovery"]
    assert res.plan is not None and res.plan.recovery == res.recovery
    assert res.plan.remove == pk.read_plan(pruned).remove
    assert res.out == out and pk.read_plan(out).recovery == res.recovery
    assert (
        res.perplexity_after is not None
        and res.perplexity_after.tokens == res.report["perplexity_after"]["tokens"]
    )
    assert {"load", "recover", "perplexity_after", "save"} == set(res.timings)

    # a model prunekit did not write: healed, but there is no plan to record it in
    plain = tmp_path / "plain"
    from helpers import save_tiny_model

    save_tiny_model(plain, layers=2)
    said = _Said()
    res = pk.recover(plain, reporter=said, **lora)  # type: ignore[arg-type]  # **lora: option values of several types
    assert res.plan is None and res.lora is not None
    assert "note: the model has no prunekit plan, so the checkpoint does not record the healing" in said.lines


def test_recover_refuses_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An already healed plan, a missing --base and --base with LoRA fail before anything is loaded or
    written, with the errors ``prunekit recover`` prints."""
    from prunekit_core.cli import main

    model, calib, pruned = _pruned_by_api(tmp_path)
    healed = tmp_path / "healed"
    net = pk.load_pruned(pruned)
    pk.save_pruned(
        net,
        healed,
        tokenizer=tiny_tokenizer(),
        plan=pk.read_plan(pruned).model_copy(update={"recovery": {"method": "lora"}}),
    )
    out = tmp_path / "x"
    with pytest.raises(PlanError, match=r"already healed \(lora\); the repair comes before LoRA") as err:
        pk.recover(healed, method="repair", base=model, calib=str(calib), out=out)
    argv = ["recover", healed, "--method", "repair", "--base", model, "--calib", calib, "--out", out]
    assert main([str(a) for a in argv]) == 2
    assert f"error: {err.value}" in " ".join(capsys.readouterr().err.split())

    with pytest.raises(PlanError, match="pass --base MODEL"):
        pk.recover(pruned, method="repair", calib=str(calib), out=out)
    with pytest.raises(PlanError, match="--base is for --method repair"):
        pk.recover(pruned, base=model, out=out)
    with pytest.raises(PlanError, match="needs a prunekit output folder holding plan.json"):
        pk.recover(model, method="repair", base=model, calib=str(calib), out=out)
    with pytest.raises(PlanError, match="must be lora or repair"):
        pk.recover(pruned, method="qlora", out=out)  # type: ignore[arg-type]  # the unknown method is the point
    assert not out.exists()
