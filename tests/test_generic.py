"""The generic adapter: discovered IRs, and block/sublayer surgery on architectures no plugin covers.

Each ``Test*`` class runs the full conformance suite (:mod:`prunekit_core.testing`) with the generic
adapter on a tiny random model built from its config: every removed branch equals the model with that
branch's output zeroed by a hook, every removed block equals the model with that block bypassed, cached
decoding equals one full forward, configs and checkpoints round-trip.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from prunekit_llama import LlamaFamilyAdapter
from torch import nn

from prunekit_core.adapters.base import RemovedBranch
from prunekit_core.adapters.generic import MATCH_SCORE, GenericAdapter
from prunekit_core.ir.errors import UnsupportedPatternError
from prunekit_core.ir.stream import StreamWrite
from prunekit_core.registry import plugins
from prunekit_core.testing import AdapterConformance

COMMON = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128
)
COMMON["max_position_embeddings"] = 128


def _tiny(model_cls: type, config_cls: type, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


def tiny_llama() -> nn.Module:
    return _tiny(T.LlamaForCausalLM, T.LlamaConfig, num_key_value_heads=2, **COMMON)


class GenericConformance(AdapterConformance):
    adapter = GenericAdapter()
    capabilities = {"depth", "sublayers"}

    def test_adapter_matches(self) -> None:
        """The generic adapter claims every model here; the Llama plugin may claim some structurally
        (see test_family_plugins_win_over_the_generic_adapter), so selection is not checked."""
        assert self.adapter.match(self.make_model()) == MATCH_SCORE


class TestGPT2(GenericConformance):
    """Conv1D projections, learned position embeddings, tied head."""

    def make_model(self) -> nn.Module:
        return _tiny(
            T.GPT2LMHeadModel, T.GPT2Config, vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=128
        )


class TestOPT(GenericConformance):
    """No MLP module: the branch is final_layer_norm -> fc1 -> act -> fc2 over a flattened stream."""

    def make_model(self) -> nn.Module:
        return _tiny(
            T.OPTForCausalLM,
            T.OPTConfig,
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )


class TestOPTPostNorm(TestOPT):
    """OPT-350m style: the norms sit on the stream after each addition, so branches have no pre-norm."""

    expected_failures = {
        "test_metrics_finite_on_every_unit": "no final norm: calibration cannot observe the end of the stream"
    }

    def make_model(self) -> nn.Module:
        model = super().make_model()
        torch.manual_seed(0)
        config = model.config
        config.do_layer_norm_before = False
        return T.OPTForCausalLM(config).eval()


class TestPhi3(GenericConformance):
    """Fused qkv_proj and gate_up_proj, residual dropout modules between branch and addition."""

    def make_model(self) -> nn.Module:
        return _tiny(T.Phi3ForCausalLM, T.Phi3Config, num_key_value_heads=2, pad_token_id=0, **COMMON)


class TestQwen3(GenericConformance):
    def make_model(self) -> nn.Module:
        return _tiny(T.Qwen3ForCausalLM, T.Qwen3Config, num_key_value_heads=2, head_dim=16, **COMMON)


class TestGPTNeoX(GenericConformance):
    """Parallel attention and MLP on the same input: x + attn(ln1(x)) + mlp(ln2(x))."""

    def make_model(self) -> nn.Module:
        return _tiny(T.GPTNeoXForCausalLM, T.GPTNeoXConfig, **COMMON)


class TestGPTNeoXSequential(GenericConformance):
    def make_model(self) -> nn.Module:
        return _tiny(T.GPTNeoXForCausalLM, T.GPTNeoXConfig, use_parallel_residual=False, **COMMON)


class TestFalcon(GenericConformance):
    """Parallel branches sharing one pre-norm, and `mlp_output += attention_output` in place."""

    def make_model(self) -> nn.Module:
        return _tiny(
            T.FalconForCausalLM,
            T.FalconConfig,
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
        )


class TestStableLM(GenericConformance):
    def make_model(self) -> nn.Module:
        return _tiny(T.StableLmForCausalLM, T.StableLmConfig, num_key_value_heads=2, **COMMON)


class TestStableLMParallel(GenericConformance):
    def make_model(self) -> nn.Module:
        return _tiny(
            T.StableLmForCausalLM,
            T.StableLmConfig,
            num_key_value_heads=2,
            use_parallel_residual=True,
            **COMMON,
        )


class TestLlamaThroughGeneric(GenericConformance):
    def make_model(self) -> nn.Module:
        return tiny_llama()


class TestOLMo2(GenericConformance):
    """Post-norms only: x + post_attention_layernorm(self_attn(x)), x + post_feedforward_layernorm(mlp(x))."""

    def make_model(self) -> nn.Module:
        return _tiny(T.Olmo2ForCausalLM, T.Olmo2Config, num_key_value_heads=2, **COMMON)


class TestGranite(GenericConformance):
    """A constant multiplier on every branch: x + attn(ln(x)) * residual_multiplier."""

    def make_model(self) -> nn.Module:
        return _tiny(
            T.GraniteForCausalLM, T.GraniteConfig, num_key_value_heads=2, residual_multiplier=0.22, **COMMON
        )


class TestGemma2(GenericConformance):
    """Sandwich norms (a pre-norm and a post-norm on each branch), sliding-window attention narrower than
    the kit's inputs. Every layer slides: removing an attention sublayer from a stack of mixed layer types
    is refused by the core (its KV-cache slots would change type), so the kit's sublayer plans need one
    type; the mixed stack's block removal is checked below."""

    def make_model(self) -> nn.Module:
        return _tiny(
            T.Gemma2ForCausalLM,
            T.Gemma2Config,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention"] * 4,
            **COMMON,
        )


def test_gemma2_mixed_layer_types_block_removal() -> None:
    """Gemma 2 as configured by default (sliding and global layers alternating): blocks are removable."""
    kit = TestGemma2()
    kit.make_model = lambda: _tiny(  # type: ignore[method-assign]  # the default config, not the kit's
        T.Gemma2ForCausalLM, T.Gemma2Config, num_key_value_heads=2, head_dim=16, sliding_window=8, **COMMON
    )
    assert len(set(kit.make_model().config.layer_types)) == 2
    kit.test_block_removal_equals_skipped_block()
    kit.test_stream_write_matches_the_forward()


class TestGemma3(GenericConformance):
    """Sandwich norms, q/k norms, sliding-window and global attention."""

    def make_model(self) -> nn.Module:
        return _tiny(T.Gemma3ForCausalLM, T.Gemma3TextConfig, num_key_value_heads=2, head_dim=16, **COMMON)


class TestCohere(GenericConformance):
    """Parallel attention and MLP sharing one pre-norm (a LayerNorm without bias)."""

    def make_model(self) -> nn.Module:
        return _tiny(T.CohereForCausalLM, T.CohereConfig, num_key_value_heads=2, **COMMON)


# --- the discovered IR --------------------------------------------------------------------------------


def _branches(ir) -> list[tuple]:  # noqa: ANN001
    return [
        (s.id, s.kind, s.module, s.norm, s.output, s.uses_cache, s.out_proj, s.write) for s in ir.sublayers()
    ]


def test_post_norms_belong_to_the_branch_they_follow() -> None:
    """OLMo2 and Gemma 2 put a norm between each branch and its residual add: the branch is the attention
    (or MLP) module, the norm its post module, not a branch named after the norm."""
    olmo = TestOLMo2().make_model()
    ir = GenericAdapter().build_ir(olmo)
    p = "model.layers.0"
    assert _branches(ir)[:2] == [
        (
            "text.blocks.0.attn",
            "attention",
            f"{p}.self_attn",
            None,
            "tuple",
            True,
            f"{p}.self_attn.o_proj",
            StreamWrite(post="norm", modules=(f"{p}.post_attention_layernorm",)),
        ),
        (
            "text.blocks.0.mlp",
            "mlp",
            f"{p}.mlp",
            None,
            "tensor",
            False,
            f"{p}.mlp.down_proj",
            StreamWrite(post="norm", modules=(f"{p}.post_feedforward_layernorm",)),
        ),
    ]
    layer = olmo.model.layers[0]
    attn = ir.blocks()[0].sublayers[0]
    own = sum(p.numel() for m in (layer.self_attn, layer.post_attention_layernorm) for p in m.parameters())
    assert attn.params == own
    gemma = GenericAdapter().build_ir(TestGemma2().make_model())
    attn, mlp = gemma.blocks()[0].sublayers
    assert (attn.module, attn.norm, attn.write.modules) == (
        f"{p}.self_attn",
        f"{p}.input_layernorm",
        (f"{p}.post_attention_layernorm",),
    )
    assert (mlp.module, mlp.norm, mlp.write.modules) == (
        f"{p}.mlp",
        f"{p}.pre_feedforward_layernorm",
        (f"{p}.post_feedforward_layernorm",),
    )


def test_constant_branch_multiplier_is_the_write_scale() -> None:
    """Granite adds ``branch * residual_multiplier``: understood, and recorded as the write's scale."""
    ir = GenericAdapter().build_ir(TestGranite().make_model())
    assert {s.write for s in ir.sublayers()} == {StreamWrite(scale=0.22)}
    assert all(s.out_proj for s in ir.sublayers())


def test_removing_a_post_normed_branch_removes_its_post_norm() -> None:
    model = TestOLMo2().make_model()
    total = sum(p.numel() for p in model.parameters())
    ir = GenericAdapter().build_ir(model)
    attn = ir.blocks()[1].sublayers[0]
    TestOLMo2().prune(model, [attn.id])
    layer = model.model.layers[1]
    assert isinstance(layer.post_attention_layernorm, RemovedBranch)
    assert sum(p.numel() for p in model.parameters()) == total - attn.params


def _units(ir) -> list[tuple]:  # noqa: ANN001
    out = []
    for t in ir.towers:
        out.append((t.name, t.blocks_path, t.width, t.final_norm, t.head))
        out += [(st.id, st.kind, st.module, st.params, st.tied_to) for st in t.stages]
        for b in t.blocks:
            out.append((b.id, b.index, b.module, b.params))
            out += [
                (s.id, s.kind, s.module, s.norm, s.output, s.residual, s.params, s.uses_cache, s.removable)
                + (s.out_proj, s.write)
                for s in b.sublayers
            ]
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_generic_ir_of_llama_equals_the_llama_plugin(tied: bool) -> None:
    model = _tiny(
        T.LlamaForCausalLM, T.LlamaConfig, num_key_value_heads=2, tie_word_embeddings=tied, **COMMON
    )
    generic = GenericAdapter().build_ir(model)
    plugin = LlamaFamilyAdapter().build_ir(model)
    assert _units(generic) == _units(plugin)
    assert generic.total_params == plugin.total_params
    assert [u for u in generic.units()] == [u for u in plugin.units()]


def test_generic_ir_of_pruned_llama_equals_the_llama_plugin() -> None:
    """After surgery (blocks deleted, branches replaced) the remembered discovery still agrees."""
    model = tiny_llama()
    kit = TestLlamaThroughGeneric()
    kit.prune(model, ["text.blocks.0.attn", "text.blocks.1", "text.blocks.3.mlp"])
    assert _units(GenericAdapter().build_ir(model)) == _units(LlamaFamilyAdapter().build_ir(model))


def test_generic_ir_of_a_reloaded_checkpoint_is_rediscovered(tmp_path) -> None:  # noqa: ANN001
    from prunekit_core.io.checkpoint import load_pruned, save_pruned

    model = TestFalcon().make_model()
    TestFalcon().prune(model, ["text.blocks.0.mlp", "text.blocks.2"])
    loaded = load_pruned(save_pruned(model, tmp_path / "falcon"))
    assert not hasattr(loaded, "_prunekit_generic_layout")
    assert _units(GenericAdapter().build_ir(loaded)) == _units(GenericAdapter().build_ir(model))


def test_family_plugins_win_over_the_generic_adapter() -> None:
    model = tiny_llama()
    assert GenericAdapter().match(model) == MATCH_SCORE
    assert plugins.select_adapter(model).name == "llama"
    gpt2 = TestGPT2().make_model()
    assert plugins.select_adapter(gpt2).name == "generic"


def test_parallel_branches_share_one_residual_edge() -> None:
    ir = GenericAdapter().build_ir(TestGPTNeoX().make_model())
    attn, mlp = ir.blocks()[0].sublayers
    assert (attn.kind, mlp.kind) == ("attention", "mlp")
    assert attn.residual == mlp.residual
    falcon = GenericAdapter().build_ir(TestFalcon().make_model())
    attn, mlp = falcon.blocks()[0].sublayers
    assert attn.norm is None and mlp.norm is None, "Falcon's shared pre-norm must stay with the block"
    assert mlp.full_zero and not attn.full_zero


def test_opt_mlp_is_a_branch_of_sibling_modules() -> None:
    ir = GenericAdapter().build_ir(TestOPT().make_model())
    mlp = ir.blocks()[0].sublayers[1]
    assert (mlp.module, mlp.parts, mlp.norm) == (
        "model.decoder.layers.0.fc2",
        ("model.decoder.layers.0.fc1",),
        "model.decoder.layers.0.final_layer_norm",
    )


# --- patterns the generic adapter cannot read ------------------------------------------------------------


class _GatedBlock(nn.Module):
    """x + gate * mlp(norm(x)): the block scales the branch with its own parameter."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.gate = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.mlp(self.norm(x))


class _PlainBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mlp(x))


class _TinyLM(T.PreTrainedModel):
    config_class = T.PretrainedConfig

    def __init__(self, config: T.PretrainedConfig, block: type) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([block(config.hidden_size) for _ in range(config.num_hidden_layers)])
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _ResidualBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _custom(block: type, *, sequential: bool = False) -> nn.Module:
    config = T.PretrainedConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2)
    model = _TinyLM(config, block).eval()
    if sequential:  # blocks in an nn.Sequential: there is no list to delete them from
        model.layers = nn.Sequential(*model.layers)
    return model


@pytest.mark.parametrize(
    ("block", "pattern"),
    [
        (_GatedBlock, r"adds a value that layers.0 computes itself with `aten.mul.Tensor`"),
        (_PlainBlock, r"no residual addition x \+ f\(x\)"),
    ],
)
def test_unreadable_pattern_is_named(block: type, pattern: str) -> None:
    model = _custom(block)
    assert GenericAdapter().match(model) == MATCH_SCORE
    with pytest.raises(UnsupportedPatternError, match=pattern) as err:
        GenericAdapter().build_ir(model)
    assert "copy examples/prunekit-gptj" in str(err.value), "the fix must be a path that works"


def test_custom_residual_model_is_understood() -> None:
    """Control for the cases above: the same toy model with a plain pre-norm residual block works."""
    ir = GenericAdapter().build_ir(_custom(_ResidualBlock))
    assert [(s.id, s.module, s.norm) for s in ir.sublayers()] == [
        ("text.blocks.0.mlp", "layers.0.mlp", "layers.0.norm"),
        ("text.blocks.1.mlp", "layers.1.mlp", "layers.1.norm"),
    ]


def test_residual_added_inside_a_branch_module_is_named() -> None:
    """Bloom adds the residual inside its attention and MLP modules (they take it as an argument)."""
    model = _tiny(T.BloomForCausalLM, T.BloomConfig, vocab_size=128, hidden_size=64, n_layer=4, n_head=4)
    with pytest.raises(UnsupportedPatternError, match=r"happens inside transformer\.h\.0\.self_attention"):
        GenericAdapter().build_ir(model)


def test_blocks_outside_a_module_list_are_named() -> None:
    model = _custom(_ResidualBlock, sequential=True)
    assert GenericAdapter().match(model) is None  # no nn.ModuleList of num_hidden_layers blocks
    with pytest.raises(UnsupportedPatternError, match="is not inside a block of an nn.ModuleList"):
        GenericAdapter().build_ir(model)


def test_discovery_leaves_training_mode_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit_core.adapters import generic

    monkeypatch.setattr(generic, "_CACHE", type(generic._CACHE)())  # discover, do not recall
    model = TestGPT2().make_model().train()
    ir = GenericAdapter().build_ir(model)
    assert model.training and len(ir.sublayers()) == 8


def test_discovery_is_remembered_without_an_attribute_on_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The discovery is kept by the generic module, keyed by the modules: nothing is set on them, and a
    pruned model's IR is rebuilt from it without exporting again."""
    from prunekit_core.adapters import generic

    model = tiny_llama()
    before = [(name, sorted(vars(m))) for name, m in model.named_modules()]
    GenericAdapter().build_ir(model)
    assert [(name, sorted(vars(m))) for name, m in model.named_modules()] == before
    TestLlamaThroughGeneric().prune(model, ["text.blocks.0.attn", "text.blocks.1"])

    def no_export(_model: nn.Module) -> None:
        raise AssertionError("the discovery ran again")

    monkeypatch.setattr(generic, "_discover", no_export)
    monkeypatch.setattr(generic, "_CACHE", type(generic._CACHE)())  # not recalled by signature either
    assert _units(GenericAdapter().build_ir(model)) == _units(LlamaFamilyAdapter().build_ir(model))


# --- the kit catches wrong declarations of these families ------------------------------------------------


def _with_branches(kit: GenericConformance, fn) -> GenericConformance:  # noqa: ANN001
    """``kit`` with an adapter whose IR has every sublayer mapped by ``fn``."""

    class Wrong(GenericAdapter):
        def build_ir(self, model: nn.Module):  # noqa: ANN202
            ir = super().build_ir(model)
            tower = ir.towers[0]
            blocks = tuple(
                b.model_copy(update={"sublayers": tuple(fn(s) for s in b.sublayers)}) for b in tower.blocks
            )
            return ir.model_copy(update={"towers": (tower.model_copy(update={"blocks": blocks}),)})

    kit.adapter = Wrong()
    return kit


def _as_post_norm_branches(s):  # noqa: ANN001, ANN202
    """OLMo2 as the generic adapter described it before: two branches named after the post-norms."""
    norm = s.write.modules[-1]
    return s.model_copy(
        update={
            "id": s.id.rpartition(".")[0] + "." + norm.rpartition(".")[2],
            "kind": "mlp",
            "module": norm,
            "output": "tensor",
            "uses_cache": False,
            "out_proj": None,
            "write": StreamWrite(),
            "params": 64,
        }
    )


def test_kit_catches_olmo2_described_by_its_post_norms() -> None:
    kit = _with_branches(TestOLMo2(), _as_post_norm_branches)
    kit.test_branch_removal_equals_zeroed_branch()  # zeroing a post-norm removes its branch: silent
    with pytest.raises(AssertionError) as err:
        kit.test_branches_own_their_modules()
    message = str(err.value)
    assert (
        "block text.blocks.0: model.layers.0.self_attn (Olmo2Attention, 12384 parameters) holds a KV-cache slot"
        in message
    )
    assert 'BranchSpec(module="self_attn", kind="attention", output="tuple", uses_cache=True)' in message
    assert (
        "branch text.blocks.0.post_attention_layernorm (model.layers.0.post_attention_layernorm) holds only norm "
        "weights (64 of the block's" in message
    )


def test_kit_catches_an_undeclared_multiplier() -> None:
    kit = _with_branches(TestGranite(), lambda s: s.model_copy(update={"write": StreamWrite()}))
    with pytest.raises(
        AssertionError,
        match=r"branch text\.blocks\.0\.attn: its output reaches the stream "
        r"multiplied by 0\.22, but it declares scale=1\.0: declare the multiplier",
    ):
        kit.test_stream_write_matches_the_forward()


def test_kit_catches_an_undeclared_post_norm() -> None:
    kit = _with_branches(TestGemma2(), lambda s: s.model_copy(update={"write": StreamWrite()}))
    with pytest.raises(
        AssertionError,
        match=r"branch text\.blocks\.0\.attn: a change to the output of model\.layers\.0\.self_attn\.o_proj does "
        r"not reach the residual add linearly .* a post-norm as BranchSpec\(post=\(\"NORM\",\)\)",
    ):
        kit.test_stream_write_matches_the_forward()


def test_kit_catches_a_post_norm_that_is_not_there() -> None:
    kit = _with_branches(
        TestLlamaThroughGeneric(),
        lambda s: s.model_copy(update={"write": StreamWrite(post="norm", modules=(s.norm,))}),
    )
    with pytest.raises(
        AssertionError,
        match=r"branch text\.blocks\.0\.attn declares a post-norm .* reaches the residual add unchanged",
    ):
        kit.test_stream_write_matches_the_forward()
