"""Reliability: atomic writes, damaged checkpoints and plans refused, the load policy, broken plugins isolated."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import logits_of as logits
from helpers import save_tiny_model, tiny_llama, tiny_pruned_applied, tiny_tokenizer, words
from helpers import tiny_pruned as pruned
from prunekit_llama import LlamaFamilyAdapter

from prunekit_core.cli import main
from prunekit_core.io import atomic
from prunekit_core.io.checkpoint import PLAN_FILE, RECORD_FILE, load_plan, load_pruned, save_plan, save_pruned
from prunekit_core.io.loading import load_model
from prunekit_core.ir.errors import (
    CheckpointError,
    ModelNotFoundError,
    PlanError,
    PlanMismatchError,
    UnsafeCheckpointError,
)
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import apply_plan

WEIGHTS = "model.safetensors"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def save_with_plan(out: Path, seed: int = 0) -> Path:
    """:func:`pruned` saved with the plan that made it (``plan.json``, as ``prunekit prune`` writes it)."""
    run = tiny_pruned_applied(seed)
    return save_pruned(run.model, out, tokenizer=tiny_tokenizer(), plan=run.plan)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_with_plan(tmp_path / "ckpt")


# --- the atomic-write helper -------------------------------------------------------------------------


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as fh:
        fh.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left
    atomic.write_bytes(target, b"new\n")
    assert target.read_bytes() == b"new\n"


def test_atomic_path_for_libraries_that_write_by_name(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    with atomic.atomic_path(target) as tmp:
        assert atomic.is_temporary(tmp) and tmp.parent == tmp_path
        tmp.write_bytes(b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic.atomic_path(target):
        pass
    assert target.read_bytes() == b"\x89PNG"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_atomic_folder_replaces_an_existing_folder(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    with atomic.atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    with atomic.atomic_folder(target, replace=True) as tmp:
        (tmp / "a").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("b")
    assert (target / "a").read_text() == "new" and (target / "sub" / "b").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError), atomic.atomic_folder(target) as tmp:
        (tmp / "a").write_text("refused")
    assert (target / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_folder_writeback_starts_while_files_are_written(tmp_path: Path, monkeypatch) -> None:
    """The writeback thread asks the kernel to write each file out while it grows, before the final fsync."""
    seen: list[tuple[str, int]] = []
    grown = threading.Event()

    def fake_sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append((Path(path).name, os.fstat(fd).st_size))
        if os.fstat(fd).st_size >= 3 << 20:
            grown.set()
        return 0

    monkeypatch.setattr(atomic, "_load_sync_file_range", lambda: fake_sync_file_range)
    fsynced_after: list[int] = []
    real_fsync_tree = atomic.fsync_tree
    monkeypatch.setattr(
        atomic, "fsync_tree", lambda root: (fsynced_after.append(len(seen)), real_fsync_tree(root))
    )
    with atomic.atomic_folder(tmp_path / "out") as tmp:
        with open(tmp / "weights.bin", "wb") as fh:
            for _ in range(3):
                fh.write(b"x" * (1 << 20))
                fh.flush()
                time.sleep(0.05)
        assert grown.wait(5), seen  # requested while the folder is still being filled
    names = {name for name, _ in seen}
    assert names == {"weights.bin"}
    sizes = [size for _, size in seen]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)  # once per growth, not per tick
    assert fsynced_after == [len(seen)]  # the thread has stopped before the final fsync
    assert (tmp_path / "out" / "weights.bin").stat().st_size == 3 << 20


def test_folder_writeback_off_or_failing_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    def broken(fd: int, offset: int, nbytes: int, flags: int) -> int:
        raise OSError(errno.EIO, "writeback refused")

    monkeypatch.setattr(atomic, "_load_sync_file_range", lambda: broken)
    with atomic.atomic_folder(tmp_path / "a") as tmp:
        (tmp / "f").write_bytes(b"data")
        time.sleep(0.05)
    assert (tmp_path / "a" / "f").read_bytes() == b"data"
    monkeypatch.setattr(atomic, "EARLY_WRITEBACK", False)
    before = threading.active_count()
    with atomic.atomic_folder(tmp_path / "b") as tmp:
        assert threading.active_count() == before  # no thread started
        (tmp / "f").write_bytes(b"data")
    assert (tmp_path / "b" / "f").read_bytes() == b"data"


def test_recover_restores_an_aside_folder_and_removes_dead_temporaries(tmp_path: Path) -> None:
    """A replacement killed between its two renames left the old folder aside and the target missing."""
    src = save_pruned(pruned(), tmp_path / "src")
    want = logits(load_pruned(src))
    pid = dead_pid()
    aside = tmp_path / f".ckpt.old-{pid}-0123abcd"
    os.rename(src, aside)
    partial = tmp_path / f".ckpt.partial-{pid}-89abcdef"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    live = tmp_path / f".ckpt.partial-{os.getpid()}-fedcba98"  # a save in progress in this process
    live.mkdir()
    model = load_pruned(tmp_path / "ckpt")  # load recovers first
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", live.name])


def test_temporaries_are_never_loaded(saved: Path, tmp_path: Path) -> None:
    partial = tmp_path / f".ckpt.partial-{os.getpid()}-0000abcd"
    os.rename(saved, partial)  # a complete folder, but under a temporary's name
    with pytest.raises(CheckpointError, match="unfinished save"):
        load_pruned(partial)
    with pytest.raises(ModelNotFoundError, match="unfinished save"):
        load_model(str(partial))
    plan_tmp = tmp_path / f".plan.json.tmp-{os.getpid()}-0000abcd"
    plan_tmp.write_text((partial / PLAN_FILE).read_text())
    with pytest.raises(PlanError, match="unfinished write"):
        load_plan(plan_tmp)


def test_results_are_written_atomically(tmp_path: Path, monkeypatch) -> None:
    """Reports and plans go through the helper: a write that fails (disk full at fsync) leaves the
    previous file and no temporary."""
    from prunekit_core.study import report

    monkeypatch.setattr(report, "read_results", lambda _p: [])
    monkeypatch.setattr(report, "plot_results", lambda rows, path, title="": Path(path))
    (tmp_path / "report.md").write_text("previous report\n")
    model = tiny_llama()
    plan = PrunePlan(fingerprint=fingerprint(model, LlamaFamilyAdapter().build_ir(model)), remove=[])
    save_plan(plan, tmp_path / "plan.json")
    before = (tmp_path / "plan.json").read_text()

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        report.write_report("unused.sqlite", tmp_path)
    with pytest.raises(OSError, match="No space"):
        save_plan(plan.model_copy(update={"remove": ["text.blocks.0"]}), tmp_path / "plan.json")
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_text() == "previous report\n"
    assert (tmp_path / "plan.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "report.md"]


# --- damaged checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [4, 20, 200, -1], ids=["in-length", "in-header", "in-data", "last-byte"])
def test_truncated_safetensors_is_refused(saved: Path, keep: int) -> None:
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*copy the folder again"):
        load_pruned(saved)


def test_truncated_safetensors_in_a_plain_folder_is_refused(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "plain")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(folder))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    tiny_llama(layers=2).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shards .* missing: {shards[-1].name}"):
        load_model(str(folder))


def test_changed_tokenizer_file_is_refused(saved: Path) -> None:
    data = (saved / "tokenizer.json").read_bytes()
    (saved / "tokenizer.json").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is shorter .*when saved"):
        load_pruned(saved)


def test_weights_from_another_model_are_refused(saved: Path, tmp_path: Path) -> None:
    """Same structure, same file size, other weights: the weights fingerprint catches it."""
    other = save_pruned(pruned(seed=1), tmp_path / "other")
    assert (other / WEIGHTS).stat().st_size == (saved / WEIGHTS).stat().st_size
    (saved / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="weights are not the ones this checkpoint was saved with"):
        load_pruned(saved)


def test_plan_from_another_checkpoint_is_refused(saved: Path, tmp_path: Path) -> None:
    other = save_with_plan(tmp_path / "other", seed=1)
    (saved / PLAN_FILE).write_bytes((other / PLAN_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="plan.json is not the plan these weights were made with"):
        load_pruned(saved)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
        (lambda raw: b"[1, 2]", "not a prunekit structure record"),
        (lambda raw: b"\xff\xfe garbage", "not valid JSON"),
        (lambda raw: json.dumps({"format": "prunekit-checkpoint", "version": 2}).encode(), "damaged"),
    ],
    ids=["truncated", "not-an-object", "binary", "fields-missing"],
)
def test_corrupt_record_is_refused(saved: Path, damage, message: str) -> None:
    raw = (saved / RECORD_FILE).read_bytes()
    (saved / RECORD_FILE).write_bytes(damage(raw))
    with pytest.raises(CheckpointError, match=message):
        load_pruned(saved)


def test_checkpoint_saved_before_the_integrity_fields_still_loads(saved: Path) -> None:
    record = json.loads((saved / RECORD_FILE).read_text())
    for key in ("files", "weights_digest", "plan_sha256"):
        del record[key]
    (saved / RECORD_FILE).write_text(json.dumps(record))
    torch.testing.assert_close(logits(load_pruned(saved)), logits(pruned()), rtol=0, atol=0)
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[:-1])  # the safetensors header check still applies
    with pytest.raises(CheckpointError, match="truncated"):
        load_pruned(saved)


def test_intact_checkpoint_records_sizes_and_fingerprints(saved: Path) -> None:
    record = json.loads((saved / RECORD_FILE).read_text())
    assert record["files"][WEIGHTS] == (saved / WEIGHTS).stat().st_size
    assert set(record["files"]) == {p.name for p in saved.iterdir()} - {RECORD_FILE}
    assert record["plan_sha256"] == hashlib.sha256((saved / PLAN_FILE).read_bytes()).hexdigest()
    torch.testing.assert_close(logits(load_pruned(saved)), logits(pruned()), rtol=0, atol=0)


def test_default_shards_are_an_eighth_of_the_weights_and_reload(tmp_path: Path, monkeypatch) -> None:
    """Several shards let the early writeback overlap the serialization; they load back to the same logits."""
    from prunekit_core.io import checkpoint

    model = pruned()
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert checkpoint.default_shard_size(model) == checkpoint._MIN_SHARD  # tiny: one 100 MB shard at most
    monkeypatch.setattr(checkpoint, "_MIN_SHARD", 1)
    assert checkpoint.default_shard_size(model) == total // 8
    monkeypatch.setattr(checkpoint, "_MAX_SHARD", total // 16)
    assert checkpoint.default_shard_size(model) == total // 16
    monkeypatch.setattr(checkpoint, "_MAX_SHARD", 2 * 1000**3)
    out = save_pruned(model, tmp_path / "sharded", tokenizer=tiny_tokenizer())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 6, shards
    record = json.loads((out / RECORD_FILE).read_text())
    assert set(shards) <= set(record["files"])
    torch.testing.assert_close(logits(load_pruned(out)), logits(pruned()), rtol=0, atol=0)
    one = save_pruned(model, tmp_path / "one", max_shard_size="2GB")  # an explicit size still wins
    assert [p.name for p in one.glob("*.safetensors")] == [WEIGHTS]


# --- plan files given to the CLI -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability-cli")
    model = save_tiny_model(root / "tiny", layers=3)
    other = save_tiny_model(root / "other", layers=3, seed=1)
    text = root / "text.txt"
    text.write_text(words(2000, seed=1) + "\n")
    plan = root / "plan.json"
    code = main(
        ["prune", str(model), "--ratio", "0.3", "--calib", str(text), "--windows", "2", "--seq-len", "16"]
        + ["--plan-only", "--out", str(plan)]
    )
    assert code == 0
    return {"model": model, "other": other, "plan": plan, "root": root, "text": text}


def prune_with_plan(capsys, assets: dict[str, Path], plan: Path, model: str = "model") -> tuple[int, str]:
    out = assets["root"] / "never"
    code = main(
        ["prune", str(assets[model]), "--plan", str(plan), "--calib", str(assets["text"]), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert not (assets["root"] / "never").exists()
    return code, err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "truncated or corrupted"),
        (lambda raw: b"", "is empty"),
        (lambda raw: json.dumps({"remove": ["text.blocks.1"]}).encode(), "not a prunekit plan"),
    ],
    ids=["truncated", "empty", "not-a-plan"],
)
def test_cli_refuses_a_damaged_plan(capsys, cli_assets, tmp_path: Path, damage, message: str) -> None:
    bad = tmp_path / "plan.json"
    bad.write_bytes(damage(cli_assets["plan"].read_bytes()))
    code, err = prune_with_plan(capsys, cli_assets, bad)
    assert code != 0 and message in err and "--plan-only" in err


def test_cli_refuses_a_plan_for_another_model(capsys, cli_assets) -> None:
    code, err = prune_with_plan(capsys, cli_assets, cli_assets["plan"], model="other")
    assert code != 0 and "same structure but different weights" in err and "make a new plan" in err
    plan = load_plan(cli_assets["plan"])
    with pytest.raises(PlanMismatchError):
        apply_plan(tiny_llama(layers=3, seed=1), plan)


def test_cli_recover_refuses_a_checkpoint_whose_plan_was_edited(capsys, cli_assets, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    code = main(
        ["prune", str(cli_assets["model"]), "--plan", str(cli_assets["plan"]), "--calib"]
        + [str(cli_assets["text"]), "--out", str(ckpt)]
    )
    assert code == 0, capsys.readouterr().err
    plan = json.loads((ckpt / PLAN_FILE).read_text())
    plan["method"] = "edited by hand"
    (ckpt / PLAN_FILE).write_text(json.dumps(plan))
    code = main(
        ["recover", str(ckpt), "--method", "repair", "--base", str(cli_assets["model"])]
        + ["--calib", str(cli_assets["text"]), "--out", str(tmp_path / "healed")]
    )
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert code != 0 and "plan.json is shorter (truncated?) than when saved" in err  # sizes catch it first
    assert not (tmp_path / "healed").exists()


# --- load policy: pickle and remote code ---------------------------------------------------------------


class _Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def pickled_folder(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A Hugging Face folder whose weights are a pickled ``pytorch_model.bin`` (the legacy format)."""
    model = tiny_llama()
    save_tiny_model(folder)
    (folder / WEIGHTS).unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model


def test_pickled_folder_is_refused_unless_allowed(tmp_path: Path, monkeypatch) -> None:
    folder, model = pickled_folder(tmp_path / "bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*--allow-pickle.*weights_only=True"):
        load_model(str(folder))
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    loaded, _, _ = load_model(str(folder), allow_pickle=True)
    assert seen and all(w is True for w in seen)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_allowed_pickle_still_never_runs_code(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "evil")
    marker = tmp_path / "pwned"
    (folder / WEIGHTS).unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Exploit(str(marker))}, fh)
    with pytest.raises(Exception):  # noqa: B017 - torch's weights_only unpickler refuses the object
        load_model(str(folder), allow_pickle=True)
    assert not marker.exists()


def test_cli_allow_pickle_flag(capsys, tmp_path: Path) -> None:
    folder, _ = pickled_folder(tmp_path / "bin")
    assert main(["inspect", str(folder)]) != 0
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["inspect", str(folder), "--allow-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == "llama"


def test_pickle_file_given_as_model_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, f)
    with pytest.raises(ModelNotFoundError, match="pickled weight file"):
        load_model(str(f))


def test_remote_code_is_refused_unless_asked(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "custom")
    marker = tmp_path / "ran"
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "prunekit_custom_test"
    config["auto_map"] = {"AutoConfig": "custom_model.Cfg", "AutoModelForCausalLM": "custom_model.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpointError, match="--trust-remote-code"):
        load_model(str(folder))
    assert not marker.exists()


def test_trust_remote_code_is_passed_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    from prunekit_core.io import loading

    folder = save_tiny_model(tmp_path / "m")
    calls = []
    real = loading.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):  # noqa: ANN202
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(folder))
    load_model(str(folder), trust_remote_code=True)
    assert [c["trust_remote_code"] for c in calls] == [False, True]
    assert all(c["use_safetensors"] is True and c["weights_only"] is True for c in calls)


# --- broken plugins ---------------------------------------------------------------------------------------


def test_plugins_that_fail_to_import_are_isolated(tmp_path: Path) -> None:
    """Real entry points (an installed distribution's metadata), loaded in a fresh interpreter: a plugin that
    raises on import and one that calls sys.exit are reported; the others and every command still work."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "pk_broken_import.py").write_text("raise ImportError('needs a library that is not installed')\n")
    (site / "pk_broken_exit.py").write_text("import sys\nsys.exit('plugin gave up')\n")
    dist = site / "pk_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pk-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[prunekit]\nbroken_import = pk_broken_import\nbroken_exit = pk_broken_exit\n"
    )
    model = save_tiny_model(tmp_path / "tiny")
    script = textwrap.dedent(
        f"""
        import json, sys
        from prunekit_core.cli import main
        rc1 = main(["plugins", "--json"])
        rc2 = main(["inspect", {str(model)!r}, "--json"])
        print("RC", rc1, rc2)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEKIT_STRICT_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert "RC 0 0" in proc.stdout, proc.stderr
    plugins_json = json.loads(proc.stdout[: proc.stdout.index("\n}\n") + 3])
    failed = {f["name"]: f["error"] for f in plugins_json["failures"]}
    assert "ImportError" in failed["broken_import"] and "not installed" in failed["broken_import"]
    assert "SystemExit" in failed["broken_exit"] and "gave up" in failed["broken_exit"]
    assert "llama" in {p["name"] for p in plugins_json["plugins"]}
    assert '"adapter": "llama"' in proc.stdout
    assert "broken_import" in proc.stderr  # the user is told, not only `prunekit plugins`


def test_adapter_whose_match_raises_is_disabled_not_fatal() -> None:
    import types

    from prunekit_core.registry import plugins as plugins_mod
    from prunekit_core.registry.hookspecs import hookimpl

    class Exploding(LlamaFamilyAdapter):
        name = "exploding"

        def match(self, model):  # noqa: ANN001, ANN201
            raise RuntimeError("bug in a third-party adapter")

    mod = types.ModuleType("pk_exploding")

    @hookimpl
    def prunekit_register_adapters(register):  # noqa: ANN001, ANN202
        register(Exploding())

    mod.prunekit_register_adapters = prunekit_register_adapters
    plugins_mod.reset_plugins()
    try:
        plugins_mod.register_module(mod, name="exploding-plugin")
        assert plugins_mod.select_adapter(tiny_llama()).name == "llama"
        failure = next(f for f in plugins_mod.load_failures() if f.name == "exploding-plugin")
        assert "match() raised RuntimeError" in failure.error and "bug in a third-party" in failure.error
        assert "exploding" not in plugins_mod.adapters()
    finally:
        plugins_mod.reset_plugins()
