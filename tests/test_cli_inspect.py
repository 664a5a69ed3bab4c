"""`prunekit inspect`: the matched adapter with its score, and the IR as a tree (text and --json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from prunekit_core.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=2, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    tiny_tokenizer().save_pretrained(root / "gpt2")
    return {"llama": save_tiny_model(root / "llama"), "gpt2": root / "gpt2"}


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_inspect_names_the_adapter_and_its_score(capsys: pytest.CaptureFixture[str], folders) -> None:  # noqa: ANN001
    out = _run(capsys, "inspect", folders["llama"])
    assert "adapter:      llama from plugin llama, match score 100; also matched: generic (1)" in out
    out = _run(capsys, "inspect", folders["gpt2"])
    assert "adapter:      generic from plugin adapters, match score 1\n" in out


def test_inspect_prints_the_ir_as_a_tree(capsys: pytest.CaptureFixture[str], folders) -> None:  # noqa: ANN001
    out = _run(capsys, "inspect", folders["gpt2"])
    lines = out.splitlines()
    block = next(i for i, line in enumerate(lines) if "text.blocks.1  block" in line)
    attn = lines[block + 1]
    assert (
        "text.blocks.1.attn  attention  transformer.h.1.attn" in attn and "norm transformer.h.1.ln_1" in attn
    )
    assert "KV cache" in attn and "edge 2->3" in attn
    assert "└── " in lines[block + 2] and "text.blocks.1.mlp" in lines[block + 2]
    order = [
        next(i for i, line in enumerate(lines) if key in line)
        for key in ("text.embed", "text.blocks.0", "text.norm", "text.head")
    ]
    assert order == sorted(order), "stages around the blocks in forward order"
    assert "tied to text.embed" in lines[order[-1]]


def test_inspect_json_has_match_and_candidates(capsys: pytest.CaptureFixture[str], folders) -> None:  # noqa: ANN001
    data = json.loads(_run(capsys, "inspect", folders["llama"], "--json"))
    assert data["match"] == {"adapter": "llama", "plugin": "llama", "score": 100.0}
    assert [c["adapter"] for c in data["candidates"]] == ["llama", "generic"]
    data = json.loads(_run(capsys, "inspect", folders["gpt2"], "--json"))
    assert data["adapter"] == "generic" and data["match"]["score"] == 1.0
    subs = data["towers"][0]["blocks"][0]["sublayers"]
    assert [s["id"] for s in subs] == ["text.blocks.0.attn", "text.blocks.0.mlp"]


def test_prune_a_model_no_plugin_covers(capsys: pytest.CaptureFixture[str], folders, tmp_path: Path) -> None:  # noqa: ANN001
    """The whole flow on GPT-2 through the generic adapter: score, plan, cut, save, reload."""
    from helpers import words

    from prunekit_core import load_pruned

    text = tmp_path / "text.txt"
    text.write_text(words(3000))
    out = tmp_path / "pruned"
    argv = ["prune", folders["gpt2"], "--ratio", "0.2", "--calib", text, "--seq-len", "32", "--windows", "8"]
    data = json.loads(_run(capsys, *argv, "--metric", "sublayer_drop", "--out", out, "--json"))
    removed = (
        data["plan"]["remove"] if "plan" in data else json.loads((out / "plan.json").read_text())["remove"]
    )
    assert removed and all(u.startswith("text.blocks.") for u in removed)
    model = load_pruned(out)
    ids = torch.arange(3, 19).unsqueeze(0)
    full = model(input_ids=ids, use_cache=False).logits
    cached = model(input_ids=ids[:, :8], use_cache=True)
    step = model(input_ids=ids[:, 8:9], cache=cached.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, 8], atol=1e-5, rtol=0)


def test_removing_every_attention_is_refused() -> None:
    """Cached decoding takes positions from the KV cache: with no attention left nothing fills it."""
    from prunekit_core.adapters.generic import GenericAdapter
    from prunekit_core.ir.errors import PlanError
    from prunekit_core.ir.plan import PrunePlan, fingerprint
    from prunekit_core.surgery.apply import apply_plan

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    adapter = GenericAdapter()
    ir = adapter.build_ir(model)
    every = ["text.blocks.0.attn", "text.blocks.1.attn", "text.blocks.2.attn"]
    for remove in (every, every[:2] + ["text.blocks.2"]):  # the kept blocks would hold no attention
        plan = PrunePlan(fingerprint=fingerprint(model, ir), remove=remove)
        with pytest.raises(PlanError, match="removes every attention sublayer of the blocks it keeps"):
            apply_plan(model, plan, adapter=adapter)
    apply_plan(model, PrunePlan(fingerprint=fingerprint(model, ir), remove=every[:2]), adapter=adapter)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cached = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:9], cache=cached.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, 8], atol=1e-5, rtol=0)
