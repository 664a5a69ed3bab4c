"""`prunekit new-plugin`: the skeleton distribution it writes works as written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prunekit_core.adapters.generic import GenericAdapter
from prunekit_core.cli import main
from prunekit_core.testing import AdapterConformance, check_needs

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("skeleton") / "prunekit-toygpt"
    assert (
        main(["new-plugin", "toygpt", "--model-class", "GPT2LMHeadModel", "--out", str(out), "--json"]) == 0
    )
    return out


def test_writes_a_distribution_with_an_entry_point(skeleton: Path) -> None:
    files = sorted(str(p.relative_to(skeleton)) for p in skeleton.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "prunekit_toygpt/__init__.py",
        "prunekit_toygpt/adapter.py",
        "prunekit_toygpt/plugin.py",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_toygpt_conformance.py",
    ]
    pyproject = (skeleton / "pyproject.toml").read_text()
    assert 'name = "prunekit-toygpt"' in pyproject
    assert '[project.entry-points.prunekit]\ntoygpt = "prunekit_toygpt.plugin"\n' in pyproject


def test_skeleton_adapter_describes_the_model_like_the_generic_adapter(
    skeleton: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(skeleton))
    from prunekit_toygpt import ToygptAdapter

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4)).eval()
    adapter = ToygptAdapter()
    assert adapter.match(model) == 100.0
    ours = adapter.build_ir(model).model_dump(exclude={"adapter"})
    assert ours == GenericAdapter().build_ir(model).model_dump(exclude={"adapter"})
    sys.modules.pop("prunekit_toygpt", None)


def test_skeleton_passes_the_conformance_suite(
    skeleton: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(skeleton))
    result = pytester.runpytest_inprocess(str(skeleton / "tests"), "-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    # every check of its declared capabilities runs and passes; none is skipped
    checks = [n for n in vars(AdapterConformance) if n.startswith("test_")]
    declared = [n for n in checks if check_needs(n) <= {"depth", "sublayers"}]
    counts = {k: v for k, v in outcomes.items() if k not in ("warning", "warnings")}
    assert counts == {"passed": len(declared)}, outcomes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["new-plugin", "Bad-Name", "--model-class", "GPT2LMHeadModel"], "lowercase Python identifier"),
        (["new-plugin", "x", "--model-class", "GPT2LMHeadModle"], "did you mean GPT2LMHeadModel"),
        (["new-plugin", "x", "--model-class", "GPT2LMHeadModel", "--config", "n_layer"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["new-plugin", "x", "--model-class", "GPT2LMHeadModel", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    argv = ["new-plugin", "tiny_opt", "--model-class", "OPTForCausalLM", "--out", str(out), "--json"]
    argv += ["--config", "ffn_dim=128", "--config", "word_embed_proj_dim=64"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["distribution"] == "prunekit-tiny-opt" and data["adapter_class"] == "TinyOptAdapter"
    assert '"ffn_dim": 128' in (out / "tests/test_tiny_opt_conformance.py").read_text()
    assert 'parts=("fc1",)' in (out / "prunekit_tiny_opt/adapter.py").read_text()


def test_the_example_plugin_is_what_new_plugin_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/prunekit-gptj was made with `prunekit new-plugin`; only its width pruning was added by hand
    (the MLP branch's channel-group factory, and "width" in its conformance test's capabilities)."""
    import dataclasses
    import importlib.util

    example = Path(__file__).resolve().parent.parent / "examples" / "prunekit-gptj"
    out = tmp_path / "gptj"
    argv = ["new-plugin", "gptj", "--model-class", "GPTJForCausalLM", "--config", "rotary_dim=8"]
    assert main([*argv, "--out", str(out), "--json"]) == 0

    def adapter_class(path: Path) -> type:
        spec = importlib.util.spec_from_file_location(f"adapter_{abs(hash(path))}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.GptjAdapter

    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        ours = (example / rel).read_text()
        if rel.name == "adapter.py":  # the generated tables are kept; the MLP's groups= was added to them
            generated, example_cls = adapter_class(path), adapter_class(example / rel)
            for attr in ("name", "description", "model_classes", "layout"):
                assert getattr(example_cls, attr) == getattr(generated, attr), (
                    f"the example's {attr} was changed"
                )
            bare = tuple(dataclasses.replace(b, groups=()) for b in example_cls.branches)
            assert bare == generated.branches, "the example's generated branches were changed"
            assert [b.name for b in example_cls.branches if b.groups] == ["mlp"]
        elif rel.name == "test_gptj_conformance.py":
            generated = path.read_text().replace(
                'capabilities = {"depth", "sublayers"}', 'capabilities = {"depth", "sublayers", "width"}'
            )
            assert generated != path.read_text() and ours == generated, (
                f"{rel} differs from what new-plugin writes"
            )
        else:
            assert ours == path.read_text(), f"{rel} differs from what new-plugin writes"


@pytest.mark.parametrize(
    ("family", "model_class", "declared"),
    [
        ("olmo2", "Olmo2ForCausalLM", 'post=("post_attention_layernorm",)'),
        ("granite", "GraniteForCausalLM", 'scale="residual_multiplier"'),
    ],
)
def test_skeleton_declares_post_norms_and_multipliers(
    family: str, model_class: str, declared: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OLMo2's post-norms ride with the branch they follow, Granite's multiplier is read from its config
    field; the skeleton's adapter passes the kit's checks of those declarations as written."""
    import importlib.util

    out = tmp_path / family
    assert main(["new-plugin", family, "--model-class", model_class, "--out", str(out), "--json"]) == 0
    adapter_py = (out / f"prunekit_{family}/adapter.py").read_text()
    assert declared in adapter_py
    monkeypatch.syspath_prepend(str(out))
    path = out / f"tests/test_{family}_conformance.py"
    spec = importlib.util.spec_from_file_location(f"skeleton_{family}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kit = getattr(module, f"Test{family.capitalize()}")()
    kit.test_branches_own_their_modules()
    kit.test_stream_write_matches_the_forward()
    kit.test_branch_removal_equals_zeroed_branch()
    kit.test_cached_generation_matches_full_forward()
    sys.modules.pop(f"prunekit_{family}", None)
    sys.modules.pop(f"prunekit_{family}.adapter", None)


def test_a_family_it_cannot_read_is_refused_with_a_path_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bloom adds the residual inside its branch modules: new-plugin cannot write it, and says what can."""
    argv = ["new-plugin", "bloom", "--model-class", "BloomForCausalLM", "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "declared by hand: copy examples/prunekit-gptj" in err and "Traceback" not in err
    assert "new-plugin NAME" not in err
    root = Path(__file__).resolve().parent.parent
    assert (root / "examples/prunekit-gptj").is_dir()
    assert "## 2." in (root / "docs/plugins/writing-a-plugin.md").read_text()
