"""Checkpoints: atomic saves, refusing to clobber, and loud failures on damaged folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prunekit_llama import LlamaFamilyAdapter
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit_core.io.checkpoint import (
    PLAN_FILE,
    RECORD_FILE,
    load_pruned,
    read_plan,
    save_pruned,
    verify_checkpoint,
)
from prunekit_core.io.integrity import file_manifest, weights_digest
from prunekit_core.ir.errors import CheckpointError
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import AppliedPlan, apply_plan

WEIGHTS = "model.safetensors"


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config).eval()


def applied() -> AppliedPlan:
    model = tiny()
    adapter = LlamaFamilyAdapter()
    remove = ["text.blocks.0", "text.blocks.2.attn"]  # the removed branch moves to layer 1
    plan = PrunePlan(fingerprint=fingerprint(model, adapter.build_ir(model)), remove=remove)
    return apply_plan(model, plan, adapter=adapter)


def pruned() -> LlamaForCausalLM:
    return applied().model


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 13).unsqueeze(0), use_cache=False).logits


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    run = applied()
    return save_pruned(run.model, tmp_path / "ckpt", plan=run.plan)


# --- atomic saves ------------------------------------------------------------------------------------


def test_save_writes_a_complete_folder(saved: Path) -> None:
    assert {p.name for p in saved.iterdir()} >= {WEIGHTS, "config.json", RECORD_FILE, PLAN_FILE}
    assert leftovers(saved.parent) == []
    record = json.loads((saved / RECORD_FILE).read_text())
    assert [(r["module"], r["norm"]) for r in record["removed_branches"]] == [
        ("model.layers.1.self_attn", "model.layers.1.input_layernorm")
    ]
    assert record["cache_indices"] == {"model.layers.0.self_attn": 0}
    torch.testing.assert_close(logits(load_pruned(saved)), logits(pruned()), atol=0, rtol=0)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_while_writing_weights_leaves_nothing(tmp_path: Path, monkeypatch, error) -> None:
    model = pruned()
    real = model.save_pretrained

    def crash(folder, **kwargs):  # noqa: ANN001, ANN202
        real(folder, **kwargs)  # half the folder is written when the crash comes
        raise error

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(type(error)):
        save_pruned(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert leftovers(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_crash_while_writing_tokenizer_leaves_nothing(tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, folder) -> None:  # noqa: ANN001
            (Path(folder) / "tokenizer.json").write_text("{")
            raise OSError("tokenizer save failed")

    with pytest.raises(OSError, match="tokenizer save failed"):
        save_pruned(pruned(), tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_crash_while_overwriting_keeps_the_old_checkpoint(saved: Path, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = tiny()

    def crash(folder, **kwargs):  # noqa: ANN001, ANN202
        raise OSError("boom")

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(OSError, match="boom"):
        save_pruned(model, saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert leftovers(saved.parent) == []


def test_existing_target_without_overwrite_is_refused(saved: Path) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(CheckpointError, match="already exists"):
        save_pruned(tiny(), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert leftovers(saved.parent) == []


def test_overwrite_replaces_a_prunekit_checkpoint(saved: Path) -> None:
    model = tiny()
    save_pruned(model, saved, overwrite=True)
    assert not (saved / PLAN_FILE).exists()  # the new model has no plan
    torch.testing.assert_close(logits(load_pruned(saved)), logits(model), atol=0, rtol=0)
    assert leftovers(saved.parent) == []


def test_overwrite_refuses_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "my-thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a prunekit checkpoint"):
        save_pruned(tiny(), target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["chapter1.tex"]
    assert (target / "chapter1.tex").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_overwrite_accepts_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    save_pruned(tiny(), tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / RECORD_FILE).is_file()


def test_overwrite_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_pruned(tiny(), target, overwrite=True)
    assert target.read_text() == "not a folder"


def test_missing_parents_are_created(tmp_path: Path) -> None:
    """As every Hugging Face tool does: out/x is written when out/ does not exist yet."""
    out = save_pruned(tiny(), tmp_path / "nope" / "deeper" / "ckpt")
    assert out == tmp_path / "nope" / "deeper" / "ckpt"
    assert (out / RECORD_FILE).is_file() and (out / "config.json").is_file()
    assert verify_checkpoint(out)["files"]


def test_a_failed_save_removes_the_parents_it_created(tmp_path: Path, monkeypatch) -> None:
    model = tiny()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    (tmp_path / "kept").mkdir()  # an existing parent stays; the ones the save made go
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "kept" / "new" / "ckpt")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_a_parent_that_is_a_file_is_refused_before_writing(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_pruned(tiny(), tmp_path / "afile" / "sub" / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --- damaged folders ---------------------------------------------------------------------------------


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a folder"):
        load_pruned(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("config.json", "no config.json"),
        (RECORD_FILE, "non-uniform prunekit checkpoint: the structure record that rebuilds it was lost"),
        (WEIGHTS, WEIGHTS),
    ],
)
def test_load_folder_missing_a_file(saved: Path, missing: str, message: str) -> None:
    (saved / missing).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_pruned(saved)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "something-else"}), "not a prunekit structure record"),
        (json.dumps({"format": "prunekit-checkpoint", "version": 99}), "version 99"),
    ],
)
def test_load_corrupted_record(saved: Path, content: str, message: str) -> None:
    (saved / RECORD_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_pruned(saved)


def test_load_truncated_weights(saved: Path) -> None:
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_pruned(saved)


def resave_weights(saved: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite the weights AND the record's sizes and fingerprint, as a buggy writer would: the key checks
    behind the integrity checks must still catch what does not match the structure."""
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})
    record = json.loads((saved / RECORD_FILE).read_text())
    record["files"] = file_manifest(saved, exclude=(RECORD_FILE,))
    record["weights_digest"] = weights_digest(saved)
    (saved / RECORD_FILE).write_text(json.dumps(record))


def test_load_with_a_weight_deleted_names_the_key(saved: Path) -> None:
    tensors = load_file(saved / WEIGHTS)
    victim = "model.layers.1.mlp.down_proj.weight"
    assert victim in tensors
    del tensors[victim]
    resave_weights(saved, tensors)
    with pytest.raises(CheckpointError, match=r"missing weights.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_pruned(saved)


def test_load_with_an_unexpected_weight_names_it(saved: Path) -> None:
    tensors = load_file(saved / WEIGHTS)
    tensors["model.layers.7.mlp.extra.weight"] = torch.zeros(2)
    resave_weights(saved, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected weights.*model\.layers\.7\.mlp\.extra\.weight"):
        load_pruned(saved)


def test_load_with_weights_for_a_removed_branch(saved: Path) -> None:
    """A record that claims a branch is removed while the weights still hold it is inconsistent."""
    tensors = load_file(saved / WEIGHTS)
    donor = tiny().state_dict()
    for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.1.self_attn.{key}.weight"
        tensors[name] = donor[name].contiguous()
    resave_weights(saved, tensors)
    with pytest.raises(CheckpointError, match="weights present for removed branches"):
        load_pruned(saved)


def test_read_plan_refuses_a_plan_that_is_not_the_one_saved(saved: Path) -> None:
    """read_plan hands back only the plan the checkpoint was saved with (its record's digest), as
    load_pruned did when it attached the plan: an edited or swapped plan.json is refused by name."""
    plan = read_plan(saved)
    assert plan is not None
    (saved / "plan.json").write_text(plan.model_copy(update={"remove": ["text.blocks.0"]}).to_json())
    with pytest.raises(CheckpointError, match="not the plan these weights were made with"):
        read_plan(saved)


def test_load_restores_plan_and_cache_indices(saved: Path) -> None:
    model = load_pruned(saved)
    plan = read_plan(saved)
    assert plan is not None and plan.remove == ["text.blocks.0", "text.blocks.2.attn"]
    assert read_plan(saved.parent) is None  # a folder without plan.json
    assert model.model.layers[0].self_attn.layer_idx == 0
    assert type(model.model.layers[1].self_attn).__name__ == "RemovedBranch"
    assert type(model.model.layers[1].input_layernorm).__name__ == "Identity"
    assert not model.training


def test_parents_of_a_path_with_dotdot_are_made_once(tmp_path: Path) -> None:
    """``new/../out/x``: ``new`` is never made, ``out`` is, and a second save under it makes nothing."""
    from prunekit_core.io.checkpoint import check_parents, make_parents, remove_made

    out = tmp_path / "new" / ".." / "out" / "x"
    check_parents(out)
    made = make_parents(out)
    assert made == [tmp_path / "out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert make_parents(tmp_path / "out" / "y") == []  # already there: not this call's to remove
    remove_made(made)
    assert list(tmp_path.iterdir()) == []
