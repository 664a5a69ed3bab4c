"""Streaming calibration (one block in memory at a time) on multi-tower models.

The vision tower is streamed first (its blocks' outputs are replayed while the language model's block
inputs are captured), then the language model. Scores must equal the in-memory multi-tower pass bit for
bit, with the same calibration images, for LLaVA with a CLIP or SigLIP tower, LLaVA with a Mixtral, and
GOT-OCR2 (SAM tower, conv neck and projector); removal trials on the language model must equal the
in-memory trials; a streamed plan applies to the model loaded afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llava_tiny import save_tiny_llava, tiny_llava, tiny_llava_moe, write_text
from test_got_ocr2 import make_got

import prunekit_core as pk
from prunekit_core.io.checkpoint import model_class
from prunekit_core.ir.errors import PlanError
from prunekit_core.planning.planner import plan_pruning
from prunekit_core.registry.plugins import get_metric
from prunekit_core.scoring.calibration import ScoringContext
from prunekit_core.scoring.streaming import open_streaming, stream_calibrate, stream_score

MODELS = {
    "llava-clip": lambda: tiny_llava("clip"),
    "llava-siglip": lambda: tiny_llava("siglip"),
    "llava-mixtral": tiny_llava_moe,
    "got-ocr2": make_got,
}
LENGTH = {"got-ocr2": 24}  # GOT-OCR2's tiny image takes 16 tokens


def _saved(name: str, folder: Path) -> torch.nn.Module:
    """The model saved in many shards (blocks span files), and the same model loaded back in memory."""
    original = MODELS[name]()
    original.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return model_class(type(original).__name__, None).from_pretrained(folder).eval()


def _windows(name: str, n: int = 5) -> torch.Tensor:
    return torch.randint(3, 100, (n, LENGTH.get(name, 16)), generator=torch.Generator().manual_seed(0))


def _block_params_meta(sm) -> bool:  # noqa: ANN001
    return all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_streaming_scores_equal_in_memory_with_images(name: str, tmp_path: Path) -> None:
    model = _saved(name, tmp_path / name)
    ids, extra = pk.select_adapter(model).calibration_inputs(model, _windows(name))
    cal = pk.calibrate(model, ids, inputs=extra, batch_size=2)  # 3 batches, the last one short
    sm = open_streaming(tmp_path / name)
    assert _block_params_meta(sm)  # only what lies outside the blocks was loaded
    sids, sextra = sm.calibration_inputs(_windows(name))  # on the skeleton: same image tokens and images
    assert torch.equal(sids, ids) and sextra.keys() == extra.keys()
    assert all(torch.equal(sextra[k], extra[k]) for k in extra)
    scal = stream_calibrate(sm, sids, inputs=sextra, batch_size=2, metrics=["bi_lsq"])
    assert list(scal.towers) == list(cal.towers) == ["vision", "text"]
    # bi_lsq block by block: the same normal equations summed in another order, and over batches of 2
    # where the in-memory pass runs its own batches of 8 (float32 kernels may round differently)
    want_lsq = pk.score(model, cal, "bi_lsq").values
    got_lsq = stream_score(sm, scal, "bi_lsq").values
    assert got_lsq.keys() == want_lsq.keys() and any(u.startswith("vision.") for u in got_lsq)
    for u, v in want_lsq.items():
        assert got_lsq[u] == pytest.approx(v, rel=1e-6), (u, got_lsq[u], v)
    for metric in ("bi", "angular", "sublayer_drop"):
        got, want = stream_score(sm, scal, metric).values, pk.score(model, cal, metric).values
        assert got == want, metric
        assert any(u.startswith("vision.") for u in got) and any(u.startswith("text.") for u in got)
    for tower in ("vision", "text"):
        assert torch.equal(scal.towers[tower].boundary_last, cal.towers[tower].boundary_last), tower
        assert scal.towers[tower].tokens == cal.towers[tower].tokens
    # every block once, the first block of each tower also probed (once, for its return type)
    assert sm.loaded_blocks == len(sm.ir.blocks()) + 2
    assert _block_params_meta(sm)
    vision = sm.ir.tower("vision")
    patches = cal.towers["vision"].tokens // ids.shape[0]
    # the replayed vision stream: every vision block's output for every window
    assert sm.replay_bytes == len(vision.blocks) * ids.shape[0] * patches * vision.width.size * 4


@pytest.mark.parametrize("name", ["llava-clip", "got-ocr2"])
def test_streaming_trials_on_the_language_model_equal_in_memory(name: str, tmp_path: Path) -> None:
    model = _saved(name, tmp_path / name)
    ids, extra = pk.select_adapter(model).calibration_inputs(model, _windows(name))
    cal = pk.calibrate(model, ids, inputs=extra)
    sm = open_streaming(tmp_path / name)
    scal = stream_calibrate(sm, *sm.calibration_inputs(_windows(name))[:1], inputs=extra)
    text = pk.inspect(model).restricted(["text"])
    for metric in ("nri", "sleb"):
        ctx = ScoringContext(model=model, adapter=pk.select_adapter(model), ir=text, calibration=cal)
        want = get_metric(metric).score(ctx).values
        sctx = ScoringContext(
            model=sm.model, adapter=sm.adapter, ir=sm.ir.restricted(["text"]), calibration=scal
        )
        got = get_metric(metric).score(sctx).values
        assert got.keys() == want.keys() and all(u.startswith("text.") for u in got), metric
        for u in want:
            assert got[u] == want[u], (metric, u)
    # a unit of the vision tower is refused with the way out
    sctx = ScoringContext(model=sm.model, adapter=sm.adapter, ir=sm.ir, calibration=scal)
    with pytest.raises(PlanError, match="--scope text"):
        get_metric("sleb").score(sctx)


@pytest.mark.parametrize("scope", [["vision"], ["text"], None])
def test_streamed_scoped_plan_applies_to_the_model_loaded_later(scope, tmp_path: Path) -> None:  # noqa: ANN001
    model = _saved("llava-siglip", tmp_path / "m")
    sm = open_streaming(tmp_path / "m")
    ids, extra = sm.calibration_inputs(_windows("llava-siglip"))
    scal = stream_calibrate(sm, ids, inputs=extra)
    plan = plan_pruning(
        sm.model,
        scal,
        ratio=0.25,
        metric="bi",
        planner="rank",
        repair="none",
        scope=scope,
        adapter=sm.adapter,
    )
    cal = pk.calibrate(model, ids, inputs=extra)
    want = plan_pruning(model, cal, ratio=0.25, metric="bi", planner="rank", repair="none", scope=scope)
    assert plan.remove == want.remove and plan.fingerprint == want.fingerprint
    if scope:
        assert all(u.startswith(scope[0] + ".") for u in plan.remove)
    pruned = pk.apply_plan(model, plan).model  # the fingerprint matches the model loaded afterwards
    assert len(pk.inspect(pruned).blocks()) == len(pk.inspect(tiny_llava("siglip")).blocks()) - len(
        plan.remove
    )


# --- the CLI ---------------------------------------------------------------------------------------------


def _cli(capsys, *argv) -> dict:  # noqa: ANN001
    from prunekit_core.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


CALIB = ("--windows", "4", "--seq-len", "16")


def test_cli_score_streaming_equals_in_memory(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = save_tiny_llava(tmp_path / "llava", "siglip")
    text = write_text(tmp_path / "t.txt")
    metrics = ("--metric", "bi", "--metric", "sublayer_drop", "--metric", "sleb")
    want = _cli(capsys, "score", folder, "--calib", text, *CALIB, *metrics, "--json")
    got = _cli(capsys, "score", folder, "--calib", text, *CALIB, *metrics, "--json", "--streaming")
    assert got["bi"] == want["bi"] and got["sublayer_drop"] == want["sublayer_drop"]
    assert any(u.startswith("vision.") for u in got["bi"])  # the images reached the vision tower
    # trials in streaming measure the language model's units (the same values as in memory)
    assert got["sleb"] == {u: v for u, v in want["sleb"].items() if u.startswith("text.")}


@pytest.mark.parametrize("scope", ["vision", "text"])
def test_cli_prune_streaming_scope_plan_only(scope: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = save_tiny_llava(tmp_path / "llava", "clip")
    text = write_text(tmp_path / "t.txt")
    args = ("prune", folder, "--ratio", "0.2", "--calib", text, *CALIB, "--metric", "bi", "--scope", scope)
    args += ("--planner", "rank", "--repair", "none", "--json")
    streamed = _cli(capsys, *args, "--streaming", "--plan-only", "--out", tmp_path / "plan.json")
    memory = _cli(capsys, *args, "--plan-only", "--out", tmp_path / "plan_mem.json")
    assert streamed["removed"] == memory["removed"] and streamed["removed"]
    assert {u.split(".")[0] for u in streamed["removed"]} == {scope}
    # the streamed plan applies to the model loaded later (its fingerprint is the checkpoint's)
    out = _cli(capsys, "prune", folder, "--plan", tmp_path / "plan.json", "--json", "--out", tmp_path / "out")
    assert out["removed"] == streamed["removed"]
    assert len(pk.inspect(pk.load_pruned(tmp_path / "out")).blocks()) == 8 - len(out["removed"])


def test_cli_score_streaming_channel_metrics_equal_in_memory(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = save_tiny_llava(tmp_path / "llava", "clip")
    text = write_text(tmp_path / "t.txt")
    metrics = ("--metric", "magnitude", "--metric", "wanda")
    want = _cli(capsys, "score", folder, "--calib", text, *CALIB, *metrics, "--json")
    got = _cli(capsys, "score", folder, "--calib", text, *CALIB, *metrics, "--json", "--streaming")
    assert got == want and got["wanda"]
