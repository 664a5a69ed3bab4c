"""Llama-family specifics: match scores, hand-computed IR numbers, channel groups, mixed layer types."""

from __future__ import annotations

import copy

import pytest
import torch
from prunekit_llama import LlamaFamilyAdapter
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.model import GroupMember
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import apply_plan

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# hand-computed for TINY (head_dim 16, 2 query heads per KV head)
ATTN = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64  # q, k, v, o, input_layernorm
MLP = 3 * 64 * 128 + 64  # gate, up, down, post_attention_layernorm
EMBED = 128 * 64


def tiny(model_cls=LlamaForCausalLM, config_cls=LlamaConfig, **overrides):
    torch.manual_seed(0)
    return model_cls(config_cls(**{**TINY, **overrides})).eval()


def prune(model, remove):
    adapter = LlamaFamilyAdapter()
    plan = PrunePlan(fingerprint=fingerprint(model, adapter.build_ir(model)), remove=remove)
    return apply_plan(model, plan, adapter=adapter).model


class RenamedLlama(LlamaForCausalLM):
    """Same layout as Llama under another class name (e.g. a fine-tuning library's wrapper)."""


# --- match -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_cls", "config_cls"),
    [(LlamaForCausalLM, LlamaConfig), (MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config)],
)
def test_exact_classes_score_100(model_cls, config_cls) -> None:
    assert LlamaFamilyAdapter().match(tiny(model_cls, config_cls)) == 100


def test_structural_match_scores_10() -> None:
    assert LlamaFamilyAdapter().match(tiny(RenamedLlama)) == 10


def test_pruned_structural_match_still_scores_10() -> None:
    model = prune(tiny(RenamedLlama), ["text.blocks.0.attn", "text.blocks.1.mlp"])
    assert LlamaFamilyAdapter().match(model) == 10


def test_other_families_do_not_match() -> None:
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    assert LlamaFamilyAdapter().match(gpt2) is None
    assert LlamaFamilyAdapter().match(torch.nn.Linear(2, 2)) is None


# --- IR numbers ----------------------------------------------------------------------------------------


def test_ir_ids_and_params() -> None:
    ir = LlamaFamilyAdapter().build_ir(tiny())
    assert (ir.architecture, ir.model_type, ir.adapter) == ("LlamaForCausalLM", "llama", "llama")
    assert [b.id for b in ir.blocks()] == [f"text.blocks.{i}" for i in range(4)]
    assert [s.id for s in ir.sublayers()][:4] == [
        "text.blocks.0.attn",
        "text.blocks.0.mlp",
        "text.blocks.1.attn",
        "text.blocks.1.mlp",
    ]
    block = ir.blocks()[0]
    attn, mlp = block.sublayers
    assert (attn.params, mlp.params, block.params) == (12352, 24640, 36992) == (ATTN, MLP, ATTN + MLP)
    assert attn.module == "model.layers.0.self_attn" and attn.norm == "model.layers.0.input_layernorm"
    assert mlp.module == "model.layers.0.mlp" and mlp.norm == "model.layers.0.post_attention_layernorm"
    assert (attn.output, mlp.output) == ("tuple", "tensor")
    assert attn.uses_cache and not mlp.uses_cache
    assert ir.block_params() == 4 * 36992
    stages = {s.id: s.params for s in ir.towers[0].stages}
    assert stages == {"text.embed": EMBED, "text.norm": 64, "text.head": EMBED}
    assert ir.total_params == 4 * 36992 + 2 * EMBED + 64 == 164416
    edges = [(s.residual.source, s.residual.target) for s in ir.sublayers()]
    assert edges == [(i, i + 1) for i in range(8)]


def test_tied_head_counts_once() -> None:
    ir = LlamaFamilyAdapter().build_ir(tiny(tie_word_embeddings=True))
    head = next(s for s in ir.towers[0].stages if s.id == "text.head")
    assert head.params == 0 and head.tied_to == "text.embed"
    assert ir.total_params == 4 * 36992 + EMBED + 64


def test_ir_after_pruning_renumbers_blocks_and_points() -> None:
    model = prune(tiny(), ["text.blocks.0.attn", "text.blocks.1"])
    ir = LlamaFamilyAdapter().build_ir(model)
    assert [s.id for s in ir.sublayers()] == [
        "text.blocks.0.mlp",
        "text.blocks.1.attn",
        "text.blocks.1.mlp",
        "text.blocks.2.attn",
        "text.blocks.2.mlp",
    ]
    assert ir.blocks()[0].params == MLP
    assert [(s.residual.source, s.residual.target) for s in ir.sublayers()] == [(i, i + 1) for i in range(5)]
    assert [layer.self_attn.layer_idx for layer in model.model.layers[1:]] == [0, 1]


# --- channel groups ------------------------------------------------------------------------------------


def test_kv_groups_gqa() -> None:
    attn = LlamaFamilyAdapter().build_ir(tiny()).sublayers()[0]
    (kv,) = attn.channel_groups
    p = "model.layers.0.self_attn"
    assert (kv.id, kv.kind, kv.count) == ("text.blocks.0.attn.kv_groups", "kv_group", 2)
    assert kv.members == (
        GroupMember(param=f"{p}.q_proj.weight", axis=0, width=32),
        GroupMember(param=f"{p}.k_proj.weight", axis=0, width=16),
        GroupMember(param=f"{p}.v_proj.weight", axis=0, width=16),
        GroupMember(param=f"{p}.o_proj.weight", axis=1, width=32),
    )
    assert kv.params_per_group == (32 + 16 + 16 + 32) * 64
    assert kv.count * kv.params_per_group == ATTN - 64  # every attention weight, norm aside


def test_kv_groups_without_gqa() -> None:
    (kv,) = LlamaFamilyAdapter().build_ir(tiny(num_key_value_heads=4)).sublayers()[0].channel_groups
    assert kv.count == 4
    assert [m.width for m in kv.members] == [16, 16, 16, 16]


def test_kv_groups_include_qwen2_biases() -> None:
    (kv,) = LlamaFamilyAdapter().build_ir(tiny(Qwen2ForCausalLM, Qwen2Config)).sublayers()[0].channel_groups
    p = "model.layers.0.self_attn"
    biases = [m for m in kv.members if m.param.endswith(".bias")]
    assert biases == [
        GroupMember(param=f"{p}.q_proj.bias", axis=0, width=32),
        GroupMember(param=f"{p}.k_proj.bias", axis=0, width=16),
        GroupMember(param=f"{p}.v_proj.bias", axis=0, width=16),
    ]
    assert kv.params_per_group == 96 * 64 + 64


def test_ffn_channels() -> None:
    mlp = LlamaFamilyAdapter().build_ir(tiny()).sublayers()[1]
    (ch,) = mlp.channel_groups
    p = "model.layers.0.mlp"
    assert (ch.id, ch.kind, ch.count, ch.params_per_group) == (
        "text.blocks.0.mlp.channels",
        "ffn_channel",
        128,
        192,
    )
    assert ch.members == (
        GroupMember(param=f"{p}.gate_proj.weight", axis=0, width=1),
        GroupMember(param=f"{p}.up_proj.weight", axis=0, width=1),
        GroupMember(param=f"{p}.down_proj.weight", axis=1, width=1),
    )


# --- Qwen2 with mixed full / sliding layers -----------------------------------------------------------


def qwen2_mixed():
    model = tiny(
        Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, max_window_layers=2, sliding_window=8
    )
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    return model


def test_mixed_layer_types_refuse_attention_removal() -> None:
    model = qwen2_mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match="mixed layer types") as err:
        prune(model, ["text.blocks.3.attn"])
    assert "text.blocks.3.attn" in str(err.value) and "block" in str(err.value)
    assert model.state_dict().keys() == before.keys()
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_mixed_layer_types_allow_mlp_removal() -> None:
    model = prune(qwen2_mixed(), ["text.blocks.0.mlp"])
    assert len(model.model.layers) == 4


@pytest.mark.parametrize(
    ("removed", "layer_types", "max_window_layers"),
    [
        ([1], ["full_attention", "sliding_attention", "sliding_attention"], 1),
        ([2], ["full_attention", "full_attention", "sliding_attention"], 2),
        ([0, 3], ["full_attention", "sliding_attention"], 1),
    ],
)
def test_mixed_layer_types_block_removal_remaps_config(removed, layer_types, max_window_layers) -> None:
    model = prune(qwen2_mixed(), [f"text.blocks.{i}" for i in removed])
    config = model.config
    assert config.num_hidden_layers == len(layer_types) == len(model.model.layers)
    assert config.layer_types == layer_types
    assert config.max_window_layers == max_window_layers
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(layer_types)))
    assert [layer.self_attn.layer_type for layer in model.model.layers] == layer_types
    # a model rebuilt from the pruned config has the same layer types (what a reload sees)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    assert [layer.self_attn.layer_type for layer in fresh.model.layers] == layer_types

    # cached decoding past the window equals one full forward
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :6], use_cache=True)
        cache = out.past_key_values
        for t in range(6, 20):
            out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=1e-5, rtol=0)
