"""The prunekit conformance suite on a tiny random GPTJForCausalLM."""

from __future__ import annotations

import torch
from prunekit_gptj import GptjAdapter
from transformers import GPTJConfig, GPTJForCausalLM

from prunekit_core.testing import AdapterConformance

TINY = {
    "vocab_size": 128,
    "n_embd": 64,
    "n_layer": 4,
    "n_head": 4,
    "n_positions": 128,
    "rotary_dim": 8,
}


class TestGptj(AdapterConformance):
    adapter = GptjAdapter()
    #: what the adapter supports (prunekit_core.testing.CAPABILITIES): the kit runs these checks and fails
    #: if the adapter's IR shows a capability not named here, or lacks one that is; add "width" once
    #: a branch declares channel groups (groups=)
    capabilities = {"depth", "sublayers", "width"}
    #: checks this adapter knowingly does not pass, as {"test_name": "why"} (run as strict xfails)
    expected_failures: dict[str, str] = {}

    def make_model(self) -> GPTJForCausalLM:
        torch.manual_seed(0)
        return GPTJForCausalLM(GPTJConfig(**TINY)).eval()
