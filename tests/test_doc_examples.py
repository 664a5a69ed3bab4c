"""Every `prunekit` command a user copies from README.md and docs/*.md runs, in order, in a fresh temporary
folder with no pre-made directories (issue 16: `--out out/x` failed on a fresh clone because `out/` did not
exist).

The commands are read from the ```bash blocks as written. Only what makes them fast and offline is
changed: the model a command names (the real SmolLM2-135M, ./my-mixtral, ./my-llava, ./big-llama) becomes a
tiny random model of the same family saved outside the working folder, the text aliases become word files,
and calibration, evaluation and LoRA get a few short windows. Outputs (`out/...`, `plan.json`) are written
where the docs say.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
from helpers import bpe_tokenizer, save_tiny_model, words

from prunekit_core import load_pruned, read_plan, save_pruned
from prunekit_core.cli import main

ROOT = Path(__file__).resolve().parent.parent
ALL_PAGES = [
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md"),
]

#: options whose value is a text spec (alias or file)
TEXT_OPTIONS = ("--calib", "--eval", "--text", "--lora-text")
#: calibration, evaluation and LoRA made small: option -> value, per command
FAST = {
    "score": {"--seq-len": "16", "--windows": "2"},
    "prune": {"--seq-len": "16", "--windows": "2", "--eval-tokens": "64", "--eval-seq-len": "16"},
    "recover": {"--seq-len": "16", "--windows": "2", "--eval-tokens": "64", "--eval-seq-len": "16"},
    "eval": {"--seq-len": "16", "--max-tokens": "64"},
    "compress": {
        "--seq-len": "16",
        "--calib-windows": "2",
        "--heldout-windows": "2",
        "--eval-windows": "2",
        "--eval-seq-len": "16",
        "--steps": "2",
    },
}
LORA = {"--lora-steps": "2", "--lora-seq-len": "16", "--lora-batch": "2"}


def commands(page: str) -> list[list[str]]:
    """The `prunekit ...` lines of the page's ```bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["prunekit"]:
                out.append(argv[1:])
    return out


#: the pages that show CLI examples (a page without any is not a test case that passes by doing nothing)
PAGES = [page for page in ALL_PAGES if commands(page)]


def _load(path: Path, name: str):  # noqa: ANN202 - a test helper module of a plugin
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny stand-ins for the models the docs name, saved outside the working folder."""
    root = tmp_path_factory.mktemp("doc-models")
    llama = save_tiny_model(root / "llama", layers=4)
    moe = _load(ROOT / "plugins/mixtral/tests/moe_tiny.py", "_doc_moe_tiny")
    llava = _load(ROOT / "plugins/llava/tests/llava_tiny.py", "_doc_llava_tiny")
    return {
        "smollm2-135m": llama,
        "./big-llama": llama,
        "./my-mixtral": moe.save_tiny_mixtral(root / "mixtral"),
        "./my-llava": llava.save_tiny_llava(root / "llava"),
    }


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("doc-texts")
    out = {}
    for i, alias in enumerate(("c4", "wiki", "heal")):
        out[alias] = root / f"{alias}.txt"
        out[alias].write_text(words(4000, seed=i + 1) + "\n")
    return out


def adapt(argv: list[str], models: dict[str, Path], texts: dict[str, Path]) -> list[str]:
    """The doc's command with a tiny model, word files and short windows (see the module docstring)."""
    argv = [str(models[a]) if a in models else a for a in argv]
    for i, arg in enumerate(argv[:-1]):
        if arg in TEXT_OPTIONS and argv[i + 1] in texts:
            argv[i + 1] = str(texts[argv[i + 1]])
    fast = dict(FAST.get(argv[0], {}))
    if "lora" in argv:
        fast |= {**LORA, "--lora-text": str(texts["heal"])}
    for option, value in fast.items():
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return argv


def sweep_config(page: str, models: dict[str, Path], texts: dict[str, Path]) -> str:
    """docs/sweep.md's sweep.yaml with the tiny model, word files, short windows and fewer cells."""
    yaml = re.search(r"```yaml\n# sweep.yaml\n(.*?)```", (ROOT / page).read_text(), re.S).group(1)
    yaml = yaml.replace("model: smollm2-135m", f"model: {models['smollm2-135m']}")
    yaml = re.sub(
        r"calibration: \{.*\}", f"calibration: {{text: {texts['c4']}, seq_len: 16, windows: 2}}", yaml
    )
    yaml = re.sub(
        r"evaluation: \{.*\}", f"evaluation: {{text: {texts['wiki']}, seq_len: 16, windows: 2}}", yaml
    )
    yaml = re.sub(r"ratios: \[.*?\]", "ratios: [0, 0.25]", yaml)
    return re.sub(r"formats: \[.*?\]", "formats: [none, int8]", yaml)


def test_the_docs_have_cli_examples() -> None:
    assert len(commands("README.md")) >= 10
    assert any(commands(p) for p in PAGES if p.startswith("docs/"))


@pytest.mark.parametrize("page", PAGES)
def test_every_cli_example_runs_in_a_fresh_folder(
    page: str,
    models: dict[str, Path],
    texts: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    examples = commands(page)
    if not examples:
        return  # a page without CLI examples: nothing to run
    work = tmp_path / "fresh"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing in it: every output folder a command names must be created
    for argv in examples:
        if argv[0] == "sweep":
            if "ray" in argv and importlib.util.find_spec("ray") is None:
                continue  # the optional ray executor (pip install 'prunekit-core[ray]') is not installed here
            if not (work / argv[1]).exists():
                (work / argv[1]).write_text(sweep_config(page, models, texts))
            argv = [*argv, "--workers", "1"] if "--executor" not in argv else argv
        if argv[0] == "eval" and "--tasks" in argv:
            # lm-eval's standard tasks download their data from the hub, which tests do not reach, and a
            # local task needs its YAML folder: tests/test_lmeval.py runs --tasks on a local task instead
            continue
        if argv[0] == "export" and (work / argv[1]).is_dir():
            # GGUF carries byte-level BPE vocabularies; the tiny stand-in model's tokenizer is word-level: the
            # folder is saved again, by prunekit, with a BPE tokenizer
            folder = work / argv[1]
            saved = load_pruned(folder)
            save_pruned(saved, folder, tokenizer=bpe_tokenizer(), plan=read_plan(folder), overwrite=True)
        run = adapt(argv, models, texts)
        code = main(run)
        err = capsys.readouterr().err
        assert code == 0, f"{page}: prunekit {shlex.join(argv)}\nran as: prunekit {shlex.join(run)}\n{err}"


def test_the_plugin_tutorials_first_step_makes_its_own_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/plugins/writing-a-plugin.md step 1 says how to save a tiny GPT-J and inspects it: both lines run
    as written in an empty folder (the `python -c` code in this interpreter)."""
    text = (ROOT / "docs/plugins/writing-a-plugin.md").read_text()
    step = text.split("## 1. Look at the model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", step, re.S).group(1)
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [argv[:2] for argv in lines] == [["python", "-c"], ["prunekit", "inspect"]]
    monkeypatch.chdir(tmp_path)
    exec(lines[0][2], {})  # noqa: S102 - the tutorial's own one-liner
    capsys.readouterr()
    assert main([*lines[1][1:], "--json"]) == 0
    assert '"adapter": "gptj"' in capsys.readouterr().out
