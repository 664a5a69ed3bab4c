"""Streaming calibration (one block in memory at a time) and cached removal trials.

Streaming scores must equal the in-memory pass exactly, on a model of every plugin (Llama family,
Mixtral, the GPT-J example plugin) and of the generic adapter, from sharded safetensors folders. Cached
removal trials must equal the naive method (a full model evaluation per trial) and cost fewer block
forwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T
from helpers import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit_core.api import calibrate, score
from prunekit_core.errors import CheckpointError, PlanError
from prunekit_core.planning import plan_pruning
from prunekit_core.plugins import get_metric, select_adapter
from prunekit_core.scoring import ScoringContext
from prunekit_core.scoring import calibrate as core_calibrate
from prunekit_core.streaming import open_streaming, stream_calibrate, stream_score, stream_score_groups

SMALL = dict(vocab_size=128, max_position_embeddings=64)


def _seeded(model_cls: type, config: object) -> nn.Module:
    torch.manual_seed(0)
    return model_cls(config).eval()


MODELS = {
    "llama": lambda: tiny_llama(layers=3),
    "mixtral": lambda: _seeded(
        T.MixtralForCausalLM,
        T.MixtralConfig(
            **SMALL,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "gptj": lambda: _seeded(
        T.GPTJForCausalLM, T.GPTJConfig(**SMALL, n_embd=64, n_layer=3, n_head=4, rotary_dim=8)
    ),
    "generic-gpt2": lambda: _seeded(
        T.GPT2LMHeadModel,
        T.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2),
    ),
    "generic-neox": lambda: _seeded(
        T.GPTNeoXForCausalLM,
        T.GPTNeoXConfig(
            **SMALL, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128
        ),
    ),
}
ADAPTER = {
    "llama": "llama",
    "mixtral": "mixtral",
    "gptj": "gptj",
    "generic-gpt2": "generic",
    "generic-neox": "generic",
}


@pytest.mark.parametrize("name", list(MODELS))
def test_streaming_scores_equal_in_memory(name: str, tmp_path: Path) -> None:
    folder = tmp_path / name
    MODELS[name]().save_pretrained(folder, max_shard_size="20KB")  # many shards: blocks span files
    assert (folder / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = torch.randint(3, 100, (5, 12), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, windows, batch_size=2)  # 3 batches, the last one short
    sm = open_streaming(folder)
    assert sm.ir.adapter == ADAPTER[name]
    assert all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())
    scal = stream_calibrate(sm, windows, batch_size=2)
    for metric in ("bi", "angular", "sublayer_drop"):
        assert stream_score(sm, scal, metric).values == score(model, cal, metric).values, metric
    assert torch.equal(scal.towers["text"].boundary_last, cal.towers["text"].boundary_last)
    assert sm.loaded_blocks == len(sm.ir.blocks()) + 1  # every block once, the first one also probed
    # every block is empty again afterwards: one block in memory at a time
    assert all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())


def test_streaming_refuses_metrics_it_cannot_compute(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    tiny_llama(layers=2).save_pretrained(folder)
    sm = open_streaming(folder)
    cal = stream_calibrate(sm, torch.randint(3, 100, (2, 8)))
    with pytest.raises(PlanError, match="needs gradients"):
        stream_score(sm, cal, "taylor")
    with pytest.raises(PlanError, match="needs gradients"):
        stream_calibrate(sm, torch.randint(3, 100, (2, 8)), metrics=["taylor"])
    # metrics computed block by block must be named before the pass
    for metric in ("magnitude", "wanda", "obs"):
        with pytest.raises(PlanError, match=r"pass it to stream_calibrate\(\.\.\., metrics="):
            stream_score_groups(cal, metric)


def test_streaming_needs_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    tiny_llama(layers=2).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        open_streaming(folder)
    with pytest.raises(CheckpointError, match="no config.json"):
        open_streaming(tmp_path / "nothing")


def test_streaming_refuses_missing_block_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    tiny_llama(layers=2).save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".layers.1.mlp" not in k}, folder / "model.safetensors")
    sm = open_streaming(folder)
    with pytest.raises(CheckpointError, match="no weights for block model.layers.1"):
        stream_calibrate(sm, torch.randint(3, 100, (2, 8)))


@pytest.mark.parametrize("name", ["llama", "mixtral", "gptj", "generic-neox"])
def test_streaming_trials_equal_in_memory(name: str, tmp_path: Path) -> None:
    folder = tmp_path / name
    MODELS[name]().save_pretrained(folder, max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, windows)
    sm = open_streaming(folder)
    scal = stream_calibrate(sm, windows)
    for metric in ("nri", "sleb"):
        ref = score(model, cal, metric)
        got = stream_score(sm, scal, metric)
        assert got.values.keys() == ref.values.keys()
        for uid, v in ref.values.items():
            assert got.values[uid] == pytest.approx(v, rel=1e-6, abs=1e-12), (metric, uid)
    # the planner too (rank), and the greedy planner is refused with a clear error
    plan = plan_pruning(sm.model, scal, ratio=0.3, metric="nri", planner="rank", granularity="sublayer")
    ref_plan = plan_pruning(model, cal, ratio=0.3, metric="nri", planner="rank", granularity="sublayer")
    assert plan.remove == ref_plan.remove
    with pytest.raises(PlanError, match="rank planner"):
        plan_pruning(sm.model, scal, ratio=0.3, metric="nri", planner="greedy", granularity="sublayer")


def test_streaming_trials_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    from prunekit_core.streaming import StreamingTrialRunner

    folder = tmp_path / "m"
    tiny_llama(layers=5).save_pretrained(folder)
    sm = open_streaming(folder)
    runner = StreamingTrialRunner(sm, torch.randint(3, 100, (2, 8)), chunk=3)
    units = [s.id for s in sm.ir.sublayers()]
    for u in units:
        runner.loss([u])
    assert runner.passes == 1 + -(-len(units) // 3)  # the base pass, then chunks of 3 trials
    assert all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())


# --- cached removal trials ---------------------------------------------------------------------------


def _context(model: nn.Module, windows: torch.Tensor, *, naive: bool) -> ScoringContext:
    adapter = select_adapter(model)
    ir = adapter.build_ir(model)
    cal = core_calibrate(model, ir, windows)
    return ScoringContext(model=model, adapter=adapter, ir=ir, calibration=cal, naive_trials=naive)


@pytest.mark.parametrize("name", ["llama", "mixtral", "gptj"])
@pytest.mark.parametrize("metric", ["nri", "sleb"])
def test_cached_trials_equal_naive_and_cost_less(name: str, metric: str) -> None:
    model = MODELS[name]()
    windows = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    cached = get_metric(metric).score(_context(model, windows, naive=False))
    naive = get_metric(metric).score(_context(model, windows, naive=True))
    assert cached.values.keys() == naive.values.keys()
    for uid, v in naive.values.items():
        assert cached.values[uid] == pytest.approx(v, rel=1e-5, abs=1e-9), uid
    n = len(select_adapter(model).build_ir(model).blocks())
    units = len(cached.values)
    # naive: one evaluation for the base loss, then every kept block per trial
    per_trial = n - 1 if metric == "sleb" else n
    assert naive.block_forwards == n + units * per_trial
    # cached: the capture pass, then only the blocks from the first affected one
    assert cached.block_forwards < naive.block_forwards


def test_cached_trial_counts_are_exact() -> None:
    model = tiny_llama(layers=6)
    windows = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    nri = get_metric("nri").score(_context(model, windows, naive=False))
    sleb = get_metric("sleb").score(_context(model, windows, naive=False))
    n = 6
    assert nri.block_forwards == n + sum(2 * (n - i) for i in range(n))  # capture + replays from block i
    assert sleb.block_forwards == n + sum(n - 1 - i for i in range(n))


def test_greedy_plan_equals_naive_with_fewer_block_forwards() -> None:
    model = tiny_llama(layers=6)
    windows = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(2))
    adapter = select_adapter(model)
    cal = core_calibrate(model, adapter.build_ir(model), windows)
    plans = {
        naive: plan_pruning(
            model, cal, ratio=0.3, metric="nri", planner="greedy", granularity="sublayer", naive_trials=naive
        )
        for naive in (False, True)
    }
    assert plans[False].remove == plans[True].remove
    forwards = {
        k: int(next(n for n in p.notes if "block forwards" in n).split()[-3]) for k, p in plans.items()
    }
    assert forwards[False] < forwards[True]


def test_streaming_plan_applies_to_the_loaded_model(tmp_path: Path) -> None:
    from prunekit_core.plan import fingerprint
    from prunekit_core.surgery import apply_plan

    folder = tmp_path / "m"
    MODELS["mixtral"]().save_pretrained(folder, max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    sm = open_streaming(folder)
    scal = stream_calibrate(sm, windows)
    plan = plan_pruning(sm.model, scal, ratio=0.3, metric="bi", granularity="block", planner="rank")
    ref = plan_pruning(
        model, calibrate(model, windows), ratio=0.3, metric="bi", granularity="block", planner="rank"
    )
    assert plan.fingerprint == ref.fingerprint == fingerprint(model, select_adapter(model).build_ir(model))
    assert plan.remove == ref.remove
    apply_plan(model, plan)  # the fingerprint check passes


# --- CLI ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import save_tiny_model, words

    root = tmp_path_factory.mktemp("stream-cli")
    text = root / "text.txt"
    text.write_text(words(3000, seed=1) + "\n")
    return {"model": save_tiny_model(root / "tiny", layers=3), "text": text}


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    from prunekit_core.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAST = ["--windows", "3", "--seq-len", "16"]


def test_cli_score_streaming_equals_in_memory(
    capsys: pytest.CaptureFixture[str], cli_assets: dict[str, Path]
) -> None:
    import json

    args = ["score", cli_assets["model"], "--calib", cli_assets["text"], *FAST, "--json"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    code, out_s, err = _cli(capsys, *args, "--streaming")
    assert code == 0, err
    assert json.loads(out_s) == json.loads(out)


def test_cli_score_streaming_refuses_gradient_and_trial_metrics(
    capsys: pytest.CaptureFixture[str], cli_assets: dict[str, Path]
) -> None:
    base = ["score", cli_assets["model"], "--calib", cli_assets["text"], *FAST, "--streaming"]
    code, _, err = _cli(capsys, *base, "--metric", "taylor")
    assert code == 2 and "needs gradients" in err and "drop --streaming" in err
    assert "wanda" in err and "bi_lsq" in err  # the error lists what streaming computes


def test_cli_prune_streaming_plan_only_then_apply(
    capsys: pytest.CaptureFixture[str], cli_assets: dict[str, Path], tmp_path: Path
) -> None:
    import json

    common = ["prune", cli_assets["model"], "--ratio", "0.3", "--calib", cli_assets["text"], *FAST]
    common += ["--metric", "bi", "--json"]
    code, out, err = _cli(capsys, *common, "--streaming", "--plan-only", "--out", tmp_path / "s.json")
    assert code == 0, err
    code, out2, err = _cli(capsys, *common, "--plan-only", "--out", tmp_path / "m.json")
    assert code == 0, err
    streamed, in_memory = json.loads(out), json.loads(out2)
    assert streamed["removed"] == in_memory["removed"]
    assert streamed["plan"]["fingerprint"] == in_memory["plan"]["fingerprint"]
    code, out, err = _cli(capsys, *common, "--streaming", "--out", tmp_path / "o")
    assert code == 0, err
    assert json.loads(out)["removed"] == in_memory["removed"] and (tmp_path / "o" / "config.json").is_file()
    code, out, err = _cli(
        capsys,
        "prune",
        cli_assets["model"],
        "--plan",
        tmp_path / "s.json",
        "--out",
        tmp_path / "o2",
        "--json",
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--streaming needs a metric it can compute"),
        (["--metric", "taylor"], "needs gradients"),
        (["--metric", "nri"], "rank planner"),
        (["--metric", "bi", "--repair", "lsq"], "without repair"),
        (["--metric", "taylor", "--granularity", "width"], "needs gradients"),
        (
            ["--metric", "wanda", "--granularity", "mixed", "--repair", "none"],
            "pruned copies of the whole model",
        ),
        (["--metric", "wanda", "--granularity", "width", "--repair", "lsq"], "without repair"),
    ],
)
def test_cli_prune_streaming_bad_inputs(
    capsys: pytest.CaptureFixture[str],
    cli_assets: dict[str, Path],
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    args = [
        "prune",
        cli_assets["model"],
        "--ratio",
        "0.3",
        "--calib",
        cli_assets["text"],
        *FAST,
        "--streaming",
    ]
    code, _, err = _cli(capsys, *args, *extra, "--out", tmp_path / "o")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
