"""A conformance suite for architecture plugins.

Subclass :class:`AdapterConformance` in your plugin's tests, set ``adapter`` and implement ``make_model``
(a tiny, seeded, randomly initialised model in eval mode; a fresh one on every call)::

    class TestMyFamily(AdapterConformance):
        adapter = MyFamilyAdapter()

        def make_model(self):
            torch.manual_seed(0)
            return MyForCausalLM(MyConfig(hidden_size=64, num_hidden_layers=4, ...)).eval()

pytest collects every ``test_*`` method for the subclass. Each test compares the adapter's surgery with a
reference computed without it: a removed branch must equal the unpruned model with that branch's output
forced to zero by a forward hook, a removed block must equal the model with that block bypassed by a
hook, and cached token-by-token decoding must equal one full forward. Only ``tmp_path`` is taken as a
fixture, so a test can also be called directly (``TestMyFamily().test_config_consistent()``), which is how
prunekit proves that the suite catches broken adapters.

Models need at least three removable blocks. Override :meth:`block_removals` and :meth:`mixed_removal`
to choose other units.

A check the adapter knowingly does not pass is declared, with the reason, in ``expected_failures``; it
runs as a strict expected failure, so the declaration goes stale loudly when the check starts passing::

    class TestMyFamily(AdapterConformance):
        expected_failures = {"test_left_padded_generate": "the model ignores attention_mask"}

Every registered importance metric must score every unit of its kind with a finite number
(``test_metrics_finite_on_every_unit``).

Plugins that declare channel groups (width pruning) also get the ``test_width_*`` checks: narrowing a
family equals zeroing every member slice of the removed groups (a group whose weights are all zero
contributes nothing), cached decoding of a narrowed model equals its full forward, the config of a
uniformly narrowed model rebuilds it exactly and plain ``from_pretrained`` reloads it, per-layer widths
reload through ``load_pruned``, and removing every group of a family is refused. Override
:meth:`width_removals` to choose other groups. Models without channel groups skip these checks.

Plugins that declare channel groups on stages (conv necks, conv projectors: ``Stage.channel_groups``) get
the ``test_stage_*`` checks: narrowing each family drops the IR and parameter counts by exactly its groups
and, unless the family is listed in ``normalised_stage_families`` (a norm over the channels follows, so
the plugin tests it against a narrower forward instead), equals zeroing its groups' member slices; cached
decoding equals the full forward; the narrowed model round-trips. Override :meth:`stage_width_removals` to choose other groups and :meth:`stage_width_plans` to
round-trip a cut the config describes.

Plugins that declare routed families (MoE experts: a family with a ``router``) also get the
``test_expert_*`` checks: removing experts equals the unpruned model with their router logits forced to
-inf (:func:`~prunekit_core.routing.router_rows_masked`), cached decoding equals the full forward, uniform
expert counts reload with plain ``from_pretrained`` and per-layer counts with ``load_pruned``, removing
every expert is refused, and leaving fewer than ``top_k`` is refused unless the plan clamps ``top_k``.
Override :meth:`expert_removals` to choose other experts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from .adapter import (
    ArchitectureAdapter,
    from_pretrained_with_info,
    get_module,
    hf_config,
    iter_modules,
    module_attr,
)
from .errors import PlanError, PlanMismatchError
from .ir import ModelIR
from .plan import PrunePlan, fingerprint
from .surgery import apply_plan, branch_paths

__all__ = ["AdapterConformance", "word_tokenizer"]


class AdapterConformance:
    """Conformance tests every architecture adapter must pass. Subclass it; see the module docstring."""

    #: the adapter under test (an instance)
    adapter: ArchitectureAdapter
    #: token ids are drawn below this; ``None`` reads ``config.vocab_size``
    vocab_size: int | None = None
    #: length of the test sequences; make it longer than any sliding window of the model
    seq_len: int = 16
    #: absolute tolerance for comparisons that go through different kernels (cache vs full forward)
    atol: float = 1e-5

    def make_model(self) -> nn.Module:
        """A fresh, tiny, seeded model in eval mode (the same weights on every call)."""
        raise NotImplementedError("subclasses of AdapterConformance must implement make_model()")

    #: checks this adapter knowingly does not pass: test name -> why. Each is run as a *strict* expected
    #: failure: the suite fails if the check unexpectedly passes, or if the name is not a check.
    expected_failures: dict[str, str] = {}

    @pytest.fixture(autouse=True)
    def _expected_failures(self, request: pytest.FixtureRequest) -> None:
        checks = {n for n in dir(AdapterConformance) if n.startswith("test_")}
        unknown = sorted(set(self.expected_failures) - checks)
        if unknown:
            pytest.fail(
                f"{type(self).__name__}.expected_failures names {unknown}, which are not conformance checks; "
                f"the checks are: {', '.join(sorted(checks))}"
            )
        reason = self.expected_failures.get(request.node.originalname or request.node.name)
        if reason is not None:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))

    @pytest.fixture(autouse=True)
    def _one_thread(self) -> Iterator[None]:
        # tiny models run many times faster on one thread: intra-op threading costs more than it saves
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def configure_loaded(self, model: nn.Module) -> nn.Module:
        """Make a model reloaded from disk run the kernels :meth:`make_model`'s do (default: as loaded).

        Round trips compare logits exactly, and a reload picks the library's default kernels (e.g. the
        experts implementation of an MoE model): override this when ``make_model`` chooses others.
        """
        return model

    # helpers ---------------------------------------------------------------------------------------

    def model_inputs(self, model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further forward inputs for the token ids ``ids`` (default none).

        A multimodal plugin returns e.g. ``{"pixel_values": ...}`` (batched like ``ids``) and overrides
        :meth:`input_ids` to place the image tokens; every forward of the kit, the prefill of cached decoding
        and ``generate`` get them, so the vision tower's surgery is checked through the logits.
        """
        return {}

    def _logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return _logits(model, ids, self.model_inputs(model, ids))

    def _cached_logits(self, model: nn.Module, ids: torch.Tensor, prefill: int) -> list[torch.Tensor]:
        return _cached_logits(model, ids, prefill, self.model_inputs(model, ids))

    def _greedy(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad: int) -> Any:
        return _greedy(model, ids, mask, pad, self.model_inputs(model, ids))

    def tower_configs(self, model: nn.Module) -> dict[str, Any]:
        """Tower name -> config whose ``num_hidden_layers`` counts that tower's blocks.

        The adapter's ``tower_configs`` when it has one, else the text config for its text tower.
        """
        own = getattr(self.adapter, "tower_configs", None)
        if callable(own):
            configs: dict[str, Any] = own(model)
            return configs
        ir = self.adapter.build_ir(model)
        return {getattr(self.adapter, "text_tower", ir.towers[0].name): _text_config(model)}

    def input_ids(
        self, model: nn.Module, *, batch: int = 2, length: int | None = None, seed: int = 0
    ) -> torch.Tensor:
        """Deterministic random token ids, ``[batch, length]``."""
        vocab = self.vocab_size or _text_config(model).vocab_size
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (batch, length or self.seq_len), generator=gen)

    def block_removals(self, ir: ModelIR) -> list[list[str]]:
        """Block sets to test: each removable block alone, then two non-adjacent blocks together."""
        blocks = [b.id for b in ir.blocks() if b.removable]
        sets = [[b] for b in blocks]
        if len(blocks) >= 4:
            sets.append([blocks[1], blocks[3]])
        return sets

    def mixed_removal(self, ir: ModelIR) -> list[str]:
        """A plan mixing granularities: the cache-using branch of the first block, the whole second block
        and a cache-free branch of the last block (so every later KV-cache index has to shift)."""
        blocks = [b for b in ir.blocks() if b.removable and len(b.sublayers) >= 2]
        assert len(blocks) >= 3, "the conformance model needs at least 3 blocks with 2+ sublayers each"
        first, second, last = blocks[0], blocks[1], blocks[-1]
        first_sub = next((s for s in first.sublayers if s.uses_cache), first.sublayers[0])
        last_sub = next((s for s in reversed(last.sublayers) if not s.uses_cache), last.sublayers[-1])
        return [first_sub.id, second.id, last_sub.id]

    def block_plan(self, ir: ModelIR) -> list[str]:
        """A block-only (uniform) plan: the last of :meth:`block_removals`."""
        return self.block_removals(ir)[-1]

    def prune(
        self, model: nn.Module, remove: list[str], groups: dict[str, list[int]] | None = None
    ) -> nn.Module:
        """Apply a plan made for ``model`` in place, through the public path (fingerprint checked)."""
        ir = self.adapter.build_ir(model)
        plan = PrunePlan(fingerprint=fingerprint(model, ir), remove=list(remove), remove_groups=groups or {})
        return apply_plan(model, plan, adapter=self.adapter)

    def width_removals(self, ir: ModelIR, *, uniform: bool) -> dict[str, list[int]]:
        """Groups to remove. Uniform: the first and last group of every family with 3+ groups (one group
        of a 2-group family); per-layer: the same, but only in the families of the first block that has any."""
        fams = ir.channel_groups()
        with_groups = [b for b in ir.blocks() if any(s.channel_groups for s in b.sublayers)]
        first = (with_groups or ir.blocks())[0].id + "."  # the first block that has channel groups
        out: dict[str, list[int]] = {}
        for fid, (_sub, fam) in fams.items():
            if fam.count < 2 or fam.router or (not uniform and not fid.startswith(first)):
                continue  # routed families (experts) have their own reference: see expert_removals
            step = fam.multiple_of
            if step > 1:  # an aligned family: half a step from each end
                if fam.count <= step:
                    continue
                out[fid] = list(range((step + 1) // 2)) + list(range(fam.count - step // 2, fam.count))
                continue
            out[fid] = [0, fam.count - 1] if fam.count >= 3 else [fam.count - 1]
        return out

    def expert_removals(self, ir: ModelIR, *, uniform: bool) -> dict[str, list[int]]:
        """Experts to remove while keeping ``top_k``. Uniform: the first expert of every routed family;
        per-layer: the first and last expert of the first routed family (one if only ``top_k + 1`` are
        there), nothing elsewhere."""
        out: dict[str, list[int]] = {}
        for fid, fam in _routed(ir).items():
            spare = fam.count - (fam.top_k.value if fam.top_k else 1)
            if spare < 1:
                continue
            if uniform:
                out[fid] = [0]
            elif not out:
                out[fid] = [0, fam.count - 1] if spare >= 2 else [0]
        return out

    def _width_model(self) -> tuple[nn.Module, ModelIR]:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        if not any(f.count >= 2 and not f.router for _s, f in ir.channel_groups().values()):
            pytest.skip(f"{self.adapter.name} declares no channel group family with 2+ groups for this model")
        return model, ir

    def _expert_model(self) -> tuple[nn.Module, ModelIR]:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        if not self.expert_removals(ir, uniform=True):
            pytest.skip(f"{self.adapter.name} declares no routed family (experts) with one to spare")
        return model, ir

    # tests -----------------------------------------------------------------------------------------

    def test_adapter_matches(self) -> None:
        from . import plugins

        model = self.make_model()
        assert self.adapter.match(model) is not None, f"{self.adapter.name} does not match its own model"
        registered = plugins.adapters().get(self.adapter.name)
        if registered is None or type(registered) is not type(self.adapter):
            return  # not installed through an entry point (e.g. a test-only adapter): nothing to select
        chosen = plugins.select_adapter(model)
        assert chosen is registered, f"select_adapter chose {chosen.name!r}, expected {self.adapter.name!r}"

    def test_ir_covers_every_parameter(self) -> None:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        params = dict(model.named_parameters())  # shared (tied) tensors appear once
        total = sum(p.numel() for p in params.values())
        assert ir.total_params == total, f"IR total_params {ir.total_params} != model's {total}"

        owners: dict[str, list[str]] = {name: [] for name in params}
        for tower in ir.towers:
            for unit_id, path in [(b.id, b.module) for b in tower.blocks] + [
                (s.id, s.module) for s in tower.stages
            ]:
                for name in _params_under(params, path):
                    owners[name].append(unit_id)
        unowned = [n for n, o in owners.items() if not o]
        shared = {n: o for n, o in owners.items() if len(o) > 1}
        assert not unowned, f"parameters in no block or stage: {unowned[:5]}"
        assert not shared, f"parameters in more than one block/stage: {dict(list(shared.items())[:5])}"

        for tower in ir.towers:
            for st in tower.stages:
                own = _numel(params, _params_under(params, st.module))
                assert st.params == own, f"stage {st.id} declares {st.params} params, its module has {own}"
            for b in tower.blocks:
                own = _numel(params, _params_under(params, b.module))
                assert b.params == own, f"block {b.id} declares {b.params} params, its module has {own}"
                assert (
                    get_module(model, b.module)
                    is list(iter_modules(get_module(model, tower.blocks_path)))[b.index]
                )
                sub_total = 0
                for s in b.sublayers:
                    assert s.module.startswith(b.module + "."), f"{s.id} lives outside its block"
                    names = {n for p in branch_paths(s) for n in _params_under(params, p)}
                    own = _numel(params, names)
                    assert s.params == own, f"sublayer {s.id} declares {s.params} params, it has {own}"
                    sub_total += s.params
                assert sub_total <= b.params, f"sublayers of {b.id} hold more params than the block"
        block_sum = sum(b.params for b in ir.blocks())
        stage_sum = sum(st.params for t in ir.towers for st in t.stages)
        assert block_sum + stage_sum == total, (
            f"blocks ({block_sum}) + stages ({stage_sum}) != all parameters ({total})"
        )

        ids = [u for t in ir.towers for u in [b.id for b in t.blocks] + [s.id for s in t.stages]]
        ids += [s.id for s in ir.sublayers()]
        ids += [g.id for s in ir.sublayers() for g in s.channel_groups]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        assert not dupes, f"unit ids are not unique: {dupes}"

        tensors = {**dict(model.named_buffers()), **params}
        for _owner, g in ir.all_channel_groups().values():
            assert g.count > 0, f"{g.id} has no groups"
            spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
            per_group = 0
            for m in g.members:
                assert m.param in tensors, f"{g.id} names {m.param!r}, which is not a parameter or buffer"
                shape = tensors[m.param].shape
                assert 0 <= m.axis < len(shape), f"{g.id}: {m.param} has no axis {m.axis}"
                spans.setdefault((m.param, m.axis), []).append((m.offset, m.offset + g.count * m.width))
                if m.param in params:  # a buffer (running statistics) is sliced but holds no parameters
                    per_group += m.width * params[m.param].numel() // shape[m.axis]
            for (pname, axis), ranges in spans.items():
                ranges.sort()
                dim = tensors[pname].shape[axis]
                covered = ranges[0][0] == 0 and ranges[-1][1] == dim
                covered = covered and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
                assert covered, (
                    f"{g.id}: {g.count} groups of {pname} cover {ranges} along axis {axis}, "
                    f"but that axis has {dim} entries"
                )
            assert g.params_per_group == per_group, (
                f"{g.id} declares {g.params_per_group} params per group, its members hold {per_group}"
            )

    def test_prune_nothing_changes_nothing(self) -> None:
        model = self.make_model()
        ids = self.input_ids(model)
        before = self._logits(model, ids)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        self.prune(model, [])
        assert torch.equal(self._logits(model, ids), before), "an empty plan changed the logits"
        after = model.state_dict()
        assert after.keys() == state.keys(), "an empty plan changed the state dict"
        assert all(torch.equal(after[k], v) for k, v in state.items())

    def test_branch_removal_equals_zeroed_branch(self) -> None:
        model = self.make_model()
        ids = self.input_ids(model)
        ir = self.adapter.build_ir(model)
        mixed = [u for u in self.mixed_removal(ir) if u in {s.id for s in ir.sublayers()}]
        removable = [s for s in ir.sublayers() if s.removable]
        cases = [[s.id] for s in removable] + [mixed]
        subs = {s.id: s for s in ir.sublayers()}
        total = _numel(dict(model.named_parameters()))
        for case in cases:
            reference = copy.deepcopy(model)
            with _zeroed(reference, [subs[u].module for u in case]):
                want = self._logits(reference, ids)
            pruned = copy.deepcopy(model)
            self.prune(pruned, case)
            torch.testing.assert_close(
                self._logits(pruned, ids), want, atol=1e-6, rtol=0, msg=_prefixed(f"removing {case}: ")
            )
            gone = 0
            named = dict(model.named_parameters())
            for u in case:
                names = {n for p in branch_paths(subs[u]) for n in _params_under(named, p)}
                gone += _numel(named, names)
            left = _numel(dict(pruned.named_parameters()))
            assert left == total - gone, f"removing {case} left {left} params, expected {total - gone}"

    def test_block_removal_equals_skipped_block(self) -> None:
        model = self.make_model()
        ids = self.input_ids(model)
        ir = self.adapter.build_ir(model)
        blocks = {b.id: b for b in ir.blocks()}
        total = _numel(dict(model.named_parameters()))
        for case in self.block_removals(ir):
            reference = copy.deepcopy(model)
            with _skipped(reference, [blocks[u].module for u in case]):
                want = self._logits(reference, ids)
            pruned = copy.deepcopy(model)
            self.prune(pruned, case)
            torch.testing.assert_close(
                self._logits(pruned, ids), want, atol=1e-6, rtol=0, msg=_prefixed(f"removing {case}: ")
            )
            named = dict(model.named_parameters())
            gone = sum(_numel(named, _params_under(named, blocks[u].module)) for u in case)
            left = _numel(dict(pruned.named_parameters()))
            assert left == total - gone, f"removing {case} left {left} params, expected {total - gone}"

    def test_config_consistent(self) -> None:
        probe = self.make_model()
        ir = self.adapter.build_ir(probe)
        for remove, uniform in ((self.block_plan(ir), True), (self.mixed_removal(ir), False)):
            model = self.make_model()
            configs = self.tower_configs(model)
            lists_before: dict[str, dict[str, list[Any]]] = {}
            for name, config in configs.items():
                n_before = config.num_hidden_layers
                lists_before[name] = {
                    k: list(v)
                    for k, v in vars(config).items()
                    if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == n_before
                }
            self.prune(model, remove)
            removed = {u for u in remove if u in {b.id for b in ir.blocks()}}
            configs = self.tower_configs(model)
            for tower in ir.towers:
                if tower.name not in configs:
                    continue
                kept = [b.index for b in tower.blocks if b.id not in removed]
                config = configs[tower.name]
                stack = list(iter_modules(get_module(model, tower.blocks_path)))
                assert len(stack) == len(kept), (
                    f"{tower.name}: {len(stack)} blocks left, expected {len(kept)}"
                )
                assert config.num_hidden_layers == len(kept), (
                    f"after removing {remove}: {tower.name} config.num_hidden_layers={config.num_hidden_layers}, "
                    f"but {len(kept)} blocks remain"
                )
                if tower.name == getattr(self.adapter, "text_tower", ir.towers[0].name):
                    outer = model.config
                    if outer is not config and hasattr(outer, "num_hidden_layers") and len(configs) == 1:
                        assert outer.num_hidden_layers == len(kept), "outer config.num_hidden_layers is stale"
                for key, old in lists_before[tower.name].items():
                    new = getattr(config, key)
                    assert list(new) == [old[i] for i in kept], f"config.{key}={new}, expected it sliced"
            rebuilt = self.adapter.build_ir(model)
            assert len(rebuilt.blocks()) == len(ir.blocks()) - len(removed)
            assert rebuilt.total_params == _numel(dict(model.named_parameters()))
            if uniform:
                fresh = type(model)(copy.deepcopy(model.config))
                assert _numel(dict(fresh.named_parameters())) == _numel(dict(model.named_parameters())), (
                    "a model built from the pruned config has a different parameter count"
                )

    def test_cached_generation_matches_full_forward(self) -> None:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        self.prune(model, self.mixed_removal(ir))
        ids = self.input_ids(model)
        full = self._logits(model, ids)
        prefill = max(1, ids.shape[1] // 2)
        for step, got in enumerate(self._cached_logits(model, ids, prefill)):
            pos = prefill - 1 + step
            torch.testing.assert_close(
                got,
                full[:, pos],
                atol=self.atol,
                rtol=0,
                msg=_prefixed(f"cached logits at position {pos} differ from the full forward: "),
            )

    def test_left_padded_generate(self) -> None:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        self.prune(model, self.mixed_removal(ir))
        short = self.input_ids(model, batch=1, length=5, seed=1)
        long = self.input_ids(model, batch=1, length=9, seed=2)
        pad = 0
        batch = torch.full((2, 9), pad, dtype=torch.long)
        mask = torch.zeros((2, 9), dtype=torch.long)
        batch[0, 4:], mask[0, 4:] = short[0], 1
        batch[1], mask[1] = long[0], 1
        got = self._greedy(model, batch, mask, pad)
        for row, prompt in enumerate((short, long)):
            alone = self._greedy(model, prompt, torch.ones_like(prompt), pad)
            assert torch.equal(got.sequences[row, 9:], alone.sequences[0, prompt.shape[1] :]), (
                f"row {row} of a left-padded batch generated {got.sequences[row, 9:].tolist()}, "
                f"alone it generates {alone.sequences[0, prompt.shape[1] :].tolist()}"
            )
            for step, (a, b) in enumerate(zip(got.scores, alone.scores, strict=True)):
                torch.testing.assert_close(
                    a[row],
                    b[0],
                    atol=1e-4,
                    rtol=0,
                    msg=_prefixed(f"row {row}, step {step}: padded scores differ: "),
                )

    def test_save_reload_roundtrip(self, tmp_path: Path) -> None:
        from .checkpoint import load_pruned, save_pruned

        probe = self.make_model()
        ir = self.adapter.build_ir(probe)
        ids = self.input_ids(probe)
        mask = torch.ones_like(ids)

        model = self.prune(self.make_model(), self.mixed_removal(ir))
        out = save_pruned(model, tmp_path / "mixed")
        loaded = self.configure_loaded(load_pruned(out))
        torch.testing.assert_close(self._logits(loaded, ids), self._logits(model, ids), atol=0, rtol=0)
        assert torch.equal(
            self._greedy(loaded, ids, mask, 0).sequences, self._greedy(model, ids, mask, 0).sequences
        )
        for a, b in zip(self._cached_logits(loaded, ids, 4), self._cached_logits(model, ids, 4), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        plan = getattr(loaded, "_prunekit_plan", None)
        assert plan is not None and plan.remove == module_attr(model, "_prunekit_plan").remove

        model = self.prune(self.make_model(), self.block_plan(ir))
        out = save_pruned(model, tmp_path / "uniform")
        plain, info = from_pretrained_with_info(type(model), out)
        plain = self.configure_loaded(plain.eval())
        assert not info["missing_keys"] and not info["unexpected_keys"], (
            f"plain from_pretrained of a uniform plan: missing {info['missing_keys']}, "
            f"unexpected {info['unexpected_keys']}"
        )
        torch.testing.assert_close(self._logits(plain, ids), self._logits(model, ids), atol=0, rtol=0)
        for a, b in zip(self._cached_logits(plain, ids, 4), self._cached_logits(model, ids, 4), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    def test_plan_for_other_model_rejected(self) -> None:
        source = self.make_model()
        ir = self.adapter.build_ir(source)
        plan = PrunePlan(fingerprint=fingerprint(source, ir), remove=self.mixed_removal(ir))

        other_structure = self.prune(self.make_model(), [self.block_removals(ir)[0][0]])
        other_weights = self.make_model()
        with torch.no_grad():
            for p in other_weights.parameters():
                p.add_(0.01)
        for target in (other_structure, other_weights):
            snapshot = _snapshot(target)
            with pytest.raises(PlanMismatchError):
                apply_plan(target, plan, adapter=self.adapter)
            assert _snapshot(target) == snapshot, "a rejected plan modified the model"

    def test_remove_every_block_rejected(self) -> None:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        every_block = [b.id for b in ir.blocks()]
        every_branch = [s.id for s in ir.sublayers()]
        for remove in (every_block, every_branch):
            snapshot = _snapshot(model)
            with pytest.raises(PlanError):
                self.prune(model, remove)
            assert _snapshot(model) == snapshot, "a rejected plan modified the model"

    def test_metrics_finite_on_every_unit(self) -> None:
        """Every registered metric scores every unit of its kind with a finite number."""
        from . import plugins
        from .metrics import ChannelMetric, ExpertMetric
        from .scoring import ScoringContext, calibrate

        model = self.make_model()
        ir = self.adapter.build_ir(model)
        windows = self.input_ids(model, batch=4)
        calibration = calibrate(model, ir, windows, batch_size=4, inputs=self.model_inputs(model, windows))
        expected = {
            "block": {b.id for b in ir.blocks() if b.removable},
            "span": {b.id for b in ir.blocks() if b.removable},
            "sublayer": {s.id for s in ir.sublayers() if s.removable},
        }
        families = ir.all_channel_groups()
        for name, metric in sorted(plugins.metrics().items()):
            ctx = ScoringContext(model=model, adapter=self.adapter, ir=ir, calibration=calibration)
            if isinstance(metric, ChannelMetric):
                if not families:
                    continue
                groups = metric.score_groups(ctx)
                routed = {f for f, (_s, fam) in families.items() if fam.router}
                if isinstance(metric, ExpertMetric):  # scores the experts of routed families only
                    assert set(groups) == routed, f"metric {name} scored {sorted(set(groups) ^ routed)[:3]}"
                else:  # a metric may decline families it cannot score (e.g. inside fused experts); the
                    # planner names those in its error, so only unknown families and empty results fail
                    unknown = set(groups) - set(families)
                    assert groups and not unknown, (
                        f"metric {name} scored unknown families {sorted(unknown)[:3]}"
                    )
                for fid, values in groups.items():
                    count = families[fid][1].count
                    assert values.shape == (count,), (
                        f"metric {name}: {fid} has {count} groups, got {values.shape}"
                    )
                    assert torch.isfinite(values).all(), f"metric {name}: non-finite scores for {fid}"
                continue
            scores = metric.score(ctx, span=1 if metric.unit == "span" else None)
            missing = expected[metric.unit] - set(scores.values)
            assert not missing, f"metric {name} left {metric.unit}s unscored: {sorted(missing)[:5]}"
            bad = {u: v for u, v in scores.values.items() if not math.isfinite(v)}
            assert not bad, f"metric {name} gave non-finite scores: {dict(list(bad.items())[:5])}"

    # width ---------------------------------------------------------------------------------------------

    def test_width_removal_equals_zeroed_groups(self) -> None:
        from .width import group_slices

        model, ir = self._width_model()
        ids = self.input_ids(model)
        fams = ir.channel_groups()
        for uniform in (True, False):
            groups = self.width_removals(ir, uniform=uniform)
            reference = self.make_model()
            with torch.no_grad():
                for fid, removed in groups.items():
                    fam = fams[fid][1]
                    for member, tensor in group_slices(reference, fam):
                        for g in removed:  # the IR's documented slice of group g, zeroed
                            tensor.narrow(member.axis, member.offset + g * member.width, member.width).zero_()
            pruned = self.prune(self.make_model(), [], groups)
            for fid, removed in groups.items():
                fam = fams[fid][1]
                after = self.adapter.build_ir(pruned).channel_groups()[fid][1]
                assert after.count == fam.count - len(removed), f"{fid}: IR count {after.count} after surgery"
            torch.testing.assert_close(
                self._logits(pruned, ids),
                self._logits(reference, ids),
                atol=self.atol,
                rtol=0,
                msg=lambda m: f"narrowed model differs from the model with those groups zeroed: {m}",
            )

    def test_width_cached_generation_matches_full_forward(self) -> None:
        model, ir = self._width_model()
        groups = self.width_removals(ir, uniform=False)
        remove = [self.mixed_removal(ir)[1]]  # a whole block too: depth and width in one plan
        groups = {f: g for f, g in groups.items() if not f.startswith(remove[0] + ".")}
        self.prune(model, remove, groups)
        ids = self.input_ids(model)
        full = self._logits(model, ids)
        prefill = max(1, ids.shape[1] // 2)
        for step, got in enumerate(self._cached_logits(model, ids, prefill)):
            torch.testing.assert_close(got, full[:, prefill - 1 + step], atol=self.atol, rtol=0)

    def test_width_save_reload_roundtrip(self, tmp_path: Path) -> None:
        model, ir = self._width_model()
        uniform = self.prune(model, [], self.width_removals(ir, uniform=True))
        per_layer = self.prune(self.make_model(), [], self.width_removals(ir, uniform=False))
        self._check_roundtrips(tmp_path, uniform, per_layer)

    def _check_roundtrips(self, tmp_path: Path, uniform: nn.Module, per_layer: nn.Module) -> None:
        """A uniformly narrowed model reloads exactly with plain ``from_pretrained``, a per-layer one with
        ``load_pruned``."""
        from .checkpoint import load_pruned, save_pruned

        ids = self.input_ids(uniform)
        assert (
            module_attr(uniform, "_prunekit_plan").is_uniform
            and module_attr(uniform, "_prunekit_width")["uniform"]
        )
        out = save_pruned(uniform, tmp_path / "uniform")
        plain, info = from_pretrained_with_info(type(uniform), out)
        plain = self.configure_loaded(plain.eval())
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        torch.testing.assert_close(self._logits(plain, ids), self._logits(uniform, ids), atol=0, rtol=0)
        fresh = type(uniform)(uniform.config)
        assert _numel(dict(fresh.named_parameters())) == _numel(dict(uniform.named_parameters())), (
            "a model built from the pruned config has a different parameter count"
        )

        assert not module_attr(per_layer, "_prunekit_width")["uniform"]
        out = save_pruned(per_layer, tmp_path / "per_layer")
        loaded = self.configure_loaded(load_pruned(out))
        torch.testing.assert_close(self._logits(loaded, ids), self._logits(per_layer, ids), atol=0, rtol=0)
        for a, b in zip(
            self._cached_logits(loaded, ids, 4), self._cached_logits(per_layer, ids, 4), strict=True
        ):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert (
            module_attr(loaded, "_prunekit_plan").remove_groups
            == module_attr(per_layer, "_prunekit_plan").remove_groups
        )

    def test_width_remove_every_group_rejected(self) -> None:
        model, ir = self._width_model()
        fid, (_sub, fam) = next(
            (f, v) for f, v in ir.channel_groups().items() if v[1].count >= 2 and not v[1].router
        )
        snapshot = _snapshot(model)
        with pytest.raises(PlanError, match="remove the sublayer instead"):
            self.prune(model, [], {fid: list(range(fam.count))})
        assert _snapshot(model) == snapshot, "a rejected plan modified the model"

    # stages: conv necks and projectors, narrowed and never removed ------------------------------------

    #: stage families whose channels pass through a normalisation over the channels (a LayerNorm over a
    #: conv's output) before the next layer: narrowing them changes the norm's statistics, so zeroing is
    #: not their reference; family id -> where the plugin tests them against a narrower forward instead
    normalised_stage_families: dict[str, str] = {}

    def stage_width_removals(self, ir: ModelIR) -> dict[str, list[int]]:
        """Groups of every stage family to remove: its first and last (one of a 2-group family)."""
        return {
            fid: [0, fam.count - 1] if fam.count >= 3 else [fam.count - 1]
            for fid, (_st, fam) in ir.stage_channel_groups().items()
            if fam.count >= 2
        }

    def stage_width_plans(self, ir: ModelIR) -> list[dict[str, list[int]]]:
        """Stage cuts the round-trip check saves and reloads: each family alone, then all together.
        Override to add a cut the config describes (e.g. coupled families at the config's ratio)."""
        groups = self.stage_width_removals(ir)
        return [{fid: g} for fid, g in groups.items()] + ([groups] if len(groups) > 1 else [])

    def _stage_model(self) -> tuple[nn.Module, ModelIR]:
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        if not self.stage_width_removals(ir):
            pytest.skip(f"{self.adapter.name} declares no stage channel groups (conv necks, projectors)")
        unknown = sorted(set(self.normalised_stage_families) - set(ir.stage_channel_groups()))
        assert not unknown, f"normalised_stage_families names {unknown}, which are not stage families"
        return model, ir

    def test_stage_width_removal_equals_zeroed_groups(self) -> None:
        """Each stage family alone: the IR count and the parameter count drop by exactly the removed groups;
        where no normalisation over the channels follows, the model equals the unpruned one with every
        member slice of those groups zeroed."""
        from .width import group_slices

        model, ir = self._stage_model()
        ids = self.input_ids(model)
        fams = ir.stage_channel_groups()
        total = _numel(dict(model.named_parameters()))
        for fid, removed in self.stage_width_removals(ir).items():
            fam = fams[fid][1]
            pruned = self.prune(self.make_model(), [], {fid: removed})
            after = self.adapter.build_ir(pruned).stage_channel_groups()[fid][1]
            assert after.count == fam.count - len(removed), f"{fid}: IR count {after.count} after surgery"
            left = _numel(dict(pruned.named_parameters()))
            want_left = total - len(removed) * fam.params_per_group
            assert left == want_left, f"narrowing {fid} by {removed} left {left} params, expected {want_left}"
            got = self._logits(pruned, ids)
            if fid in self.normalised_stage_families:
                assert torch.isfinite(got).all(), f"narrowing {fid} gave non-finite logits"
                continue
            reference = self.make_model()
            with torch.no_grad():
                for member, tensor in group_slices(reference, fam):
                    for g in removed:
                        tensor.narrow(member.axis, member.offset + g * member.width, member.width).zero_()
            torch.testing.assert_close(
                got,
                self._logits(reference, ids),
                atol=self.atol,
                rtol=0,
                msg=_prefixed(f"narrowing {fid} differs from zeroing its removed channels: "),
            )

    def test_stage_width_cached_generation_matches_full_forward(self) -> None:
        """Every stage family narrowed and the first block with a KV cache removed (later cache indices
        shift): token-by-token decoding after a prefill equals one full forward."""
        model, ir = self._stage_model()
        cached = [b.id for b in ir.blocks() if b.removable and any(s.uses_cache for s in b.sublayers)]
        self.prune(model, cached[:1] or [self.mixed_removal(ir)[1]], self.stage_width_removals(ir))
        ids = self.input_ids(model)
        full = self._logits(model, ids)
        prefill = max(1, ids.shape[1] // 2)
        for step, got in enumerate(self._cached_logits(model, ids, prefill)):
            torch.testing.assert_close(got, full[:, prefill - 1 + step], atol=self.atol, rtol=0)

    def test_stage_width_save_reload_roundtrip(self, tmp_path: Path) -> None:
        """Each of :meth:`stage_width_plans`: ``load_pruned`` rebuilds the narrowed model exactly; when the
        config claims to describe it (uniform), plain ``from_pretrained`` must too, and a model built from
        the config must have its size."""
        from .checkpoint import load_pruned, save_pruned

        _model, ir = self._stage_model()
        for i, groups in enumerate(self.stage_width_plans(ir)):
            model = self.prune(self.make_model(), [], groups)
            ids = self.input_ids(model)
            out = save_pruned(model, tmp_path / f"stages{i}")
            loaded = self.configure_loaded(load_pruned(out))
            torch.testing.assert_close(self._logits(loaded, ids), self._logits(model, ids), atol=0, rtol=0)
            if not module_attr(model, "_prunekit_width")["uniform"]:
                continue
            plain, info = from_pretrained_with_info(type(model), out)
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (
                f"narrowing {sorted(groups)} claims a uniform config, but plain from_pretrained reports {info}"
            )
            plain = self.configure_loaded(plain.eval())
            torch.testing.assert_close(self._logits(plain, ids), self._logits(model, ids), atol=0, rtol=0)
            fresh = type(model)(model.config)
            assert _numel(dict(fresh.named_parameters())) == _numel(dict(model.named_parameters()))

    # experts -------------------------------------------------------------------------------------------

    def _masked_logits(self, groups: dict[str, list[int]], ids: torch.Tensor) -> torch.Tensor:
        """Logits of the unpruned model whose routers give the ``groups`` experts a logit of -inf."""
        from .routing import router_rows_masked

        model = self.make_model()
        routed = _routed(self.adapter.build_ir(model))
        with router_rows_masked(model, {routed[f].router: g for f, g in groups.items()}):
            want = self._logits(model, ids)
        assert not torch.equal(want, self._logits(model, ids)), "masking the experts changed nothing"
        return want

    def test_expert_removal_equals_masked_router(self) -> None:
        model, ir = self._expert_model()
        ids = self.input_ids(model)
        routed = _routed(ir)
        total = _numel(dict(model.named_parameters()))
        for uniform in (True, False):
            groups = self.expert_removals(ir, uniform=uniform)
            want = self._masked_logits(groups, ids)
            pruned = self.prune(self.make_model(), [], groups)
            torch.testing.assert_close(
                self._logits(pruned, ids),
                want,
                atol=self.atol,
                rtol=0,
                msg=_prefixed(f"removing experts {groups} differs from forcing their logits to -inf: "),
            )
            after = _routed(self.adapter.build_ir(pruned))
            gone = 0
            for fid, removed in groups.items():
                assert after[fid].count == routed[fid].count - len(removed), f"{fid}: IR count after surgery"
                gone += len(removed) * routed[fid].params_per_group
            left = _numel(dict(pruned.named_parameters()))
            assert left == total - gone, (
                f"removing experts {groups} left {left} params, expected {total - gone}"
            )
            assert module_attr(pruned, "_prunekit_width")["uniform"] == uniform

    def test_expert_cached_generation_matches_full_forward(self) -> None:
        model, ir = self._expert_model()
        block = self.mixed_removal(ir)[1]
        groups = {
            f: g for f, g in self.expert_removals(ir, uniform=False).items() if not f.startswith(block + ".")
        }
        self.prune(model, [block], groups)
        ids = self.input_ids(model)
        full = self._logits(model, ids)
        prefill = max(1, ids.shape[1] // 2)
        for step, got in enumerate(self._cached_logits(model, ids, prefill)):
            torch.testing.assert_close(got, full[:, prefill - 1 + step], atol=self.atol, rtol=0)

    def test_expert_save_reload_roundtrip(self, tmp_path: Path) -> None:
        model, ir = self._expert_model()
        uniform = self.prune(model, [], self.expert_removals(ir, uniform=True))
        per_layer = self.prune(self.make_model(), [], self.expert_removals(ir, uniform=False))
        self._check_roundtrips(tmp_path, uniform, per_layer)

    def test_expert_remove_every_expert_rejected(self) -> None:
        model, ir = self._expert_model()
        fid, fam = next(iter(_routed(ir).items()))
        snapshot = _snapshot(model)
        with pytest.raises(PlanError, match="remove the sublayer instead"):
            self.prune(model, [], {fid: list(range(fam.count))})
        assert _snapshot(model) == snapshot, "a rejected plan modified the model"

    def test_expert_below_top_k_needs_a_policy(self) -> None:
        """Leaving fewer experts than top_k is an error unless the plan clamps top_k; clamped, the model
        equals the masked reference (a removed expert's weight is zero after the softmax)."""
        model, ir = self._expert_model()
        fid, fam = next(iter(_routed(ir).items()))
        if fam.top_k is None or fam.top_k.value < 2:
            pytest.skip("top_k is 1: any non-empty set of experts satisfies it")
        groups = {fid: list(range(fam.count - fam.top_k.value + 1))}
        snapshot = _snapshot(model)
        with pytest.raises(PlanError, match="top_k"):
            self.prune(model, [], groups)
        assert _snapshot(model) == snapshot, "a rejected plan modified the model"
        ids = self.input_ids(model)
        want = self._masked_logits(groups, ids)
        plan = PrunePlan(
            fingerprint=fingerprint(model, ir), remove=[], remove_groups=groups, top_k_policy="clamp"
        )
        apply_plan(model, plan, adapter=self.adapter)
        torch.testing.assert_close(self._logits(model, ids), want, atol=self.atol, rtol=0)
        for path in fam.top_k.counters:
            module, _, attr = path.rpartition(".")
            assert getattr(get_module(model, module), attr) == fam.top_k.value - 1, f"{path} not clamped"


def word_tokenizer(words: int = 100) -> Any:
    """A fast word-level tokenizer for tiny test models: ``w<i>`` -> id ``i + 3`` (0-2: unk, bos, eos).

    Save it next to a tiny model (``word_tokenizer().save_pretrained(folder)``) to drive the CLI.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


# reference computations: plain PyTorch hooks, independent of prunekit's surgery -------------------------


def _routed(ir: ModelIR) -> dict[str, Any]:
    """Routed channel-group families (experts) by id."""
    return {fid: fam for fid, (_s, fam) in ir.channel_groups().items() if fam.router}


@contextmanager
def _zeroed(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """Force the first output of each module at ``paths`` to zero."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handles = [model.get_submodule(p).register_forward_hook(hook) for p in paths]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _skipped(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """Make each block at ``paths`` return its input hidden states unchanged."""

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x

    handles = [model.get_submodule(p).register_forward_hook(hook, with_kwargs=True) for p in paths]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _prefixed(prefix: str) -> Callable[[str], str]:
    """An ``assert_close`` message: ``prefix`` before torch's own."""
    return lambda m: prefix + m


def _text_config(model: nn.Module) -> Any:
    return hf_config(model).get_text_config(decoder=True)


def _params_under(params: dict[str, nn.Parameter], path: str) -> list[str]:
    """Parameters inside the module at ``path``, or the parameter ``path`` itself (a position embedding)."""
    return [n for n in params if n == path or n.startswith(path + ".")]


def _numel(params: dict[str, nn.Parameter], names: Any = None) -> int:
    return sum(params[n].numel() for n in (params if names is None else names))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor, extra: dict[str, Any] | None = None) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids=ids, use_cache=False, **(extra or {})).logits
    return logits


@torch.no_grad()
def _cached_logits(
    model: nn.Module, ids: torch.Tensor, prefill: int, extra: dict[str, Any] | None = None
) -> list[torch.Tensor]:
    """Last-position logits after a prefill of ``prefill`` tokens, then after each further token.

    A crash inside the cache (e.g. a KV-cache index past the end) is reported as a failed comparison.
    """
    try:
        out = model(input_ids=ids[:, :prefill], use_cache=True, **(extra or {}))
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    except (IndexError, RuntimeError, KeyError) as exc:
        raise AssertionError(f"cached decoding failed after surgery: {type(exc).__name__}: {exc}") from exc
    return steps


@torch.no_grad()
def _greedy(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad: int, extra: dict[str, Any] | None = None
) -> Any:
    try:
        return module_attr(model, "generate")(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
            **(extra or {}),
        )
    except (IndexError, RuntimeError, KeyError) as exc:
        raise AssertionError(f"generate() failed after surgery: {type(exc).__name__}: {exc}") from exc


def _snapshot(model: nn.Module) -> tuple[Any, ...]:
    """Everything a plan could change: module tree, config, weights (by value)."""
    state = tuple((k, tuple(v.shape), v.double().sum().item()) for k, v in model.state_dict().items())
    return (repr(model), hf_config(model).to_json_string(), state)
