"""``score_model`` and ``evaluate_model`` (:mod:`prunekit_core.study.pipeline`): what ``prunekit score`` and
``prunekit eval`` compute, as one call each, checked against the step-by-step API on a tiny saved model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, words

import prunekit_core as pk
from prunekit_core.ir.defaults import DEFAULT_SCORE_METRICS
from prunekit_core.ir.errors import CalibrationError, PlanError
from prunekit_core.scoring.calibration import Calibration
from prunekit_core.study.commands import evaluate_model, score_model

SEQ, N = 16, 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline-commands")
    text = root / "text.txt"
    text.write_text(words(3000, seed=1) + "\n")
    return save_tiny_model(root / "tiny", layers=3), text


def test_score_model_is_calibrate_then_score(assets: tuple[Path, Path]) -> None:
    """Block and sublayer metrics: one calibration pass, span metrics over ``span`` blocks, the others
    without a span; the default metrics when none is named."""
    model, text = assets
    res = score_model(model, calib=str(text), span=2, seq_len=SEQ, windows=N)
    assert [m.name for m in res.metrics] == list(DEFAULT_SCORE_METRICS) and not res.groups
    net, tok, _ = pk.load_model(str(model))
    ids = pk.load_windows(tok, str(text), seq_len=SEQ, num_windows=N).ids
    assert torch.equal(res.windows.ids, ids)
    cal = pk.calibrate(net, ids)
    for name in DEFAULT_SCORE_METRICS:
        span = 2 if name == "angular" else None  # the one span metric of the three
        assert res.scores[name].values == pk.score(net, cal, name, span=span).values, name
    assert res.scores["angular"].span == 2 and res.scores["bi"].span is None
    assert set(res.timings) == {"load", "calibrate", "score"}


def test_score_model_channel_metrics_read_the_text_windows(assets: tuple[Path, Path]) -> None:
    """Channel metrics: no calibration pass, the windows alone, the metrics in one context; mixed with a
    block metric they are refused before anything is loaded."""
    from prunekit_core.scoring.api import score_groups

    model, text = assets
    res = score_model(model, calib=str(text), metrics=["magnitude", "wanda"], seq_len=SEQ, windows=N)
    assert not res.scores and set(res.groups) == {"magnitude", "wanda"}
    net, tok, _ = pk.load_model(str(model))
    ids = pk.load_windows(tok, str(text), seq_len=SEQ, num_windows=N).ids
    want = score_groups(net, Calibration(windows=ids), ["magnitude", "wanda"])
    for name, fams in want.items():
        assert fams.keys() == res.groups[name].keys()
        assert all(torch.equal(fams[f], res.groups[name][f]) for f in fams), name
    assert "calibrate" not in res.timings

    with pytest.raises(PlanError, match="wanda scores channel groups, bi scores blocks or sublayers"):
        score_model(model / "missing", calib=str(text), metrics=["wanda", "bi"])  # refused before the path


def test_evaluate_model_is_perplexity_and_counts(assets: tuple[Path, Path]) -> None:
    model, text = assets
    ev = evaluate_model(model, text=str(text), seq_len=SEQ, max_tokens=5 * SEQ)
    net, tok, _ = pk.load_model(str(model))
    ids = pk.load_windows(tok, str(text), seq_len=SEQ, max_tokens=5 * SEQ).ids
    want = pk.perplexity(net, ids, batch_size=4)
    assert ev.perplexity == want and ev.perplexity.windows == 5
    assert ev.params == pk.count_parameters(net)
    assert ev.size_on_disk == pk.size_on_disk(model) and ev.report["size_on_disk_bytes"] == ev.size_on_disk
    assert ev.report["perplexity"] == want.perplexity and ev.report["params"]["total"] == ev.params.total
    with pytest.raises(CalibrationError, match="--max-tokens 8 is smaller than one window of --seq-len 16"):
        evaluate_model(model, text=str(text), seq_len=SEQ, max_tokens=8)
