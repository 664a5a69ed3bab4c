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

from prunekit_core.ir.errors import CheckpointError, PlanError
from prunekit_core.planning.planner import plan_pruning
from prunekit_core.registry.plugins import get_metric, select_adapter
from prunekit_core.scoring.api import calibrate, score
from prunekit_core.scoring.calibration import ScoringContext
from prunekit_core.scoring.calibration import calibrate as core_calibrate
from prunekit_core.scoring.streaming import (
    open_streaming,
    stream_calibrate,
    stream_score,
    stream_score_groups,
)

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


def test_a_skeleton_without_its_streaming_pass_is_refused_by_name(tmp_path: Path) -> None:
    """Scoring or planning the meta-device skeleton with a calibration its streaming pass did not make
    (no trial runner, no weights) is a clear PlanError, not a torch device error deep in a metric."""
    from prunekit_core.scoring.calibration import Calibration

    folder = tmp_path / "m"
    tiny_llama(layers=3).save_pretrained(folder)
    sm = open_streaming(folder)
    plain = Calibration(windows=torch.randint(3, 100, (2, 8)))
    for metric in ("nri", "magnitude"):
        granularity = "width" if metric == "magnitude" else "block"
        with pytest.raises(PlanError, match="streaming pass"):
            plan_pruning(
                sm.model, plain, ratio=0.3, metric=metric, granularity=granularity, adapter=sm.adapter
            )
    with pytest.raises(PlanError, match="streaming pass"):
        ScoringContext(model=sm.model, adapter=sm.adapter, ir=sm.ir, calibration=plain)


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
    # the rank planner too
    plan = plan_pruning(sm.model, scal, ratio=0.3, metric="nri", planner="rank", granularity="sublayer")
    ref_plan = plan_pruning(model, cal, ratio=0.3, metric="nri", planner="rank", granularity="sublayer")
    assert plan.remove == ref_plan.remove


def _record_trials(
    monkeypatch: pytest.MonkeyPatch, cls: type, log: list[tuple[object, ...]], runners: list[object]
) -> None:
    """Log every trial loss, committed-model loss and commit of ``cls``'s runners, in call order; collect
    the runners that committed."""
    loss, commit = cls.loss, cls.commit

    def logged_loss(self: object, remove: tuple[str, ...] = ()) -> float:
        value = loss(self, remove)
        log.append(("loss", tuple(remove), value))
        return value

    def logged_commit(self: object, remove: list[str]) -> None:
        commit(self, remove)
        log.append(("commit", tuple(remove)))
        runners.append(self)

    monkeypatch.setattr(cls, "loss", logged_loss)
    monkeypatch.setattr(cls, "commit", logged_commit)


@pytest.mark.parametrize("name", ["llama", "mixtral", "gptj", "generic-gpt2"])
@pytest.mark.parametrize(
    ("metric", "granularity"), [("nri", "sublayer"), ("sleb", "block"), ("nri", "block")]
)
def test_streaming_greedy_plan_equals_in_memory(
    name: str, metric: str, granularity: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prunekit_core.scoring.calibration import TrialRunner
    from prunekit_core.scoring.streaming import StreamingTrialRunner

    folder = tmp_path / name
    model = MODELS[name]()
    model.save_pretrained(folder, max_shard_size="20KB")
    windows = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    logs: dict[str, list[tuple[object, ...]]] = {"memory": [], "streaming": []}
    runners: list[object] = []
    memory_runners: list[object] = []
    _record_trials(monkeypatch, TrialRunner, logs["memory"], memory_runners)
    _record_trials(monkeypatch, StreamingTrialRunner, logs["streaming"], runners)
    steps: dict[str, list[str]] = {"memory": [], "streaming": []}
    kw = dict(ratio=0.5, metric=metric, planner="greedy", granularity=granularity, shortlist=2)
    ref = plan_pruning(model, calibrate(model, windows), on_step=steps["memory"].append, **kw)
    sm = open_streaming(folder)
    scal = stream_calibrate(sm, windows)
    loads = sm.loaded_blocks
    plan = plan_pruning(sm.model, scal, on_step=steps["streaming"].append, **kw)
    assert len(plan.remove) >= 2  # several greedy steps, each on top of the committed removals
    assert plan.remove == ref.remove and plan.scores == ref.scores and plan.fingerprint == ref.fingerprint
    # every trial loss, bitwise, in the same order: the same operations on the same batch of windows
    assert logs["streaming"] == logs["memory"]
    # and the same loss before -> after each removal in the planner's progress lines
    assert [m.split(";")[0] for m in steps["streaming"]] == [m.split(";")[0] for m in steps["memory"]]
    # block forwards are counted (the note the in-memory planner writes too); every pass loads blocks
    trials = [n for n in plan.notes if "block forwards" in n]
    assert len(trials) == 1 and int(trials[0].split()[-3]) > 0
    assert sm.loaded_blocks > loads
    # passes: ceil(trials / chunk) per greedy step (the committed loss rides along), one for the final loss
    runner = runners[0]
    assert isinstance(runner, StreamingTrialRunner) and runner.chunk == 8
    rounds: list[set[tuple[str, ...]]] = [set()]
    for entry in logs["streaming"]:
        if entry[0] == "commit":
            rounds.append(set())
        elif entry[1]:
            rounds[-1].add(entry[1])  # type: ignore[arg-type]  # a trial's entry: its units as a tuple
    assert not rounds[-1] and len(rounds) == len(plan.remove) + 1
    assert runner.passes == sum(-(-len(r) // 8) for r in rounds[:-1]) + 1
    assert runner.current_loss == memory_runners[0].current_loss  # the pruned model's loss, bitwise
    assert all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())


def test_streaming_greedy_pass_count(tmp_path: Path) -> None:
    """A greedy step over P candidates costs ceil(P / chunk) passes; a commit costs none: the next round
    of trials forks from the committed stream, and its first pass also measures the committed loss."""
    from prunekit_core.scoring.streaming import StreamingTrialRunner

    folder = tmp_path / "m"
    tiny_llama(layers=6).save_pretrained(folder)
    sm = open_streaming(folder)
    windows = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    pool = [s.id for s in sm.ir.sublayers()]  # 12 sublayers
    runner = StreamingTrialRunner(sm, windows, candidates=lambda: pool, chunk=5)
    loads = sm.loaded_blocks
    base = runner.current_loss  # the first round: the base loss rides along with the trials
    first = {u: runner.loss([u]) for u in pool}
    assert runner.passes == 3  # ceil(12 / 5): no pass of its own for the base loss
    # the chunks run in block order, each from the deepest saved stream: blocks 0-5, 2-5, 4-5
    assert sm.loaded_blocks - loads == 6 + 4 + 2
    runner.commit(["text.blocks.3.mlp"])
    assert runner.passes == 3 and runner.base_loss == base  # a commit runs nothing
    pool = [u for u in pool if u != "text.blocks.3.mlp"]
    loads = sm.loaded_blocks
    after = runner.current_loss
    assert after == first["text.blocks.3.mlp"]  # the committed model's loss: that unit's trial loss
    assert runner.passes == 3 + 3  # ceil(11 / 5) passes measured the committed loss and the next round
    # the commit (block 3) dropped the saved stream of block 5: blocks 0-5, then 2-5, then 5
    assert sm.loaded_blocks - loads == 6 + 4 + 1
    trial = runner.loss(["text.blocks.1.attn"])
    assert runner.passes == 6 and trial != first["text.blocks.1.attn"]  # on top of the commit
    with pytest.raises(PlanError, match="one unit at a time"):
        runner.loss(["text.blocks.0.mlp", "text.blocks.1.mlp"])
    with pytest.raises(PlanError, match="not in tower"):
        runner.commit(["text.blocks.9"])
    assert runner.loss(["text.blocks.3.mlp"]) == after  # a committed unit: nothing more to remove
    # the planner's last commit: its pool (holding the committed unit) is a finished round, so the final
    # loss costs one pass (from block 0: the saved input of block 5 lay after the commit), and no trials
    runner.commit(["text.blocks.4.attn"])
    passes, loads = runner.passes, sm.loaded_blocks
    assert runner.current_loss < 100 and runner.passes == passes + 1 and sm.loaded_blocks - loads == 6


def test_unloaded_block_weights_are_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    import gc
    import weakref

    folder = tmp_path / "m"
    MODELS["mixtral"]().save_pretrained(folder, max_shard_size="20KB")
    sm = open_streaming(folder)
    stream_calibrate(sm, torch.randint(3, 100, (2, 8)))
    path = sm.tower.blocks[1].module
    gc.disable()
    try:
        refs = [weakref.ref(p) for p in sm.load_block(path).parameters()]
        assert refs and all(r() is not None for r in refs)
        sm.unload_block(path)
        assert [r() for r in refs] == [None] * len(refs)  # freed by reference counting alone
    finally:
        gc.enable()


def test_streaming_trials_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    from prunekit_core.scoring.streaming import StreamingTrialRunner

    folder = tmp_path / "m"
    tiny_llama(layers=5).save_pretrained(folder)
    sm = open_streaming(folder)
    runner = StreamingTrialRunner(sm, torch.randint(3, 100, (2, 8)), chunk=3)
    units = [s.id for s in sm.ir.sublayers()]
    for u in units:
        runner.loss([u])
    assert runner.passes == -(-len(units) // 3)  # chunks of 3 trials, the first also measures the base loss
    assert all(p.is_meta for b in sm.ir.blocks() for p in sm.model.get_submodule(b.module).parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_streaming_from_a_gguf_source_equals_its_in_memory_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tied: bool
) -> None:
    """A GGUF source streams from its dequantized safetensors cache (converted once, shared with
    ``load_model``): same scores, trial losses and greedy plan as the in-memory load of the same file."""
    import json

    from helpers import words, write_tiny_gguf

    from prunekit_core.io.loading import load_model
    from prunekit_core.scoring.streaming import streaming_folder, streaming_tokenizer

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.F32.gguf", tied=tied)
    folder = streaming_folder(str(gguf))  # converts into the cache
    assert folder.parent == tmp_path / "cache" and (folder / "config.json").is_file()
    model, tok, src = load_model(str(gguf))  # reads the same cache: no second conversion
    assert src.is_gguf and list((tmp_path / "cache").iterdir()) == [folder]
    assert (
        model.config.tie_word_embeddings == tied == (model.lm_head.weight is model.model.embed_tokens.weight)
    )
    assert streaming_folder(str(gguf)) == folder
    assert streaming_tokenizer(folder).get_vocab() == tok.get_vocab()
    windows = torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, windows, batch_size=3)
    sm = open_streaming(folder)
    scal = stream_calibrate(sm, windows, batch_size=3)
    for metric in ("bi", "angular", "sublayer_drop", "nri", "sleb"):
        assert stream_score(sm, scal, metric).values == score(model, cal, metric).values, metric
    kw = dict(ratio=0.4, metric="nri", planner="greedy", granularity="sublayer")
    plan, ref = plan_pruning(sm.model, scal, **kw), plan_pruning(model, cal, **kw)
    assert plan.remove == ref.remove and plan.fingerprint == ref.fingerprint
    # the CLI: prunekit score FILE.gguf --streaming prints what the in-memory run prints
    text = tmp_path / "text.txt"
    text.write_text(words(2000, seed=3) + "\n")
    args = ["score", gguf, "--calib", text, *FAST, "--json", "--metric", "bi", "--metric", "sleb"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    code, out_s, err = _cli(capsys, *args, "--streaming")
    assert code == 0, err
    assert json.loads(out_s) == json.loads(out)


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
    from prunekit_core.ir.plan import fingerprint
    from prunekit_core.surgery.apply import apply_plan

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


@pytest.mark.parametrize("metric", ["nri", "sleb"])
def test_cli_prune_streaming_greedy_equals_in_memory(
    capsys: pytest.CaptureFixture[str], cli_assets: dict[str, Path], tmp_path: Path, metric: str
) -> None:
    import json

    common = ["prune", cli_assets["model"], "--ratio", "0.4", "--calib", cli_assets["text"], *FAST]
    common += ["--metric", metric, "--planner", "greedy", "--plan-only", "--json"]
    if metric == "nri":
        common += ["--granularity", "sublayer"]
    code, out, err = _cli(capsys, *common, "--out", tmp_path / "m.json")
    assert code == 0, err
    code, out_s, err = _cli(capsys, *common, "--streaming", "--out", tmp_path / "s.json", "-v")
    assert code == 0, err
    streamed, in_memory = json.loads(out_s), json.loads(out)
    assert streamed["plan"]["method"] == f"greedy:{metric}"
    assert streamed["removed"] == in_memory["removed"] and len(streamed["removed"]) >= 2
    assert streamed["plan"]["scores"] == in_memory["plan"]["scores"]
    assert "removed text.blocks." in err and "more block loads from disk" in err  # progress lines


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--streaming needs a metric it can compute"),
        (["--metric", "taylor"], "needs gradients"),
        (["--metric", "nri", "--granularity", "mixed"], "at block or sublayer granularity"),
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
