"""The ``prunekit`` CLI, run in-process against a tiny random Llama saved to a temporary folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, words
from transformers import AutoModelForCausalLM

from prunekit_core import Scores, load_pruned, read_plan
from prunekit_core.cli import main, subcommand_parsers
from prunekit_core.ir.defaults import DEFAULT_CANDIDATES
from prunekit_core.study.demo import run_demo
from prunekit_core.study.plots import plot_scores

FAST = ["--windows", "2", "--seq-len", "16"]
HAS_TEXTS = importlib.util.find_spec("exllamav2") is not None


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-assets")
    text = root / "text.txt"
    text.write_text(words(3000, seed=1) + "\n")
    return {
        "model": save_tiny_model(root / "tiny"),
        "other": save_tiny_model(root / "tiny3", layers=3, seed=1),
        "text": text,
    }


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # the whole of stdout is one JSON object


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.arange(3, 19).unsqueeze(0), use_cache=False).logits


# --- help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *subcommand_parsers()])
def test_help_exits_zero_and_has_examples(capsys: pytest.CaptureFixture[str], command: str | None) -> None:
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "usage: prunekit" in out and "examples:" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert code == 2 and out == "" and "usage:" in err


# --- plugins, inspect, score -----------------------------------------------------------------------------


def test_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "plugins")
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["llama"]["adapters"] == ["llama"] and by_name["llama"]["builtin"] is False
    assert by_name["llama"]["version"]
    builtin = [p for p in data["plugins"] if p["builtin"]]
    assert {"bi", "angular", "sublayer_drop", "nri"} <= {m for p in builtin for m in p["metrics"]}
    assert set(by_name["llama"]) >= {"name", "version", "builtin", "adapters", "metrics", "quant_formats"}
    assert data["failures"] == []


def test_plugins_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins")
    assert code == 0 and "llama" in out and "sublayer_drop" in out


def test_inspect_json(capsys: pytest.CaptureFixture[str], assets: dict[str, Path]) -> None:
    data = run_json(capsys, "inspect", assets["model"])
    assert data["architecture"] == "LlamaForCausalLM" and data["adapter"] == "llama"
    (tower,) = data["towers"]
    assert [b["id"] for b in tower["blocks"]] == ["text.blocks.0", "text.blocks.1"]
    assert [s["kind"] for s in tower["blocks"][0]["sublayers"]] == ["attention", "mlp"]
    assert data["block_params"] == sum(b["params"] for b in tower["blocks"])
    assert set(data["fingerprint"]) == {"architecture", "structure", "weights"}


def test_inspect_table(capsys: pytest.CaptureFixture[str], assets: dict[str, Path]) -> None:
    code, out, _ = run(capsys, "inspect", assets["model"])
    assert code == 0
    assert "LlamaForCausalLM" in out and "text.blocks.1.mlp" in out and "block params" in out


def test_score_json_default_metrics(capsys: pytest.CaptureFixture[str], assets: dict[str, Path]) -> None:
    data = run_json(capsys, "score", assets["model"], "--calib", assets["text"], *FAST)
    assert set(data) == {"bi", "sublayer_drop", "angular"}
    assert set(data["bi"]) == {"text.blocks.0", "text.blocks.1"}
    assert set(data["sublayer_drop"]) == {f"text.blocks.{i}.{k}" for i in range(2) for k in ("attn", "mlp")}
    assert set(data["angular"]) == {"text.blocks.0", "text.blocks.1"}  # span 1


def test_score_chosen_metrics_and_span(capsys: pytest.CaptureFixture[str], assets: dict[str, Path]) -> None:
    data = run_json(
        capsys,
        "score",
        assets["model"],
        "--calib",
        assets["text"],
        *FAST,
        "--metric",
        "angular",
        "--span",
        "2",
    )
    assert data == {"angular": {"text.blocks.0": pytest.approx(data["angular"]["text.blocks.0"])}}
    code, out, _ = run(capsys, "score", assets["model"], "--calib", assets["text"], *FAST, "--metric", "nri")
    assert code == 0 and "text.blocks.0.attn" in out and "nri" in out


# --- prune ---------------------------------------------------------------------------------------------


def test_prune_block_rank_bi_reloads_with_plain_transformers(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    args = ["prune", assets["model"], "--ratio", "0.3", "--calib", assets["text"], "--out", out]
    data = run_json(capsys, *args, "--granularity", "block", "--metric", "bi", *FAST)
    assert data["plan"]["method"] == "rank:bi" and data["uniform"] is True
    assert len(data["removed"]) == 1 and data["removed"][0].startswith("text.blocks.")
    assert data["budget"]["excludes"] == "embeddings and head"
    assert data["achieved_ratio"] >= 0.3 and data["params_after"] < data["params_before"]
    assert (out / "plan.json").is_file() and (out / "prunekit.json").is_file()

    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert plain.config.num_hidden_layers == 1
    ours = load_pruned(out)
    torch.testing.assert_close(logits(plain.eval()), logits(ours))


def test_prune_mixed_greedy_nri(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    data = run_json(
        capsys,
        "prune",
        assets["model"],
        "--ratio",
        "0.2",
        "--calib",
        assets["text"],
        "--out",
        out,
        *FAST,
        "--granularity",
        "mixed",
        "--metric",
        "nri",
        "--planner",
        "greedy",
        "--eval",
        assets["text"],
        "--eval-tokens",
        "64",
        "--eval-seq-len",
        "16",
    )
    assert data["plan"]["method"] == "greedy:nri" and data["plan"]["granularity"] == "mixed"
    assert data["perplexity_before"]["tokens"] == 4 * 15 and data["perplexity_before"]["seq_len"] == 16
    assert data["perplexity_after"]["perplexity"] > 0
    load_pruned(out)  # verified and loadable
    assert read_plan(out).remove == data["removed"]


def test_prune_defaults_and_human_output(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    code, out, err = run(
        capsys,
        "prune",
        assets["model"],
        "--ratio",
        "0.2",
        "--calib",
        assets["text"],
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert code == 0, err
    n = 2 * 9280  # two blocks of the tiny model
    assert f"budget: at least 0.2 of the {n:,} block parameters (embeddings and head excluded)" in out
    assert "achieved:" in out and "saved to" in out
    saved = json.loads((tmp_path / "o" / "plan.json").read_text())
    if saved["repair"] == "lsq":  # the chosen candidate repairs: what the repair did with each run, and why
        assert "repair: text.blocks." in out, out
    # the default method: every candidate, with its held-out loss, and the one chosen is the plan
    assert [(c["method"], c["granularity"], c["repair"]) for c in saved["candidates"]] == [
        (f"rank:{c.metric}", c.granularity, c.repair) for c in DEFAULT_CANDIDATES
    ]
    (chosen,) = [c for c in saved["candidates"] if c["chosen"]]
    assert (saved["method"], saved["repair"], saved["remove"]) == (
        chosen["method"],
        chosen["repair"],
        chosen["remove"],
    )
    assert "default method: candidate plans" in out and "chosen: " in out
    assert saved["selection"]["heldout_windows"] >= 1


def test_metric_without_planner_picks_rank(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    data = run_json(
        capsys, "prune", assets["model"], "--ratio", "0.2", "--calib", assets["text"], "--out", tmp_path / "o",
        "--metric", "sublayer_drop", *FAST,
    )  # fmt: skip
    assert data["plan"]["method"] == "rank:sublayer_drop" and data["plan"]["granularity"] == "sublayer"


def test_plan_only_then_apply_plan(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    plan_file = tmp_path / "plan.json"
    common = ["prune", assets["model"], "--ratio", "0.3", "--calib", assets["text"], *FAST]
    data = run_json(capsys, *common, "--metric", "bi", "--plan-only", "--out", plan_file)
    assert data["written"] == "plan" and plan_file.is_file() and "params_after" not in data
    assert files_under(tmp_path) == {"plan.json"}
    apply = ["prune", assets["model"], "--plan", plan_file, "--out", tmp_path / "o"]
    if data["plan"]["repair"] != "none":  # the repair is fitted when the plan is applied: it needs --calib
        code, _, err = run(capsys, *apply)
        assert code == 2 and "--calib" in err and not (tmp_path / "o").exists()
        apply += ["--calib", assets["text"], *FAST]
    applied = run_json(capsys, *apply)
    assert applied["removed"] == data["removed"] and (tmp_path / "o" / "config.json").is_file()


def test_force_replaces_a_previous_output(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    """--force replaces the old checkpoint as a whole: none of its files stay, the folder holds exactly
    what a fresh prune writes (the new model's weights and plan), and no temporary is left beside it."""
    from safetensors.torch import load_file

    from prunekit_core.io.atomic import is_temporary

    def prune(model: Path, out: Path, *extra: str) -> dict:
        args = ["prune", model, "--ratio", "0.3", "--calib", assets["text"], "--metric", "bi", *FAST]
        return run_json(capsys, *args, "--out", out, *extra)

    out = tmp_path / "o"
    prune(assets["other"], out)  # the 3-layer model first
    (out / "notes-from-the-old-run.txt").write_text("old")
    old_plan = json.loads((out / "plan.json").read_text())
    data = prune(assets["model"], out, "--force")  # then the 2-layer model, over it
    assert data["written"] == "checkpoint"
    fresh = tmp_path / "fresh"
    prune(assets["model"], fresh)

    assert files_under(out) == files_under(fresh), "the replaced folder holds other files than a fresh prune"
    assert not (out / "notes-from-the-old-run.txt").exists()
    new_plan = json.loads((out / "plan.json").read_text())
    assert new_plan == json.loads((fresh / "plan.json").read_text())
    assert new_plan["fingerprint"] != old_plan["fingerprint"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1  # 2 layers, 1 removed
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in fresh.glob("*.safetensors"))
    for name in weights:
        got, want = load_file(out / name), load_file(fresh / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert torch.equal(logits(load_pruned(out)), logits(load_pruned(fresh)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "o"]
    assert not any(is_temporary(p) for p in tmp_path.rglob("*"))


# --- eval ----------------------------------------------------------------------------------------------


def test_eval_json(capsys: pytest.CaptureFixture[str], assets: dict[str, Path]) -> None:
    data = run_json(
        capsys, "eval", assets["model"], "--text", assets["text"], "--seq-len", "32", "--max-tokens", "100"
    )
    assert data["windows"] == 3 and data["seq_len"] == 32 and data["tokens"] == 3 * 31
    assert data["perplexity"] > 1 and data["nll"] == pytest.approx(
        torch.tensor(data["perplexity"]).log().item()
    )
    assert (
        data["params"]["total"]
        == data["params"]["embeddings"] + data["params"]["head"] + data["params"]["body"]
    )
    assert data["size_on_disk_bytes"] > 0 and data["text"] == str(assets["text"])


def test_eval_human_prints_seq_len_and_tokens(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys, "eval", assets["model"], "--text", assets["text"], "--seq-len", "16", "--windows", "2"
    )
    assert code == 0 and "seq_len 16" in out and "30 predicted tokens" in out and "perplexity:" in out


# --- bad inputs: exit 2, a clear message, nothing written ---------------------------------------------


def prune_args(assets: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return [
        "prune",
        assets["model"],
        "--ratio",
        "0.2",
        "--calib",
        assets["text"],
        "--out",
        out,
        *FAST,
        *extra,
    ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_model", "not found"),
        ("ratio_0", "strictly between 0 and 1"),
        ("ratio_1", "strictly between 0 and 1"),
        ("ratio_1.5", "strictly between 0 and 1"),
        ("every_block", "every block"),
        ("empty_text", "empty"),
        ("short_text", "only 5 tokens"),
        ("missing_text", "not found"),
        ("missing_eval_text", "not found"),
        ("unknown_metric", "unknown metric"),
        ("greedy_bi", "trial metric"),
        ("bi_mixed", "--granularity block"),
        ("missing_plan", "does not exist"),
        ("no_calib", "--calib"),
    ],
)
def test_bad_prune_inputs(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path, case: str, message: str
) -> None:
    out = tmp_path / "out"
    args = prune_args(assets, out)
    if case == "unknown_model":
        args[1] = "no-such-model"
    elif case.startswith("ratio_"):
        args[3] = case.split("_")[1]
    elif case == "every_block":
        args = prune_args(assets, out, "--granularity", "block", "--metric", "bi")
        args[3] = "0.99"
    elif case in ("empty_text", "short_text"):
        (tmp_path / "t.txt").write_text("" if case == "empty_text" else words(5))
        args[5] = tmp_path / "t.txt"
    elif case == "missing_text":
        args[5] = tmp_path / "nope.txt"
    elif case == "missing_eval_text":
        args += ["--eval", tmp_path / "nope.txt"]
    elif case == "unknown_metric":
        args += ["--metric", "bii"]
    elif case == "greedy_bi":
        args += ["--metric", "bi", "--planner", "greedy", "--granularity", "block"]
    elif case == "bi_mixed":
        args += ["--metric", "bi", "--granularity", "mixed"]
    elif case == "missing_plan":
        args += ["--plan", tmp_path / "plan.json"]
        del args[2:6]  # no --ratio, no --calib
    elif case == "no_calib":
        del args[4:6]
    before = files_under(tmp_path)
    code, stdout, err = run(capsys, *args)
    assert code == 2
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert files_under(tmp_path) == before and not out.exists()


def test_plan_for_another_model_is_refused(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    plan_file = tmp_path / "plan.json"
    common = ["--ratio", "0.3", "--calib", assets["text"], "--metric", "bi", *FAST]
    run_json(capsys, "prune", assets["model"], *common, "--plan-only", "--out", plan_file)
    code, _, err = run(
        capsys,
        "prune",
        assets["other"],
        "--plan",
        plan_file,
        "--calib",
        assets["text"],
        "--out",
        tmp_path / "o",
    )
    assert code == 2 and "another model" in err and "Traceback" not in err
    assert files_under(tmp_path) == {"plan.json"}


def test_existing_out_without_force(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, *prune_args(assets, out))
    assert code == 2 and "already exists" in err and "--force" in err
    assert files_under(tmp_path) == {"out", "out/mine.txt"}
    code, _, err = run(capsys, *prune_args(assets, out, "--force"))  # not a prunekit folder: still refused
    assert code == 2 and "not a prunekit checkpoint" in err
    assert (out / "mine.txt").read_text() == "keep me"


def test_existing_plan_file_without_force(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("{}")
    code, _, err = run(capsys, *prune_args(assets, plan_file, "--plan-only"))
    assert code == 2 and "already exists" in err and plan_file.read_text() == "{}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "no-such-model", "--text", "TEXT"], "not found"),
        (["eval", "MODEL", "--text", "no-such-text.txt"], "not found"),
        (["eval", "MODEL", "--text", "TEXT", "--seq-len", "5000"], "tokens"),
        (["inspect", "no-such-model"], "not found"),
        (["score", "MODEL", "--calib", "TEXT", "--metric", "nope"], "unknown metric"),
        (["demo", "--ratio", "1.5"], "strictly between 0 and 1"),
    ],
)
def test_bad_inputs_other_commands(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], argv: list[str], message: str
) -> None:
    argv = [str(assets["model"]) if a == "MODEL" else str(assets["text"]) if a == "TEXT" else a for a in argv]
    code, stdout, err = run(capsys, *argv, "--json")
    assert code == 2 and stdout == ""
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["prune", "m", "--ratio", "x", "--out", "o"], ["nope"]])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == "" and "usage:" in err


def test_eval_with_nothing_to_evaluate_names_both_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(capsys, "eval", "m")
    assert code == 2 and stdout == "" and "--text TEXT" in err and "--tasks" in err


def test_demo_refuses_a_foreign_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "demo", "--out", tmp_path)
    assert code == 2 and "refusing" in err and files_under(tmp_path) == {"notes.txt"}


# --- demo (its flow on the tiny model; the real run is scripts/demo.sh) ---------------------------------


@pytest.mark.skipif(
    not HAS_TEXTS,
    reason="c4 and wiki texts absent: install exllamav2==0.3.2 with pip --no-deps (scripts/setup.sh does)",
)
def test_demo_flow_on_a_tiny_model(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "demo"
    kwargs = dict(
        model_spec=str(assets["model"]), eval_windows=2, eval_seq_len=32, calib_windows=2, calib_seq_len=16
    )
    lines: list[str] = []
    result = run_demo(out=out, ratio=0.3, log=lines.append, say=lines.append, **kwargs)
    assert result["reload"]["ok"] and result["reload"]["max_logit_diff"] <= 1e-4
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["timings_s"]) >= {"calibrate", "plan", "perplexity_before", "perplexity_after", "save"}
    assert any(line.startswith("budget: at least 0.3 of the") for line in lines)
    again = run_demo(
        out=out, ratio=0.3, log=lines.append, say=lines.append, **kwargs
    )  # replaces its own output
    assert again["plan"] == result["plan"]


def test_plot_scores_writes_png(tmp_path: Path) -> None:
    blocks = Scores(metric="bi", unit="block", values={f"text.blocks.{i}": 0.1 * (i + 1) for i in range(3)})
    subs = Scores(
        metric="sublayer_drop",
        unit="sublayer",
        values={f"text.blocks.{i}.{k}": 0.01 * (i + 1) for i in range(3) for k in ("attn", "mlp")},
    )
    path = plot_scores(blocks, subs, ["text.blocks.1", "text.blocks.2.attn"], tmp_path / "p" / "s.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
