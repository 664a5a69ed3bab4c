"""`prunekit inspect` and `prunekit prune` on a saved tiny GOT-OCR2: the conv stages, --scope, --plan."""

from __future__ import annotations

import json

import torch
from llava_tiny import write_text
from prunekit_llava.got_ocr2 import GotOcr2Adapter
from test_got_ocr2 import inputs, logits, make_got
from transformers import GotOcr2ForConditionalGeneration

from prunekit_core import apply_plan, load_pruned, save_plan
from prunekit_core.cli import main
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.testing import word_tokenizer


def _save(folder):  # noqa: ANN001, ANN202
    make_got().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _run(capsys, *argv) -> tuple[int, dict]:  # noqa: ANN001
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, (json.loads(out) if "--json" in argv and code == 0 else {"text": out})


def test_inspect_shows_the_conv_stages_and_their_channel_groups(tmp_path, capsys) -> None:  # noqa: ANN001
    folder = _save(tmp_path / "got")
    code, out = _run(capsys, "inspect", folder)
    assert code == 0
    text = out["text"]
    assert "adapter:      got_ocr2" in text
    assert "vision.neck  neck  model.vision_tower.neck" in text
    assert "vision.neck.conv1.channels x8" in text and "projector.conv_upsampler2.channels x32" in text
    code, out = _run(capsys, "inspect", folder, "--json")
    stages = {st["id"]: st for t in out["towers"] for st in t["stages"]}
    assert [g["id"] for g in stages["projector"]["channel_groups"]] == [
        "projector.conv_upsampler1.channels",
        "projector.conv_upsampler2.channels",
    ]


def test_prune_scope_vision_calibrates_with_images(tmp_path, capsys) -> None:  # noqa: ANN001
    folder = _save(tmp_path / "got")
    text = write_text(tmp_path / "t.txt")
    code, out = _run(
        capsys,
        *("prune", folder, "--ratio", "0.2", "--calib", text, "--windows", "4", "--seq-len", "16"),
        *("--scope", "vision", "--metric", "bi", "--json", "--out", tmp_path / "out"),
    )
    assert code == 0
    assert out["removed"] and all(u.startswith("vision.blocks.") for u in out["removed"])
    assert 0 < out["image_feature_fidelity"] < 1
    plain = GotOcr2ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert plain.config.vision_config.num_hidden_layers == 4 - len(out["removed"])


def test_prune_with_a_plan_that_narrows_the_convs(tmp_path, capsys) -> None:  # noqa: ANN001
    folder = _save(tmp_path / "got")
    model = GotOcr2ForConditionalGeneration.from_pretrained(folder).eval()
    groups = {"vision.neck.conv2.channels": [1], "projector.conv_upsampler2.channels": [0, 31]}
    plan = PrunePlan(
        fingerprint=fingerprint(model, GotOcr2Adapter().build_ir(model)),
        remove=["vision.blocks.1"],
        remove_groups=groups,
    )
    save_plan(plan, tmp_path / "plan.json")
    code, out = _run(
        capsys, "prune", folder, "--plan", tmp_path / "plan.json", "--json", "--out", tmp_path / "out"
    )
    assert code == 0 and not out["uniform"]
    loaded = load_pruned(tmp_path / "out")
    assert loaded.model.multi_modal_projector.multimodal_projector.in_features == 30
    ids, pixels = inputs()
    reference = apply_plan(make_got(), plan).model  # the same plan through the API
    torch.testing.assert_close(logits(loaded, ids, pixels), logits(reference, ids, pixels), atol=0, rtol=0)


def test_score_magnitude_ranks_the_conv_channels(tmp_path, capsys) -> None:  # noqa: ANN001
    folder = _save(tmp_path / "got")
    text = write_text(tmp_path / "t.txt")
    code, out = _run(
        capsys, "score", folder, "--metric", "magnitude", "--calib", text, "--seq-len", "16", "--json"
    )
    assert code == 0
    scores = out["magnitude"]
    assert (
        len(scores["vision.neck.conv1.channels"]) == 8
        and len(scores["projector.conv_upsampler2.channels"]) == 32
    )
    assert len(scores["text.blocks.0.mlp.channels"]) == 48


def test_width_planning_in_the_vision_tower_points_to_plans_for_conv_channels(tmp_path, capsys) -> None:  # noqa: ANN001
    folder = _save(tmp_path / "got")
    text = write_text(tmp_path / "t.txt")
    argv = ["prune", folder, "--ratio", "0.1", "--calib", text, "--windows", "4", "--seq-len", "16"]
    argv += ["--scope", "vision", "--granularity", "width", "--out", tmp_path / "out"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    assert "vision.neck.conv1.channels" in err and "--plan" in err
