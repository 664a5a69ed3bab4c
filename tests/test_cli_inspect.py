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
