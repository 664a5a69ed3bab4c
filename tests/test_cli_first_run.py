"""A first run of the CLI, as a new user meets it (issue 16): it answers at once, prints no library noise,
checks cheap things first, and fixes the papercuts of a fresh clone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import save_tiny_model, tiny_llama, words

from prunekit_core.cli import main, subcommand_parsers
from prunekit_core.ir.defaults import GRANULARITIES
from prunekit_core.ir.errors import ModelNotFoundError, PlanError
from prunekit_core.planning.planner import check_budget, resolve_method

HEAVY = ("torch", "transformers", "torchao")
FAST = ["--windows", "2", "--seq-len", "16"]


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fresh_python(script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first-run")
    text = root / "text.txt"
    text.write_text(words(3000, seed=1) + "\n")
    no_tokenizer = root / "no-tokenizer"
    tiny_llama().save_pretrained(no_tokenizer)
    return {"model": save_tiny_model(root / "tiny", layers=4), "text": text, "no_tokenizer": no_tokenizer}


# --- 1. help and plugins import no torch ------------------------------------------------------------------


HELP_CASES = [
    ["--help"],
    *[[name, "--help"] for name in subcommand_parsers()],
    ["plugins"],
    ["plugins", "--json"],
]


@pytest.mark.parametrize("argv", HELP_CASES, ids=lambda a: " ".join(a))
def test_help_and_plugins_import_no_torch(argv: list[str]) -> None:
    """In a fresh interpreter: the command runs main() and then reports which heavy modules it imported."""
    proc = fresh_python(
        f"""
        import sys
        from prunekit_core.cli import main
        code = main({argv!r})
        sys.stdout.flush()
        print("\\nHEAVY", [m for m in {HEAVY!r} if m in sys.modules], "CODE", code)
        """
    )
    tail = proc.stdout.rsplit("\nHEAVY", 1)
    assert len(tail) == 2, proc.stderr
    assert tail[1].strip() == "[] CODE 0", f"prunekit {' '.join(argv)} imported {tail[1]}"
    if argv[:1] == ["plugins"] and "--help" not in argv:
        assert "llama" in proc.stdout and "moe_pruner" in proc.stdout  # listed from the catalogs
    assert "Failed to load" not in proc.stderr and "Enum subclass" not in proc.stderr


def test_the_catalog_listing_equals_the_full_load(capsys: pytest.CaptureFixture[str]) -> None:
    """`prunekit plugins` (catalogs, no torch) and `prunekit plugins --load` (every plugin built) agree: a
    catalog that names something its plugin does not register would show up here."""
    import prunekit_core.registry.plugins as registry

    registry.reset_plugins()
    try:
        code, listed, _ = run(capsys, "plugins", "--json")
        assert code == 0
        assert not registry._REGISTRY.loaded, "the listing loaded the plugins instead of reading catalogs"
        code, loaded, _ = run(capsys, "plugins", "--load", "--json")
        assert code == 0
    finally:
        registry.reset_plugins()
    assert json.loads(listed) == json.loads(loaded)
    assert json.loads(loaded)["failures"] == []


def test_a_catalog_that_disagrees_with_the_registrations_is_a_load_failure(monkeypatch) -> None:
    import types

    from prunekit_core import hookimpl
    from prunekit_core.registry import plugins as plugins_mod

    module = types.ModuleType("pk_wrong_catalog")

    @hookimpl
    def prunekit_catalog():  # noqa: ANN202
        return {"adapters": ["promised"]}

    @hookimpl
    def prunekit_register_adapters(register) -> None:  # noqa: ANN001
        pass  # registers nothing

    module.prunekit_catalog = prunekit_catalog
    module.prunekit_register_adapters = prunekit_register_adapters
    monkeypatch.delenv("PRUNEKIT_STRICT_PLUGINS", raising=False)
    plugins_mod.reset_plugins()
    try:
        reg = plugins_mod._registry()
        reg._load_one(name="wrong", module_name=module.__name__, version=None, builtin=False, module=module)
        failure = next(f for f in plugins_mod.load_failures() if f.name == "wrong")
        assert "catalog" in failure.error and "promised" in failure.error
        assert "wrong" not in {p.name for p in plugins_mod.plugins()}
    finally:
        plugins_mod.reset_plugins()


# --- 2. no library noise without -v -------------------------------------------------------------------------

NOISE = (
    "Failed to load",
    "Enum subclass",
    "_pytree",
    "torchao",
    "UserWarning",
    "FutureWarning",
    "LOAD REPORT",
)


def test_a_real_command_prints_no_library_noise(assets: dict[str, Path]) -> None:
    """`prunekit inspect` in a fresh interpreter imports torch, transformers and torchao (through the
    plugins and the model load): none of their warnings reach stderr without -v."""
    proc = fresh_python(
        f"""
        import sys
        from prunekit_core.cli import main
        code = main(["inspect", {str(assets["model"])!r}])
        print("CODE", code, "NOISY", [m for m in ("torch", "transformers", "torchao") if m in sys.modules])
        """
    )
    assert "CODE 0" in proc.stdout, proc.stderr
    # the noisy libraries were imported while the command ran: their import-time messages were silenced
    assert "NOISY ['torch', 'transformers', 'torchao']" in proc.stdout
    for noise in NOISE:
        assert noise not in proc.stderr, f"{noise!r} reached stderr:\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith("load ") for line in lines), proc.stderr  # only our own timing line


def test_every_installed_plugin_logs_like_the_core(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI shows the logs of every installed plugin's package as it shows the core's (warnings always,
    INFO with -v), found through the registry's entry points: the core names no plugin."""
    import logging

    from prunekit_core.cli.ui import quiet_libraries
    from prunekit_core.registry.plugins import plugin_packages

    assert {"prunekit_llama", "prunekit_mixtral", "prunekit_llava"} <= set(plugin_packages())
    for verbose in (False, True):
        with quiet_libraries(verbose):
            for name in (
                "prunekit_core.planning.planner",
                "prunekit_mixtral.metrics",
                "prunekit_llava.adapter",
            ):
                logging.getLogger(name).info("an info line")
                logging.getLogger(name).warning("a warning line")
    err = capsys.readouterr().err
    for name in ("prunekit_core.planning.planner", "prunekit_mixtral.metrics", "prunekit_llava.adapter"):
        assert err.count(f"WARNING {name}: a warning line") == 2, err
        assert err.count(f"INFO {name}: an info line") == 1, err


# --- 3. inspect needs no tokenizer ---------------------------------------------------------------------------


def test_inspect_works_without_a_tokenizer(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path]
) -> None:
    folder = assets["no_tokenizer"]
    assert not any(p.name.startswith("tokenizer") for p in folder.iterdir())
    code, out, err = run(capsys, "inspect", folder, "--json")
    assert code == 0, err
    assert json.loads(out)["architecture"] == "LlamaForCausalLM"


def test_a_command_that_reads_text_names_the_missing_tokenizer(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path]
) -> None:
    code, _, err = run(capsys, "eval", assets["no_tokenizer"], "--text", assets["text"])
    assert code == 2 and "has no tokenizer" in err and str(assets["no_tokenizer"]) in err


# --- 4. --out creates its parents ---------------------------------------------------------------------------


def test_prune_creates_missing_parents_of_out(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "nested" / "x"
    code, _, err = run(
        capsys, "prune", assets["model"], "--ratio", "0.2", "--calib", assets["text"], "--out", out, *FAST
    )
    assert code == 0, err
    assert (out / "prunekit.json").is_file() and (out / "config.json").is_file()
    plan = tmp_path / "plans" / "p.json"
    code, _, err = run(
        capsys,
        "prune",
        assets["model"],
        "--ratio",
        "0.2",
        "--calib",
        assets["text"],
        "--plan-only",
        "--out",
        plan,
        *FAST,
    )
    assert code == 0, err
    assert json.loads(plan.read_text())["remove"]


def test_a_failed_prune_leaves_no_parent_folders(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    import prunekit_core.io.checkpoint as checkpoint

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise checkpoint.CheckpointError("simulated failure while writing")

    monkeypatch.setattr(checkpoint, "structure_record", broken)
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = run(
        capsys,
        "prune",
        assets["model"],
        "--ratio",
        "0.2",
        "--calib",
        assets["text"],
        "--out",
        work / "out" / "x",
        *FAST,
    )
    assert code == 2 and "simulated failure" in err
    assert list(work.iterdir()) == []


# --- 5. a model spec that is a path is checked at once, locally ---------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "score", "prune", "eval", "recover"])
@pytest.mark.parametrize("spec", ["./missing", "out/x", "a/b/c", "~/no-such-prunekit-model"])
def test_a_missing_path_fails_at_once_without_the_hub(
    capsys: pytest.CaptureFixture[str],
    assets: dict[str, Path],
    tmp_path: Path,
    monkeypatch,
    command: str,
    spec: str,
) -> None:
    import huggingface_hub

    def no_hub(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a local path was looked up on the hub")

    def never_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before its path was checked")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_hub)
    monkeypatch.setattr("prunekit_core.io.loading.load_model", never_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # `out/x`: its first folder exists, so it is a path (the case)
    text = str(assets["text"])
    argv = {
        "inspect": ["inspect", spec],
        "score": ["score", spec, "--calib", text, *FAST],
        "prune": ["prune", spec, "--ratio", "0.2", "--calib", text, "--out", "pruned", *FAST],
        "eval": ["eval", spec, "--text", text],
        "recover": ["recover", spec, "--out", "healed", "--lora-text", text],
    }[command]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert "not looked up on the hub" in err
    assert str(Path(spec).expanduser().absolute()) in err, err  # names the path it looked for
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "healed").exists()


def test_a_hub_id_is_looked_up_once_without_retries(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """org/name that is not here: one lookup; when the hub cannot be reached, a clear error at once instead
    of transformers' minute of retries (from_pretrained is never reached)."""
    import huggingface_hub
    import transformers

    calls = []

    def unreachable(self, repo_id, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(repo_id)
        raise ConnectionError("no network")

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("from_pretrained was called for an unreachable hub id")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "eval", "nobody-prunekit/no-such-model", "--text", assets["text"])
    assert code == 2, err
    assert calls == ["nobody-prunekit/no-such-model"]
    assert "could not be reached" in err and "no-such-model" in err


def test_resolve_keeps_hub_ids_that_are_not_paths(tmp_path: Path, monkeypatch) -> None:
    from prunekit_core.io.sources import resolve_model_source

    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "HuggingFaceTB").mkdir()  # now its first folder exists here: a local path
    with pytest.raises(ModelNotFoundError, match="HuggingFaceTB exists here"):
        resolve_model_source("HuggingFaceTB/SmolLM2-135M")


# --- 6. the default metric follows the granularity ---------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_granularity_has_a_default_metric_that_scores_it(granularity: str) -> None:
    """resolve_method without a metric gives a combination it accepts, at the granularity asked for."""
    metric, _planner, resolved, _repair = resolve_method(None, None, granularity, None)
    assert resolved == granularity
    resolve_method(metric, None, granularity, None)  # the metric itself accepts that granularity


@pytest.mark.parametrize("granularity", ["block", "sublayer", "width", "mixed"])
def test_prune_at_each_granularity_without_a_metric(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path, granularity: str
) -> None:
    out = tmp_path / granularity
    code, stdout, err = run(
        capsys, "prune", assets["model"], "--ratio", "0.2", "--calib", assets["text"], "--granularity", granularity,
        "--out", out, "--plan-only", "--json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads(stdout)["plan"]
    assert plan["granularity"] == granularity
    if granularity == "sublayer":  # it failed with "metric 'angular' scores blocks" before
        assert plan["method"] == "rank:sublayer_drop"
        assert all("." in u.removeprefix("text.blocks.") for u in plan["remove"])  # sublayers, not blocks


# --- 7. an impossible budget is refused from parameter counts, before calibration --------------------------


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_an_impossible_ratio_is_refused_before_calibration(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path, monkeypatch, granularity: str
) -> None:
    import prunekit_core.io.text
    import prunekit_core.scoring.api

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("calibration ran for an impossible budget")

    monkeypatch.setattr(prunekit_core.scoring.api, "calibrate", never)
    monkeypatch.setattr(prunekit_core.io.text, "load_windows", never)
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "prune", assets["model"], "--ratio", "0.999", "--calib", assets["text"], "--granularity", granularity,
        "--out", out, *FAST,
    )  # fmt: skip
    assert code == 2, err
    assert "--ratio 0.999" in err and "lower --ratio" in err and "calibration ran" not in err
    assert not out.exists()


def test_the_budget_ceiling_is_exact_for_blocks() -> None:
    """Four equal blocks: three can go (a tower keeps one), so 0.75 is possible and anything above is not."""
    from prunekit_core.scoring.api import inspect

    ir = inspect(tiny_llama(layers=4))
    check_budget(ir, 0.75, "block")
    with pytest.raises(PlanError, match="every block"):
        check_budget(ir, 0.76, "block")


# --- the demo's plot says which metric chose the removed blocks ----------------------------------------------


def test_demo_plot_title_names_the_metric_that_chose_the_removed_blocks(
    assets: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """scores.png plots BI and sublayer_drop, but the plan comes from prunekit's best method (angular): the
    title says so, read from the figure as it is saved."""
    from matplotlib.figure import Figure

    import prunekit_core.io.text
    from prunekit_core.ir.defaults import BEST
    from prunekit_core.study.demo import run_demo

    text = assets["text"].read_text()
    real_read = prunekit_core.io.text.read_text
    monkeypatch.setattr(
        prunekit_core.io.text, "read_text", lambda spec: text if spec in ("c4", "wiki") else real_read(spec)
    )
    titles: list[str] = []
    real_savefig = Figure.savefig

    def savefig(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        titles.extend(ax.get_title() for ax in self.axes)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    kwargs = dict(
        model_spec=str(assets["model"]), eval_windows=2, eval_seq_len=32, calib_windows=2, calib_seq_len=16
    )
    result = run_demo(out=tmp_path / "demo", ratio=0.3, log=lambda _: None, say=lambda _: None, **kwargs)
    assert result["plan"]["remove"]
    top = titles[0]
    assert f"chosen by {BEST['planner']}:{BEST['metric']}" in top and "per-block bi scores" in top, top


def test_import_prunekit_core_is_lazy_and_keeps_its_api() -> None:
    """`import prunekit_core` imports no torch; every name of __all__ still resolves (on first use), and a
    submodule is still reachable as an attribute."""
    proc = fresh_python(
        """
        import sys
        import prunekit_core as pk
        print("HEAVY", [m for m in ("torch", "transformers", "torchao") if m in sys.modules])
        missing = [n for n in pk.__all__ if getattr(pk, n, None) is None]
        from prunekit_core.registry.plugins import plugins
        from prunekit_core.io.loading import load_model
        print("MISSING", missing, pk.list_plugins is plugins, pk.load_model is load_model, pk.planning.planner.BEST["metric"])
        """
    )
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "MISSING [] True True angular" in proc.stdout, proc.stdout + proc.stderr


def test_sweep_checks_its_model_before_starting_workers(
    capsys: pytest.CaptureFixture[str], assets: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    def never_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before its path was checked")

    monkeypatch.setattr("prunekit_core.io.loading.load_model", never_load)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"model: ./no-such-model\ncalibration: {{text: {assets['text']}, seq_len: 16, windows: 2}}\n"
        f"evaluation: {{text: {assets['text']}, seq_len: 16, windows: 2}}\nmethods: [best]\nratios: [0]\n"
        "formats: [none]\n"
    )
    code, _, err = run(capsys, "sweep", config, "--results", tmp_path / "out" / "s.sqlite")
    assert code == 2, err
    assert "no-such-model" in err and "not looked up on the hub" in err
    assert not (tmp_path / "out").exists()
