"""Property-based tests (hypothesis): random valid plans on tiny models of every installed plugin.

For each family a plan is drawn from the model's IR: some whole blocks, some branches of the blocks that
remain, some channel groups (KV heads, FFN channels) and some experts of MoE layers, with either ``top_k``
policy. Every drawn plan must

* apply, and the pruned model must run a forward pass with finite logits of the right shape;
* remove exactly the parameters the plan accounts for (unit parameters + ``width_removed_params``, which
  counts once the crossing of two families that slice one tensor, e.g. experts and expert channels);
* save and reload (``save_pruned`` / ``load_pruned``) to a model with the same logits.

Runs are derandomized (the same examples on every run, for stable CI) and small (a few examples per family).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prunekit_llama import LlamaFamilyAdapter
from torch import nn

from prunekit_core.adapters.base import ArchitectureAdapter
from prunekit_core.adapters.generic import GenericAdapter
from prunekit_core.io.checkpoint import load_pruned, read_plan, save_pruned
from prunekit_core.ir.model import ModelIR
from prunekit_core.ir.plan import PrunePlan, fingerprint
from prunekit_core.surgery.apply import apply_plan, removed_params, resolve_removals
from prunekit_core.surgery.width import resolve_width, width_removed_params

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
SMALL["max_position_embeddings"] = 64


@dataclass(frozen=True)
class Family:
    make: Callable[[], nn.Module]
    adapter: Callable[[], ArchitectureAdapter]
    configure_loaded: Callable[[nn.Module], nn.Module] = lambda m: m


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return make


def _eager_experts(model: nn.Module) -> nn.Module:
    model.set_experts_implementation("eager")
    return model


def _families() -> dict[str, Family]:
    fams = {
        "llama": Family(
            _seeded(lambda: T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=48, **SMALL))),
            LlamaFamilyAdapter,
        ),
        "mistral": Family(
            _seeded(lambda: T.MistralForCausalLM(T.MistralConfig(intermediate_size=48, **SMALL))),
            LlamaFamilyAdapter,
        ),
        "qwen2": Family(
            _seeded(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=48, **SMALL))),
            LlamaFamilyAdapter,
        ),
        "generic-gpt2": Family(
            _seeded(
                lambda: T.GPT2LMHeadModel(
                    T.GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64)
                )
            ),
            GenericAdapter,
        ),
    }
    try:
        from prunekit_mixtral import MoEAdapter
    except ImportError:  # pragma: no cover - the plugin is installed by scripts/setup.sh
        pass
    else:
        fams["mixtral"] = Family(
            _seeded(
                lambda: _eager_experts(
                    T.MixtralForCausalLM(
                        T.MixtralConfig(
                            intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **SMALL
                        )
                    )
                )
            ),
            MoEAdapter,
            _eager_experts,
        )
        fams["qwen2-moe"] = Family(
            _seeded(
                lambda: _eager_experts(
                    T.Qwen2MoeForCausalLM(
                        T.Qwen2MoeConfig(
                            intermediate_size=48,
                            moe_intermediate_size=16,
                            shared_expert_intermediate_size=24,
                            num_experts=5,
                            num_experts_per_tok=2,
                            mlp_only_layers=[1],
                            **SMALL,
                        )
                    )
                )
            ),
            MoEAdapter,
            _eager_experts,
        )
    try:
        from prunekit_gptj import GptjAdapter
    except ImportError:  # pragma: no cover
        pass
    else:
        fams["gptj"] = Family(
            _seeded(
                lambda: T.GPTJForCausalLM(
                    T.GPTJConfig(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64, rotary_dim=4)
                )
            ),
            GptjAdapter,
        )
    return fams


FAMILIES = _families()
IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@st.composite
def plans(draw: st.DrawFn, ir: ModelIR) -> tuple[list[str], dict[str, list[int]], str]:
    """A valid random plan for ``ir``: (units to remove, channel groups to remove, top_k policy)."""
    blocks = [b for b in ir.blocks() if b.removable]
    order = draw(st.permutations(blocks))
    n_gone = draw(st.integers(0, len(blocks) - 1))
    gone, kept = order[:n_gone], order[n_gone:]
    remove = [b.id for b in gone]
    narrowed_subs: set[str] = set()
    for block in kept[1:]:  # kept[0] keeps every branch, so no tower loses all its blocks
        for sub in block.sublayers:
            if sub.removable and draw(st.booleans()):
                remove.append(sub.id)
                narrowed_subs.add(sub.id)  # removed whole: never narrowed too
    policy = draw(st.sampled_from(["error", "clamp"]))
    groups: dict[str, list[int]] = {}
    for block in kept:
        for sub in block.sublayers:
            if sub.id in narrowed_subs:
                continue
            # experts and the channels inside them may both be cut in one sublayer: they cross in the
            # fused expert tensors, which width_removed_params counts once
            for fam in sub.channel_groups:
                if not draw(st.booleans()):
                    continue
                floor = 1
                if fam.top_k is not None and policy == "error":
                    floor = fam.top_k.value
                live_options = [n for n in range(floor, fam.count) if n % fam.multiple_of == 0]
                if not live_options:
                    continue
                live = draw(st.sampled_from(live_options))
                picked = draw(st.permutations(range(fam.count)))[: fam.count - live]
                groups[fam.id] = sorted(picked)
    return remove, groups, policy


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_plan_applies_accounts_and_round_trips(family: str, data: st.DataObject) -> None:
    fam = FAMILIES[family]
    adapter = fam.adapter()
    model = fam.make()
    ir = adapter.build_ir(model)
    remove, groups, policy = data.draw(plans(ir), label="plan")
    before = n_params(model)
    plan = PrunePlan(
        fingerprint=fingerprint(model, ir), remove=remove, remove_groups=groups, top_k_policy=policy
    )
    resolved = resolve_removals(ir, remove)
    cuts = resolve_width(ir, groups, removed_units=resolved.blocks | resolved.sublayers, top_k_policy=policy)
    expected = removed_params(ir, resolved) + width_removed_params(model, cuts)
    if len({m.param for c in cuts.values() for m in c.family.members}) == sum(
        len({m.param for m in c.family.members}) for c in cuts.values()
    ):  # no tensor shared by two families: the per-family counts add up
        assert expected == removed_params(ir, resolved) + sum(c.removed_params for c in cuts.values())

    applied = apply_plan(model, plan, adapter=adapter)

    out = logits(model)
    assert out.shape == (*IDS.shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(out).all()
    assert before - n_params(model) == expected, (
        f"plan accounts for {expected} removed parameters, surgery removed {before - n_params(model)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_pruned(model, Path(tmp) / "ckpt", plan=applied.plan)
        loaded = fam.configure_loaded(load_pruned(saved))
        saved_plan = read_plan(saved)
    torch.testing.assert_close(logits(loaded), out, rtol=1e-5, atol=1e-5)
    assert n_params(loaded) == n_params(model)
    assert saved_plan is not None and saved_plan.remove == remove and saved_plan.remove_groups == groups


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from helpers import tiny_pruned, tiny_tokenizer

    folder = save_pruned(tiny_pruned(), tmp_path_factory.mktemp("ckpt") / "ckpt", tokenizer=tiny_tokenizer())
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_truncated_file_is_refused(checkpoint_bytes: dict[str, bytes], data: st.DataObject) -> None:
    """Cut any file of a checkpoint at any length: loading refuses it with a CheckpointError that names
    the file, never loads it and never fails with another exception."""
    from prunekit_core.ir.errors import CheckpointError

    name = data.draw(st.sampled_from(sorted(checkpoint_bytes)), label="file")
    raw = checkpoint_bytes[name]
    keep = data.draw(st.integers(0, len(raw) - 1), label="bytes kept")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        for n, b in checkpoint_bytes.items():
            (folder / n).write_bytes(raw[:keep] if n == name else b)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_pruned(folder)
