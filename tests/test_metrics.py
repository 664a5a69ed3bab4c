"""Built-in metrics against independent computations from the model's own hidden states and losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from transformers import LlamaForCausalLM

import prunekit_core as pk


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(layers=4, tied=False)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 60, (10, 12), generator=torch.Generator().manual_seed(3))


def _streams(model, windows):
    """Residual stream at every block boundary, the last one taken before the final norm."""
    pre_norm = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: pre_norm.__setitem__("x", a[0]))
    with torch.no_grad():
        hs = list(model(input_ids=windows, output_hidden_states=True).hidden_states)
    h.remove()
    return hs[:-1] + [pre_norm["x"]]


def test_block_influence_matches_hidden_states(model, windows) -> None:
    cal = pk.calibrate(model, windows, batch_size=3)  # batches must not change the statistics
    bi = pk.score(model, cal, "bi").values
    xs = _streams(model, windows)
    for i in range(4):
        ref = 1 - F.cosine_similarity(xs[i], xs[i + 1], dim=-1).double().mean().item()
        assert bi[f"text.blocks.{i}"] == pytest.approx(ref, abs=1e-6)


def test_angular_distance_matches_last_token(model, windows) -> None:
    cal = pk.calibrate(model, windows)
    xs = _streams(model, windows)
    for n in (1, 2):
        ang = pk.score(model, cal, "angular", span=n).values
        assert set(ang) == {f"text.blocks.{i}" for i in range(4 - n + 1)}
        for i in range(4 - n + 1):
            cos = F.cosine_similarity(xs[i][:, -1], xs[i + n][:, -1], dim=-1).clamp(-1, 1)
            assert ang[f"text.blocks.{i}"] == pytest.approx(
                (torch.arccos(cos) / math.pi).mean().item(), abs=1e-5
            )


def test_sublayer_drop_is_zero_for_a_silent_branch_and_matches_the_stream(model, windows) -> None:
    cal = pk.calibrate(model, windows)
    scores = pk.score(model, cal, "sublayer_drop").values
    xs = _streams(model, windows)
    mid = {}
    h = model.model.layers[1].post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: mid.__setitem__("x", a[0])
    )
    with torch.no_grad():
        model(input_ids=windows)  # the stream between block 1's attention and its MLP
    h.remove()
    ref_attn = 1 - F.cosine_similarity(xs[1], mid["x"], dim=-1).double().mean().item()
    ref_mlp = 1 - F.cosine_similarity(mid["x"], xs[2], dim=-1).double().mean().item()
    assert scores["text.blocks.1.attn"] == pytest.approx(ref_attn, abs=1e-6)
    assert scores["text.blocks.1.mlp"] == pytest.approx(ref_mlp, abs=1e-6)

    torch.manual_seed(0)
    silent = LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        silent.model.layers[2].mlp.down_proj.weight.zero_()
    zero = pk.score(silent, pk.calibrate(silent, windows), "sublayer_drop").values["text.blocks.2.mlp"]
    assert zero == pytest.approx(0.0, abs=1e-6)


def test_nri_matches_a_zeroed_branch_loss(model, windows) -> None:
    cal = pk.calibrate(model, windows)
    unit = "text.blocks.2.attn"
    nri = pk.score(model, cal, "nri", candidates=[unit]).values[unit]
    trial = windows[:8]  # ScoringContext defaults: 8 trial windows, loss on every 4th position

    def loss(zero_attn: bool) -> float:
        hook = None
        if zero_attn:
            hook = model.model.layers[2].self_attn.o_proj.register_forward_hook(
                lambda m, a, o: torch.zeros_like(o)
            )
        with torch.no_grad():
            logits = model(input_ids=trial).logits[:, :-1][:, ::4]
        if hook:
            hook.remove()
        labels = trial[:, 1:][:, ::4]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()

    params = pk.inspect(model).units()[unit].params
    assert nri == pytest.approx((math.exp(loss(True) - loss(False)) - 1) / params, rel=1e-3, abs=1e-9)
