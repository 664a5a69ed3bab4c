"""Expert metrics and the expert planner in streaming mode (one block in memory at a time).

The routing statistics are collected by the same hooks while each MoE block is loaded, so streaming
scores equal the in-memory ones bitwise, and so do the expert plans (fingerprint included).
"""

from __future__ import annotations

import json

import pytest
import torch
from moe_tiny import save_tiny_mixtral, tiny_mixtral, tiny_qwen2_moe
from transformers import AutoModelForCausalLM

from prunekit_core.cli import main
from prunekit_core.planning.planner import plan_pruning
from prunekit_core.scoring.api import score_groups
from prunekit_core.scoring.calibration import Calibration
from prunekit_core.scoring.streaming import open_streaming, stream_calibrate, stream_score_groups
from prunekit_core.surgery.apply import apply_plan

METRICS = ("expert_frequency", "expert_mass", "moe_pruner", "expert_reconstruction", "expert_random")
MAKERS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}


def windows(n=10, length=16, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MAKERS))
def test_streaming_expert_scores_and_plans_equal_in_memory(name, tmp_path) -> None:
    folder = tmp_path / name
    MAKERS[name]().save_pretrained(folder, max_shard_size="30KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = windows()
    metrics = [*METRICS, "magnitude"]
    ref = score_groups(model, Calibration(ids), metrics)
    sm = open_streaming(folder)
    cal = stream_calibrate(sm, ids, metrics=metrics)
    assert all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())
    for metric in metrics:
        got = stream_score_groups(cal, metric)
        assert got and got.keys() == ref[metric].keys(), metric
        for fid, t in ref[metric].items():
            assert torch.equal(got[fid], t), (metric, fid)
    for metric in metrics:
        for allocation in ("uniform", "global"):
            kw = dict(ratio=0.25, metric=metric, granularity="expert", expert_allocation=allocation)
            want = plan_pruning(model, Calibration(ids), **kw)
            plan = plan_pruning(sm.model, cal, adapter=sm.adapter, **kw)
            assert plan.remove_groups and plan.model_dump(exclude={"notes"}) == want.model_dump(
                exclude={"notes"}
            )
    apply_plan(model, plan)  # the streaming fingerprint matches the loaded model


def test_cli_streaming_expert_score_and_plan(tmp_path, capsys) -> None:
    folder = save_tiny_mixtral(tmp_path / "mixtral")
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(1)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (3000,), generator=gen)) + "\n")
    fast = ["--calib", text, "--windows", "3", "--seq-len", "16", "--json"]
    score = ["score", folder, *fast, "--metric", "moe_pruner", "--metric", "expert_frequency"]
    assert main([str(a) for a in score]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main([str(a) for a in [*score, "--streaming"]]) == 0
    assert json.loads(capsys.readouterr().out) == ref
    prune = ["prune", folder, "--ratio", "0.25", *fast, "--granularity", "expert", "--metric", "moe_pruner"]
    assert main([str(a) for a in [*prune, "--plan-only", "--out", tmp_path / "m.json"]]) == 0
    want = json.loads(capsys.readouterr().out)
    argv = [*prune, "--streaming", "--plan-only", "--out", tmp_path / "s.json"]
    assert main([str(a) for a in argv]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["plan"]["remove_groups"] == want["plan"]["remove_groups"]
    assert got["plan"]["fingerprint"] == want["plan"]["fingerprint"]
    assert (
        main([str(a) for a in ["prune", folder, "--plan", tmp_path / "s.json", "--out", tmp_path / "o"]]) == 0
    )
