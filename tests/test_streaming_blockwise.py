"""Streaming metrics that read a block's weights or statistics, computed while the block is loaded.

``magnitude``, ``wanda``, ``obs`` (channel groups) and ``bi_lsq`` (blocks) scored by a streaming pass must
equal the in-memory scores, from sharded safetensors folders, on a model of every plugin and of the
generic adapter; width plans made on the streaming skeleton must equal the in-memory plans and apply to
the loaded model. The expert metrics are checked in plugins/mixtral/tests/test_moe_streaming.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_streaming
import torch
import transformers as T
from test_streaming import MODELS, SMALL, _cli, _seeded
from transformers import AutoModelForCausalLM

from prunekit_core.ir.errors import PlanError
from prunekit_core.planning.planner import plan_pruning
from prunekit_core.planning.width import WidthCurveObserver
from prunekit_core.registry.plugins import get_metric
from prunekit_core.scoring.api import calibrate, score, score_groups
from prunekit_core.scoring.calibration import Calibration
from prunekit_core.scoring.streaming import (
    open_streaming,
    stream_calibrate,
    stream_score,
    stream_score_groups,
)
from prunekit_core.surgery.apply import apply_plan

#: Mistral and Qwen2 (the Llama plugin's other families) at the size of test_streaming's models
DENSE = dict(
    **SMALL,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
ALL = {
    **MODELS,
    "mistral": lambda: _seeded(T.MistralForCausalLM, T.MistralConfig(**DENSE)),
    "qwen2": lambda: _seeded(T.Qwen2ForCausalLM, T.Qwen2Config(**DENSE)),
}
CHANNEL = ("magnitude", "wanda", "obs")
cli_assets = test_streaming.cli_assets  # the same module-scoped fixture (a tiny Llama folder, a text)


def _folders(tmp_path: Path, name: str) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / name
    ALL[name]().save_pretrained(folder, max_shard_size="20KB")  # many shards: blocks span files
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval()


def _meta_blocks(sm: object) -> bool:
    return all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())  # type: ignore[attr-defined]  # sm: a StreamingModel


@pytest.mark.parametrize("name", list(ALL))
def test_streaming_weight_metrics_equal_in_memory(name: str, tmp_path: Path) -> None:
    folder, model = _folders(tmp_path, name)
    windows = torch.randint(3, 100, (10, 12), generator=torch.Generator().manual_seed(0))
    ref = score_groups(model, Calibration(windows=windows), list(CHANNEL))
    sm = open_streaming(folder)
    cal = stream_calibrate(sm, windows, metrics=[*CHANNEL, "bi_lsq", "bi"])
    assert _meta_blocks(sm)  # every block empty again: one block in memory at a time
    assert sm.loaded_blocks == len(sm.ir.blocks()) + 1  # one pass for every metric (+ the first-block probe)
    for metric in CHANNEL:
        got = stream_score_groups(cal, metric)
        assert got.keys() == ref[metric].keys(), metric
        for fid, t in ref[metric].items():
            # the same hooks on the same activations, in the same batches: bitwise
            assert torch.equal(got[fid], t), (metric, fid)
    if name in ("llama", "mixtral", "gptj", "mistral", "qwen2"):
        assert ref["wanda"] and ref["obs"]  # the plugin declares families: the check is not vacuous
    # bi_lsq: the same normal equations, summed in another order (fit and held-out windows interleaved
    # batch by batch instead of fit windows first), so equal to float64 rounding
    ref_lsq = score(model, calibrate(model, windows), "bi_lsq").values
    got_lsq = stream_score(sm, cal, "bi_lsq").values
    assert got_lsq.keys() == ref_lsq.keys()
    for uid, v in ref_lsq.items():
        assert got_lsq[uid] == pytest.approx(v, rel=1e-10), uid
    assert stream_score(sm, cal, "bi").values == score(model, calibrate(model, windows), "bi").values


@pytest.mark.parametrize("name", ["llama", "gptj", "qwen2"])
@pytest.mark.parametrize("metric", ["wanda", "obs", "magnitude"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_streaming_width_plan_equals_in_memory(
    name: str, metric: str, allocation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import prunekit_core.planning.width as width_mod

    folder, model = _folders(tmp_path, name)
    windows = torch.randint(3, 100, (5, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(ratio=0.2, metric=metric, granularity="width", width_allocation=allocation, round_to=8)
    with monkeypatch.context() as m:  # streaming cannot cut in place: it runs the cost model's estimate
        m.setattr(width_mod, "plan_width", functools.partial(width_mod.plan_width, estimate=True))
        ref = plan_pruning(model, calibrate(model, windows), **kw)
    sm = open_streaming(folder)
    cal = stream_calibrate(sm, windows, observers=[WidthCurveObserver(get_metric(metric), repair=False)])
    got = plan_pruning(sm.model, cal, adapter=sm.adapter, **kw)
    assert got.remove_groups and got.remove_groups == ref.remove_groups
    assert got.fingerprint == ref.fingerprint and got.removed_params == ref.removed_params
    assert got.scores == ref.scores  # the measured sublayer removals (streaming trials) too
    assert _meta_blocks(sm)
    apply_plan(model, got)  # the fingerprint matches the model loaded later


def test_streaming_refuses_what_needs_the_whole_model(tmp_path: Path) -> None:
    folder, _ = _folders(tmp_path, "mixtral")
    windows = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    sm = open_streaming(folder)
    with pytest.raises(PlanError, match="needs gradients"):
        stream_calibrate(sm, windows, metrics=["taylor"])
    cal = stream_calibrate(sm, windows, observers=[WidthCurveObserver(get_metric("magnitude"), repair=False)])
    # magnitude scores the channels inside the fused experts: costed by in-place trials
    with pytest.raises(PlanError, match="needs the whole model"):
        plan_pruning(sm.model, cal, ratio=0.2, metric="magnitude", granularity="width", adapter=sm.adapter)
    with pytest.raises(PlanError, match="pruned copies of the whole model"):
        plan_pruning(sm.model, cal, ratio=0.2, metric="magnitude", granularity="mixed", adapter=sm.adapter)
    # a channel metric the pass did not compute: a clear error, not a crash on empty weights
    with pytest.raises(PlanError, match=r"stream_calibrate\(\.\.\., metrics=\['wanda'\]\)"):
        plan_pruning(sm.model, cal, ratio=0.2, metric="wanda", granularity="width", adapter=sm.adapter)


# --- CLI ------------------------------------------------------------------------------------------------

FAST = ["--windows", "3", "--seq-len", "16"]


@pytest.mark.parametrize("metrics", [["wanda", "magnitude", "obs"], ["bi_lsq"]])
def test_cli_score_streaming_weight_metrics(
    capsys: pytest.CaptureFixture[str], cli_assets: dict[str, Path], metrics: list[str]
) -> None:
    import json

    args = ["score", cli_assets["model"], "--calib", cli_assets["text"], *FAST, "--json"]
    for m in metrics:
        args += ["--metric", m]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    code, out_s, err = _cli(capsys, *args, "--streaming")
    assert code == 0, err
    ref, got = json.loads(out), json.loads(out_s)
    assert got.keys() == ref.keys() == set(metrics)
    if metrics == ["bi_lsq"]:
        for uid, v in ref["bi_lsq"].items():
            assert got["bi_lsq"][uid] == pytest.approx(v, rel=1e-10)
    else:
        assert got == ref


def test_cli_prune_streaming_width_plan_only_then_apply(
    capsys: pytest.CaptureFixture[str], cli_assets: dict[str, Path], tmp_path: Path
) -> None:
    import json

    common = ["prune", cli_assets["model"], "--ratio", "0.2", "--calib", cli_assets["text"], *FAST]
    common += ["--metric", "wanda", "--granularity", "width", "--repair", "none", "--json"]
    code, out, err = _cli(capsys, *common, "--streaming", "--plan-only", "--out", tmp_path / "s.json")
    assert code == 0, err
    code, out2, err = _cli(capsys, *common, "--plan-only", "--out", tmp_path / "m.json")
    assert code == 0, err
    streamed, in_memory = json.loads(out), json.loads(out2)
    assert (
        streamed["plan"]["remove_groups"]
        and streamed["plan"]["remove_groups"] == in_memory["plan"]["remove_groups"]
    )
    assert streamed["plan"]["fingerprint"] == in_memory["plan"]["fingerprint"]
    code, _, err = _cli(
        capsys, "prune", cli_assets["model"], "--plan", tmp_path / "s.json", "--out", tmp_path / "o", "--json"
    )
    assert code == 0, err


@pytest.mark.parametrize("metric", ["sublayer_drop", "nri"])
def test_streaming_mixed_rank_plan_equals_in_memory(metric: str, tmp_path: Path) -> None:
    folder, model = _folders(tmp_path, "llama")
    windows = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(ratio=0.3, metric=metric, granularity="mixed", planner="rank")
    ref = plan_pruning(model, calibrate(model, windows), **kw)
    sm = open_streaming(folder)
    got = plan_pruning(sm.model, stream_calibrate(sm, windows), adapter=sm.adapter, **kw)
    assert got.remove and got.remove == ref.remove and got.fingerprint == ref.fingerprint
