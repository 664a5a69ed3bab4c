"""Plain transformers never loads a non-uniform checkpoint wrong: it refuses, naming load_pruned.

A checkpoint with removed sublayers or per-layer widths is one its config.json cannot describe; plain
``from_pretrained`` would build the full model and fill what is missing with random weights. Uniform plans
keep loading plainly, and every checkpoint loads exactly with ``load_pruned``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import logits_of, tiny_llama, tiny_pruned, tiny_tokenizer, words
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaForCausalLM

import prunekit_core as pk
from prunekit_core.cli import main
from prunekit_core.io.checkpoint import (
    PLAIN_LOAD_GUARD_KEY,
    RECORD_FILE,
    load_pruned,
    save_pruned,
    structure_record,
)
from prunekit_core.ir.errors import CheckpointError
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.testing import assert_identical, assert_kernel_close, assert_same_weights

PLAIN_LOADERS = {
    "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
    "LlamaForCausalLM": LlamaForCausalLM.from_pretrained,
    "AutoModel": AutoModel.from_pretrained,
    "config passed": lambda path: AutoModelForCausalLM.from_pretrained(
        path, config=AutoConfig.from_pretrained(path)
    ),
}


def per_layer_width() -> LlamaForCausalLM:
    """A 3-block Llama with 2 MLP channel groups removed in block 0 and 5 in block 2 (per-layer widths)."""
    model = tiny_llama(layers=3, tied=False)
    groups = {"text.blocks.0.mlp.channels": [1, 7], "text.blocks.2.mlp.channels": [0, 3, 4, 9, 20]}
    plan = PrunePlan(fingerprint=fingerprint(model, pk.inspect(model)), remove=[], remove_groups=groups)
    return pk.apply_plan(model, plan).model


NON_UNIFORM = {"sublayer removed": tiny_pruned, "per-layer width": per_layer_width}


@pytest.mark.parametrize("make", NON_UNIFORM.values(), ids=NON_UNIFORM.keys())
@pytest.mark.parametrize("loader", PLAIN_LOADERS.values(), ids=PLAIN_LOADERS.keys())
def test_plain_from_pretrained_refuses_a_non_uniform_checkpoint(tmp_path: Path, make, loader) -> None:
    model = make()
    assert not structure_record(model)["uniform"]  # read off the model: what save_pruned records
    out = save_pruned(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match=r"prunekit_core\.load_pruned"):
        loader(out)
    assert_identical(logits_of(load_pruned(out)), logits_of(model))


def test_without_the_guard_plain_from_pretrained_would_load_random_weights(tmp_path: Path) -> None:
    """Why the guard exists: the same folder without it loads with missing keys, silently re-initialised."""
    out = save_pruned(tiny_pruned(), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config[PLAIN_LOAD_GUARD_KEY]
    (out / "config.json").write_text(json.dumps(config))
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"]


def test_config_alone_still_loads_and_load_pruned_drops_the_guard(tmp_path: Path) -> None:
    out = save_pruned(tiny_pruned(), tmp_path / "out")
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2  # block 0 removed
    loaded = load_pruned(out)
    assert PLAIN_LOAD_GUARD_KEY not in loaded.config.to_dict()
    # saved again, the guard is written again (save_pretrained itself drops the key)
    again = save_pruned(loaded, tmp_path / "again")
    assert PLAIN_LOAD_GUARD_KEY in json.loads((again / "config.json").read_text())
    assert_identical(logits_of(load_pruned(again)), logits_of(loaded))


def test_uniform_plan_loads_plainly_without_missing_keys(tmp_path: Path) -> None:
    model = tiny_llama(layers=3)
    plan = PrunePlan(fingerprint=fingerprint(model, pk.inspect(model)), remove=["text.blocks.1"])
    pk.apply_plan(model, plan)
    assert plan.is_uniform
    out = save_pruned(model, tmp_path / "out")
    assert PLAIN_LOAD_GUARD_KEY not in json.loads((out / "config.json").read_text())
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # plain transformers memory-maps the weights unaligned: the same weights, perhaps other kernels
    assert_same_weights(plain, model)
    assert_kernel_close(logits_of(plain.eval()), logits_of(model))


def test_a_checkpoint_saved_before_the_guard_still_loads(tmp_path: Path) -> None:
    """Folders written by older prunekit versions have no guard; load_pruned reads them as before."""
    model = tiny_pruned()
    out = save_pruned(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config[PLAIN_LOAD_GUARD_KEY]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    record = json.loads((out / RECORD_FILE).read_text())
    record["files"]["config.json"] = (out / "config.json").stat().st_size  # as an old save recorded it
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    assert_identical(logits_of(load_pruned(out)), logits_of(model))


def test_the_guard_is_covered_by_the_integrity_check(tmp_path: Path) -> None:
    """Removing the guard by hand is a change to config.json that load_pruned reports."""
    out = save_pruned(tiny_pruned(), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config[PLAIN_LOAD_GUARD_KEY]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with pytest.raises(CheckpointError, match="config.json is shorter"):
        load_pruned(out)


def test_a_guarded_folder_that_lost_its_record_says_so(tmp_path: Path) -> None:
    out = save_pruned(tiny_pruned(), tmp_path / "out")
    (out / RECORD_FILE).unlink()
    with pytest.raises(CheckpointError, match="structure record that rebuilds it was lost"):
        load_pruned(out)
    uniform = save_pruned(tiny_llama(), tmp_path / "uniform")  # no guard: the advice to load it plainly holds
    (uniform / RECORD_FILE).unlink()
    with pytest.raises(
        CheckpointError, match="not written by prunekit.*AutoModelForCausalLM.from_pretrained"
    ):
        load_pruned(uniform)


def test_cli_inspect_and_eval_read_a_guarded_checkpoint(tmp_path: Path, capsys) -> None:
    """`prunekit inspect` and `prunekit eval` load the folder with load_pruned: block 1 has no attention."""
    from prunekit_core.study.evaluate import count_parameters

    model = tiny_pruned()
    out = save_pruned(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text(words(400, seed=1))
    assert main(["inspect", str(out), "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["towers"][0]["blocks"]
    assert [[s["id"] for s in b["sublayers"]] for b in blocks] == [
        ["text.blocks.0.attn", "text.blocks.0.mlp"],
        ["text.blocks.1.mlp"],
    ]
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "16", "--windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"]["total"] == count_parameters(model).total


def test_a_block_plan_on_a_reloaded_narrowed_model_is_not_called_uniform(tmp_path: Path) -> None:
    """A later block removal on a model narrowed per layer earlier (reloaded with load_pruned) cuts no width,
    but the config still does not describe the narrowed tensors: the applied plan must not claim plain
    reloads (it agrees with the checkpoint's record), while the same plan on an unnarrowed model does."""
    first = save_pruned(per_layer_width(), tmp_path / "narrowed", tokenizer=tiny_tokenizer())
    reloaded = load_pruned(first)
    plan = PrunePlan(fingerprint=fingerprint(reloaded, pk.inspect(reloaded)), remove=["text.blocks.1"])
    applied = pk.apply_plan(reloaded, plan)
    assert not applied.plan.is_uniform and not applied.plan.width_uniform
    assert not structure_record(applied.model)["uniform"]
    plain = tiny_llama(layers=3, tied=False)
    plan = PrunePlan(fingerprint=fingerprint(plain, pk.inspect(plain)), remove=["text.blocks.1"])
    assert pk.apply_plan(plain, plan).plan.is_uniform


def test_config_describes_shapes_needs_no_optional_attention_kernel() -> None:
    """The check builds the model class on the meta device: an attention implementation whose library is
    absent (flash-attn) must not make saving or cutting fail."""
    from prunekit_core.surgery.width import config_describes_shapes

    model = tiny_llama(layers=2, tied=False)
    model.config._attn_implementation = "flash_attention_2"
    assert config_describes_shapes(model)
    assert not config_describes_shapes(per_layer_width())
