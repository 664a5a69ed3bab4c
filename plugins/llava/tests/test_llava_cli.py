"""`prunekit inspect` and `prunekit prune --scope` on a saved tiny LLaVA."""

from __future__ import annotations

import json

import pytest
from llava_tiny import save_tiny_llava, write_text
from transformers import LlavaForConditionalGeneration

from prunekit_core import load_pruned
from prunekit_core.cli import main


@pytest.fixture
def llava_dir(tmp_path):
    return save_tiny_llava(tmp_path / "llava")


def _run(capsys, *argv) -> tuple[int, dict]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, (json.loads(out) if "--json" in [str(a) for a in argv] and code == 0 else {"text": out})


def test_inspect_lists_the_towers(llava_dir, capsys):
    code, out = _run(capsys, "inspect", llava_dir)
    assert code == 0
    text = out["text"]
    for line in (
        "adapter:      llava",
        "tower vision: 4 blocks",
        "tower text: 4 blocks",
        "vision -> projector",
    ):
        assert line in text
    assert "vision.embed  stem" in text and "projector.mlp  projector" in text


@pytest.mark.parametrize(("scope", "touched"), [("vision", {"vision"}), ("text", {"text"})])
def test_prune_scope_touches_only_those_towers(llava_dir, tmp_path, capsys, scope, touched):
    text = write_text(tmp_path / "t.txt")
    code, out = _run(
        capsys,
        *("prune", llava_dir, "--ratio", "0.2", "--calib", text, "--windows", "4", "--seq-len", "16"),
        *("--scope", scope, "--metric", "bi", "--json", "--out", tmp_path / "out"),
    )
    assert code == 0
    assert {u.split(".")[0] for u in out["removed"]} == touched
    assert out["budget"]["scope"] == [scope]
    by_tower = out["by_tower"]
    assert set(by_tower) == {"vision", "text"}
    for name, row in by_tower.items():
        assert (row["removed"] > 0) == (name in touched)
    assert row["removed"] <= row["block_params"]
    assert out["uniform"]  # whole blocks: plain from_pretrained reloads it
    assert 0 < out["image_feature_fidelity"] <= 1 + 1e-9
    if scope == "text":  # the vision tower and projector are untouched: the same features
        assert out["image_feature_fidelity"] == pytest.approx(1.0, abs=1e-9)
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    n = (
        plain.config.vision_config.num_hidden_layers
        if scope == "vision"
        else plain.config.text_config.num_hidden_layers
    )
    assert n == 3
    assert type(load_pruned(tmp_path / "out")) is LlavaForConditionalGeneration


def test_prune_all_towers_reports_every_tower(llava_dir, tmp_path, capsys):
    text = write_text(tmp_path / "t.txt")
    code, out = _run(
        capsys,
        *("prune", llava_dir, "--ratio", "0.3", "--calib", text, "--windows", "4", "--seq-len", "16"),
        *("--metric", "sublayer_drop", "--json", "--out", tmp_path / "out"),
    )
    assert code == 0
    assert out["budget"]["scope"] == "all"
    assert sum(r["removed"] for r in out["by_tower"].values()) == out["plan"]["removed_params"]


def test_default_method_on_vision_drops_the_lsq_repair(llava_dir, tmp_path, capsys):
    text = write_text(tmp_path / "t.txt")
    argv = ("prune", llava_dir, "--ratio", "0.2", "--calib", text, "--windows", "4", "--seq-len", "16")
    code, out = _run(capsys, *argv, "--scope", "vision", "--json", "--out", tmp_path / "out")
    assert code == 0
    # the default method's candidates: those with the repair lost it to the vision tower, and say so
    assert out["plan"]["repair"] == "none" and all(c["repair"] == "none" for c in out["plan"]["candidates"])
    assert any(c["note"].startswith("no least-squares repair") for c in out["plan"]["candidates"])
    code = main([str(a) for a in (*argv, "--scope", "vision", "--out", tmp_path / "o1")])
    assert (
        code == 0
        and "no least-squares repair: the plan removes units of tower(s) ['vision']"
        in capsys.readouterr().out
    )
    code = main([str(a) for a in (*argv, "--scope", "vision", "--repair", "lsq", "--out", tmp_path / "o2")])
    assert code != 0 and "cannot be repaired by least squares" in capsys.readouterr().err


def test_bad_scope_is_a_clear_error(llava_dir, tmp_path, capsys):
    text = write_text(tmp_path / "t.txt")
    code = main(
        [str(a) for a in ("prune", llava_dir, "--ratio", "0.2", "--calib", text, "--scope", "audio")]
        + ["--out", str(tmp_path / "o"), "--seq-len", "16", "--windows", "2"]
    )
    err = capsys.readouterr().err
    assert code != 0 and "unknown tower(s) ['audio']" in err and "vision" in err


def test_vision_width_is_a_clear_error(llava_dir, tmp_path, capsys):
    text = write_text(tmp_path / "t.txt")
    argv = ["prune", llava_dir, "--ratio", "0.2", "--calib", text, "--windows", "4", "--seq-len", "16"]
    code = main(
        [str(a) for a in [*argv, "--scope", "vision", "--granularity", "width", "--out", tmp_path / "o"]]
    )
    assert code != 0 and "declares no channel groups in tower(s) vision (--scope)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("metric", ["sleb", "nri"])
def test_trial_metrics_plan_the_vision_tower(llava_dir, tmp_path, capsys, metric):
    text = write_text(tmp_path / "t.txt")
    argv = ["prune", llava_dir, "--ratio", "0.2", "--calib", text, "--windows", "4", "--seq-len", "16"]
    code, out = _run(
        capsys, *argv, "--scope", "vision", "--metric", metric, "--json", "--out", tmp_path / "o"
    )
    assert code == 0 and out["removed"] and all(u.startswith("vision.") for u in out["removed"])
    assert out["plan"]["method"] == f"greedy:{metric}"
