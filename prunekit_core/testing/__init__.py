"""A conformance suite for architecture plugins.

Subclass :class:`AdapterConformance` in your plugin's tests, set ``adapter`` and implement ``make_model``
(a tiny, seeded, randomly initialised model in eval mode; a fresh one on every call)::

    class TestMyFamily(AdapterConformance):
        adapter = MyFamilyAdapter()
        capabilities = {"depth", "sublayers"}  # what the adapter supports: see CAPABILITIES

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

Every subclass declares which kinds of surgery its adapter supports, as ``capabilities`` (a set drawn from
:data:`CAPABILITIES`); it is required, and a subclass without it is refused when it is defined::

    class TestMyFamily(AdapterConformance):
        adapter = MyFamilyAdapter()
        capabilities = {"depth", "sublayers", "width"}

The checks of a capability the subclass does not declare are not collected (nor callable: calling one
raises an error that names the capability); the others run, and each fails, never skips, when it cannot:
``test_capabilities_match_the_ir`` compares the declaration with what the adapter's IR of
:meth:`make_model`'s model shows, both ways, so a plugin that stops declaring its channel groups fails
instead of silently losing its width checks, and a declared capability the model does not exercise fails
with what is missing.

- ``depth``: whole blocks are removable. ``test_block_removal_equals_skipped_block``, and the mixed plans
  of the other checks include a whole block.
- ``sublayers``: single branches are removable (``depth`` implies it: a block is removable when all its
  branches are). ``test_branch_removal_equals_zeroed_branch``; ``test_config_consistent``, the cached,
  padded and round-trip checks and the rejection checks run on :meth:`mixed_removal`.
- ``width``: channel groups on sublayers, a family of 2+ groups without a router: the ``test_width_*``
  checks. Narrowing a family equals zeroing every member slice of the removed groups, cached decoding of a
  narrowed model equals its full forward, a uniformly narrowed model reloads with plain ``from_pretrained``
  and per-layer widths with ``load_pruned``, and removing every group of a family is refused. Override
  :meth:`width_removals` to choose other groups.
- ``experts``: routed families (MoE experts: a family with a ``router``) with an expert to spare over
  ``top_k``: the ``test_expert_*`` checks. Removing experts equals the unpruned model with their router
  logits forced to -inf (:func:`~prunekit_core.surgery.routing.router_rows_masked`), cached decoding equals the
  full forward, uniform expert counts reload with plain ``from_pretrained`` and per-layer counts with
  ``load_pruned``, removing every expert is refused, leaving exactly ``top_k`` needs no policy and leaving
  fewer is refused unless the plan clamps ``top_k``. Override :meth:`expert_removals` to choose other
  experts.
- ``stages``: channel groups on stages (conv necks, conv projectors: ``Stage.channel_groups``): the
  ``test_stage_*`` checks. Narrowing each family drops the IR and parameter counts by exactly its groups
  and, unless the family is listed in ``normalised_stage_families`` (a norm over the channels follows, so
  the plugin tests it against a narrower forward instead), equals zeroing its groups' member slices;
  cached decoding equals the full forward; the narrowed model round-trips. Override
  :meth:`stage_width_removals` to choose other groups and :meth:`stage_width_plans` to round-trip a cut
  the config describes.
- ``towers``: more than one tower (a vision tower next to the text tower): ``test_towers_*``. A plan
  removing a block of every tower at once equals the model with those blocks bypassed, every tower's
  config (:meth:`tower_configs`, which must name each tower) counts its kept blocks, and ``load_pruned``
  reloads it exactly.
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
from torch.overrides import TorchFunctionMode

from ..adapters.base import (
    ArchitectureAdapter,
    from_pretrained_with_info,
    get_module,
    hf_config,
    iter_modules,
    module_attr,
)
from ..ir.errors import PlanError, PlanMismatchError
from ..ir.model import ModelIR
from ..ir.plan import PrunePlan, fingerprint
from ..surgery.apply import AppliedPlan, apply_plan, branch_paths

__all__ = [
    "CAPABILITIES",
    "KERNEL_TOLERANCE_EPS",
    "AdapterConformance",
    "assert_identical",
    "assert_kernel_close",
    "assert_same_weights",
    "kernel_tolerance",
    "word_tokenizer",
]

#: what a kit subclass may declare in ``capabilities``, and what the adapter's IR must then show
CAPABILITIES: dict[str, str] = {
    "depth": "whole blocks are removable (some block of the IR is removable)",
    "sublayers": "single branches are removable (some sublayer of the IR is removable)",
    "width": "channel groups on sublayers (a family of 2+ groups without a router)",
    "experts": "routed families (MoE experts) with an expert to spare over top_k",
    "stages": "channel groups on stages (conv necks, projectors: a stage family of 2+ groups)",
    "towers": "more than one tower with removable blocks (a vision tower next to the text tower)",
}

#: the capabilities each check needs, all of them (a check missing here needs none)
_CHECK_NEEDS: dict[str, frozenset[str]] = {
    "test_branch_removal_equals_zeroed_branch": frozenset({"sublayers"}),
    "test_block_removal_equals_skipped_block": frozenset({"depth"}),
    **{
        name: frozenset({"sublayers"})  # they run on mixed_removal, which needs removable branches
        for name in (
            "test_config_consistent",
            "test_cached_generation_matches_full_forward",
            "test_left_padded_generate",
            "test_save_reload_roundtrip",
            "test_plan_for_other_model_rejected",
            "test_remove_every_block_rejected",
        )
    },
}
_PREFIX_NEEDS = {
    "test_width_": frozenset({"width"}),
    "test_expert_": frozenset({"experts"}),
    "test_stage_": frozenset({"stages"}),
    "test_towers_": frozenset({"towers", "depth"}),
}


def check_needs(check: str) -> frozenset[str]:
    """The capabilities a subclass must declare for the kit to collect ``check``."""
    for prefix, needs in _PREFIX_NEEDS.items():
        if check.startswith(prefix):
            return needs
    return _CHECK_NEEDS.get(check, frozenset())


def _not_declared(check: str, missing: list[str]) -> Callable[..., None]:
    def undeclared(self: AdapterConformance, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(
            f"{type(self).__name__} does not declare {' and '.join(map(repr, missing))} in capabilities, "
            f"so {check} is not one of its checks; declare it to run this check"
        )

    undeclared.__name__ = check
    undeclared.__test__ = False  # type: ignore[attr-defined]  # pytest must not collect it
    undeclared._prunekit_undeclared = True  # type: ignore[attr-defined]  # a marker attribute on a function object
    return undeclared


#: the kit's one tolerance, in machine epsilons of the compared dtype (see :func:`kernel_tolerance`)
KERNEL_TOLERANCE_EPS = 64


def kernel_tolerance(reference: torch.Tensor) -> float:
    """Absolute tolerance for two computations of the same function that may run different kernels.

    ``KERNEL_TOLERANCE_EPS * finfo(dtype).eps * max(1, max |reference|)`` over the finite entries (an
    infinite entry, such as a token ``generate`` masks to ``-inf``, must match exactly): 7.6e-6 for float32 logits of
    magnitude up to 1. Two kernels that sum the same products in another order (another vectorised path
    for an unaligned operand, another blocking for another shape, a cache step instead of a full forward)
    differ by a few epsilons of the largest value; a wrong weight, mask or index differs by far more.
    Measured over the kit on every shipped plugin (float32, on an AMD EPYC): at most 9.8
    epsilons; the faults the kit's own tests plant: at least 6,950.
    """
    if not reference.is_floating_point():
        return 0.0
    finite = reference.detach()[torch.isfinite(reference.detach())]  # -inf: a masked token, not a scale
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return KERNEL_TOLERANCE_EPS * torch.finfo(reference.dtype).eps * max(1.0, scale)


def assert_kernel_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float | None = None, msg: Any = None
) -> None:
    """``actual`` equals ``expected`` within :func:`kernel_tolerance` of ``expected`` (or ``atol``).

    Use it where the two sides may run different kernels or layouts: cached decoding against a full
    forward, a stand-in against a forward hook, a model that plain ``from_pretrained`` memory-mapped.
    """
    tol = kernel_tolerance(expected) if atol is None else atol
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0, msg=msg)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, *, msg: Any = None) -> None:
    """Bitwise equality, for two runs of the same computation on the same layout (a model and its
    :func:`~prunekit_core.io.checkpoint.load_pruned` reload, whose tensors are aligned like the original's).
    """
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=msg)


def assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    """Every parameter and buffer of ``expected`` is in ``actual`` with the same shape and bitwise value."""
    got = actual.state_dict()
    for name, want in expected.state_dict().items():
        assert name in got, f"weight {name} is missing from the reloaded model"
        assert got[name].shape == want.shape and torch.equal(got[name], want), (
            f"weight {name} differs after the reload: {tuple(got[name].shape)} vs {tuple(want.shape)}"
        )


class AdapterConformance:
    """Conformance tests every architecture adapter must pass. Subclass it; see the module docstring."""

    #: the adapter under test (an instance)
    adapter: ArchitectureAdapter
    #: what the adapter supports, drawn from :data:`CAPABILITIES`; required on every subclass (a frozenset
    #: once the class is defined). Checks of a capability left out are not collected.
    capabilities: frozenset[str]
    #: token ids are drawn below this; ``None`` reads ``config.vocab_size``
    vocab_size: int | None = None
    #: length of the test sequences; make it longer than any sliding window of the model
    seq_len: int = 16
    #: absolute tolerance for comparisons that may go through different kernels (cache vs full forward);
    #: ``None`` (the default) is the kit's rule, :func:`kernel_tolerance`, derived from the dtype
    atol: float | None = None

    def make_model(self) -> nn.Module:
        """A fresh, tiny, seeded model in eval mode (the same weights on every call)."""
        raise NotImplementedError("subclasses of AdapterConformance must implement make_model()")

    #: checks this adapter knowingly does not pass: test name -> why. Each is run as a *strict* expected
    #: failure: the suite fails if the check unexpectedly passes, or if the name is not a check.
    expected_failures: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = getattr(cls, "capabilities", None)
        choices = "; ".join(f"{k}: {v}" for k, v in CAPABILITIES.items())
        if declared is None or isinstance(declared, str) or not all(isinstance(c, str) for c in declared):
            raise TypeError(
                f"{cls.__name__} must declare what its adapter supports as a set of capability names, e.g. "
                f'capabilities = {{"depth", "sublayers"}} (got {declared!r}). Choose from: {choices}'
            )
        unknown = sorted(set(declared) - set(CAPABILITIES))
        if unknown:
            raise TypeError(f"{cls.__name__}.capabilities names unknown {unknown}. Choose from: {choices}")
        cls.capabilities = frozenset(declared)
        for name in _checks():
            missing = sorted(check_needs(name) - cls.capabilities)
            if missing and name in vars(cls):
                raise TypeError(
                    f"{cls.__name__} overrides {name}, a check of {missing}, without declaring "
                    f"{' and '.join(map(repr, missing))} in capabilities"
                )
            if missing:
                setattr(cls, name, _not_declared(name, missing))
            elif getattr(getattr(cls, name), "_prunekit_undeclared", False):
                setattr(cls, name, vars(AdapterConformance)[name])  # a base class left it out

    @pytest.fixture(autouse=True)
    def _expected_failures(self, request: pytest.FixtureRequest) -> None:
        checks = _checks()
        unknown = sorted(set(self.expected_failures) - checks)
        if unknown:
            pytest.fail(
                f"{type(self).__name__}.expected_failures names {unknown}, which are not conformance checks; "
                f"the checks are: {', '.join(sorted(checks))}"
            )
        off = {n: sorted(check_needs(n) - self.capabilities) for n in self.expected_failures}
        off = {n: c for n, c in off.items() if c}
        if off:
            pytest.fail(
                f"{type(self).__name__}.expected_failures names checks of capabilities it does not declare "
                f"(so they never run): {off}"
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

    def _pruned_logits(self, model: nn.Module, ids: torch.Tensor, what: str) -> torch.Tensor:
        """Logits of a model after surgery; a forward that crashes (shapes the IR got wrong, a stale
        counter) fails the check with ``what`` named."""
        try:
            return self._logits(model, ids)
        except (RuntimeError, IndexError, KeyError) as exc:
            raise AssertionError(
                f"{what} left a model whose forward fails: {type(exc).__name__}: {exc}"
            ) from exc

    def _plain_reload(self, model: nn.Module, out: Path) -> tuple[nn.Module, dict[str, Any]]:
        """``type(model).from_pretrained(out)`` of a checkpoint whose config claims to describe it; a
        refusal (a config field the surgery left stale) fails the check."""
        try:
            plain, info = from_pretrained_with_info(type(model), out)
        except (RuntimeError, ValueError) as exc:
            raise AssertionError(
                f"plain from_pretrained cannot load {out.name}, whose config claims to describe the pruned "
                f"model (a config field the surgery did not update?): {type(exc).__name__}: {exc}"
            ) from exc
        return self.configure_loaded(plain.eval()), info

    def _assert_cached_matches(self, model: nn.Module, ids: torch.Tensor, what: str) -> None:
        """Token-by-token decoding after a prefill of half of ``ids`` equals one full forward."""
        full = self._pruned_logits(model, ids, what)
        prefill = max(1, ids.shape[1] // 2)
        for step, got in enumerate(self._cached_logits(model, ids, prefill)):
            pos = prefill - 1 + step
            assert_kernel_close(
                got,
                full[:, pos],
                atol=self.atol,
                msg=lambda m, p=pos: (
                    f"after {what}: cached logits at position {p} differ from the full forward: {m}"
                ),
            )

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
        and a cache-free branch of the last block (so every later KV-cache index has to shift). Without
        ``depth``: the first removable cache-using branch and the last removable cache-free one."""
        if "depth" not in self.capabilities:
            subs = [s for s in ir.sublayers() if s.removable]
            assert len(subs) >= 2, "the conformance model needs at least 2 removable sublayers"
            first_branch = next((s for s in subs if s.uses_cache), subs[0])
            last_branch = next(
                (s for s in reversed(subs) if not s.uses_cache and s is not first_branch), subs[-1]
            )
            return [first_branch.id, last_branch.id]
        blocks = [b for b in ir.blocks() if b.removable and len(b.sublayers) >= 2]
        assert len(blocks) >= 3, "the conformance model needs at least 3 blocks with 2+ sublayers each"
        first, second, last = blocks[0], blocks[1], blocks[-1]
        first_sub = next((s for s in first.sublayers if s.uses_cache), first.sublayers[0])
        last_sub = next((s for s in reversed(last.sublayers) if not s.uses_cache), last.sublayers[-1])
        return [first_sub.id, second.id, last_sub.id]

    def block_plan(self, ir: ModelIR) -> list[str]:
        """A block-only (uniform) plan: the last of :meth:`block_removals` (needs ``depth``)."""
        return self.block_removals(ir)[-1]

    def _whole_block(self, ir: ModelIR) -> list[str]:
        """The whole block of :meth:`mixed_removal`, for checks that add one to a width plan; none
        without ``depth``."""
        return [self.mixed_removal(ir)[1]] if "depth" in self.capabilities else []

    def prune(
        self, model: nn.Module, remove: list[str], groups: dict[str, list[int]] | None = None
    ) -> nn.Module:
        """Apply a plan made for ``model`` in place, through the public path (fingerprint checked)."""
        return self.apply(model, remove, groups).model

    def apply(
        self, model: nn.Module, remove: list[str], groups: dict[str, list[int]] | None = None
    ) -> AppliedPlan:
        """:meth:`prune`, returning what :func:`~prunekit_core.apply_plan` returns (the plan as applied)."""
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

    def _capable_model(self, capability: str) -> tuple[nn.Module, ModelIR]:
        """A fresh model and its IR, which must show ``capability`` (a declared capability whose checks
        cannot run is a failure)."""
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        if not _ir_capabilities(ir)[capability]:
            raise AssertionError(_missing_message(self, capability))
        return model, ir

    def _width_model(self) -> tuple[nn.Module, ModelIR]:
        return self._capable_model("width")

    def _expert_model(self) -> tuple[nn.Module, ModelIR]:
        model, ir = self._capable_model("experts")
        assert self.expert_removals(ir, uniform=True), (
            f"{type(self).__name__}.expert_removals chose no experts, but the IR has experts to spare"
        )
        return model, ir

    # tests -----------------------------------------------------------------------------------------

    def test_capabilities_match_the_ir(self) -> None:
        """``capabilities`` says what the adapter's IR of :meth:`make_model`'s model shows, both ways: a
        declared capability the IR lacks cannot be checked, an undeclared one the IR has would go unchecked."""
        shown = _ir_capabilities(self.adapter.build_ir(self.make_model()))
        problems = [
            _missing_message(self, c) for c in CAPABILITIES if c in self.capabilities and not shown[c]
        ]
        for cap in CAPABILITIES:
            if cap in self.capabilities or not shown[cap]:
                continue
            lost = sorted(n for n in _checks() if cap in check_needs(n))
            problems.append(
                f"the IR {self.adapter.name} builds for make_model()'s model shows {cap!r} "
                f"({CAPABILITIES[cap]}: {shown[cap][:3]}), but {type(self).__name__}.capabilities does not "
                f"declare it, so {lost or 'its checks'} do not run: add {cap!r} to capabilities"
            )
        assert not problems, "\n".join(problems)

    def test_adapter_matches(self) -> None:
        from ..registry import plugins

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

    def test_branches_own_their_modules(self) -> None:
        """Every attention of a block (a module holding a KV-cache slot, ``layer_idx``) is inside a declared
        branch that says ``uses_cache=True``, and no branch is a bare norm: a norm is a branch's ``norm``
        (before it) or ``post`` module (after it). A post-norm declared as the branch passes every
        removal check (zeroing it removes the branch) while the attention it follows goes undeclared."""
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        problems: list[str] = []
        for b in ir.blocks():
            block = get_module(model, b.module)
            owned = [(s, branch_paths(s)) for s in b.sublayers]
            seen: list[str] = []
            for name, module in block.named_modules():
                idx = getattr(module, "layer_idx", None)
                if not name or not isinstance(idx, int) or isinstance(idx, bool):
                    continue
                path = f"{b.module}.{name}"
                if any(path.startswith(p + ".") for p in seen):
                    continue  # inside an attention already looked at
                seen.append(path)
                owners = [
                    s for s, paths in owned if any(path == p or path.startswith(p + ".") for p in paths)
                ]
                n = sum(p.numel() for p in module.parameters())
                if not owners:
                    problems.append(
                        f"block {b.id}: {path} ({type(module).__name__}, {n} parameters) holds a KV-cache slot "
                        f"(layer_idx) but is in no declared branch (the block declares "
                        f"{[f'{s.id} ({s.params} params)' for s in b.sublayers]}): declare it as a branch, "
                        f'BranchSpec(module="{name}", kind="attention", output="tuple", uses_cache=True), '
                        "and a norm between it and the residual add in post=(...)"
                    )
                elif not any(s.uses_cache for s in owners):
                    problems.append(
                        f"branch {owners[0].id} holds {path}, which owns a KV-cache slot (layer_idx), but does "
                        "not declare uses_cache=True: declare it, or removing the branch leaves the cache "
                        "indices of later layers wrong"
                    )
            for s in b.sublayers:
                weights = [p for path in branch_paths(s) for p in get_module(model, path).parameters()]
                if weights and all(p.dim() == 1 for p in weights) and 10 * s.params < b.params:
                    problems.append(
                        f"branch {s.id} ({s.module}) holds only norm weights ({s.params} of the block's "
                        f"{b.params} parameters): a norm is not a branch. Declare the module it normalises "
                        "as the branch, with this norm as its norm= (a pre-norm, before it) or post= (a "
                        "post-norm, after it)"
                    )
        assert not problems, "\n".join(problems)

    def test_stream_write_matches_the_forward(self) -> None:
        """Each branch's ``write`` (what stands between its ``out_proj`` and the residual add, see
        :mod:`prunekit_core.ir.stream`) holds in the model's real forward. With the block's other branches
        zeroed, a change ``d`` is added to ``out_proj``'s output and the block's additions of stream-shaped
        tensors are recorded (values compared sorted, so a writer in window order counts): where nothing is declared between them (``post == "none"``) one of them moves
        by exactly ``scale * d`` (the residual add); where a post-norm is declared (``"norm"``) none does.
        ``"gate"`` and ``"opaque"`` are not checked."""
        model = self.make_model()
        ir = self.adapter.build_ir(model)
        ids = self.input_ids(model)
        problems: list[str] = []
        for b in ir.blocks():
            for s in b.sublayers:
                if s.out_proj is None or s.write.post not in ("none", "norm"):
                    continue
                response = self._write_response(model, ids, b.module, s, [o for o in b.sublayers if o != s])
                if response is None:
                    continue  # the writer's output is not shaped like the stream (windowed attention)
                moves, d = response
                want = s.write.scale * d
                errs = [float((m - want).norm() / want.norm().clamp_min(1e-30)) for m in moves]
                linear = any(e <= 1e-3 for e in errs)
                if s.write.post == "norm":
                    if linear:
                        problems.append(
                            f"branch {s.id} declares a post-norm {list(s.write.modules)} between {s.out_proj} "
                            f"and the stream, but a change to its output reaches the residual add unchanged "
                            f"({s.write.scale} times): declare no post modules (post=(), post_kind=None)"
                        )
                    continue
                if linear:
                    continue
                first = next((m for m in moves if float(m.norm()) > 0), None)
                if first is None:
                    problems.append(
                        f"branch {s.id}: a change to the output of {s.out_proj} reaches no addition in "
                        f"{b.module}: out_proj is not the branch's writer; declare the nn.Linear whose output "
                        "the branch adds to the stream"
                    )
                    continue
                ratio = float((first * d).sum() / (d * d).sum().clamp_min(1e-30))
                fit = float((first - ratio * d).norm() / (ratio * d).norm().clamp_min(1e-30))
                if fit <= 1e-3:
                    problems.append(
                        f"branch {s.id}: its output reaches the stream multiplied by {ratio:.6g}, but it "
                        f"declares scale={s.write.scale}: declare the multiplier, BranchSpec(scale=NAME) with "
                        f"NAME the text-config field that holds {ratio:.6g} (Granite: "
                        '"residual_multiplier"), or the number itself'
                    )
                else:
                    problems.append(
                        f"branch {s.id}: a change to the output of {s.out_proj} does not reach the residual "
                        f"add linearly (relative error {min(errs):.2g} against {s.write.scale} times the "
                        "change): something stands between out_proj and the add. Declare it: a post-norm as "
                        'BranchSpec(post=("NORM",)) (e.g. post_attention_layernorm after self_attn in Gemma '
                        '2/3 and OLMo2), anything else as post_kind="gate" or "opaque"'
                    )
        assert not problems, "\n".join(problems)

    def _write_response(
        self, model: nn.Module, ids: torch.Tensor, block: str, sub: Any, others: list[Any]
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(how much each stream-shaped addition inside ``block`` moves, the change added to
        ``sub.out_proj``'s output), with the block's ``others`` branches zeroed; ``None`` where the writer's
        output has another size than the block's (windows padded before the writer, cropped after it)."""
        added: list[torch.Tensor] = []
        perturb = [False]
        mode = _Additions()

        def shift(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor | None:
            if not perturb[0]:
                return None
            gen = torch.Generator().manual_seed(len(added))
            d = torch.randn(out.shape, generator=gen).to(out.dtype) * out.detach().float().std().clamp_min(
                1e-3
            )
            added.append(d.double())
            mode.numel, mode.recording = d.numel(), False  # not this addition: it is the change itself
            try:
                return out + d
            finally:
                mode.recording = True

        def enter(_m: nn.Module, _a: Any) -> None:
            mode.recording = True

        def leave(_m: nn.Module, _a: Any, out: Any) -> None:
            mode.recording = False
            streams.append((out[0] if isinstance(out, tuple) else out).numel())

        target = get_module(model, block)
        handles = [
            target.register_forward_pre_hook(enter),
            target.register_forward_hook(leave),
            get_module(model, sub.out_proj).register_forward_hook(shift),
        ]
        runs: list[list[torch.Tensor]] = []
        streams: list[int] = []
        try:
            with _zeroed(model, [_contribution(o) for o in others]):
                for _ in range(2):
                    mode.sums = []
                    with mode:
                        self._logits(model, ids)
                    runs.append(mode.sums)
                    perturb[0] = True
        finally:
            for h in handles:
                h.remove()
        assert len(added) == 1, (
            f"{sub.out_proj} ran {len(added)} times in one forward; the kit checks a branch's write where "
            "its out_proj runs once"
        )
        d = added[0]
        if streams[0] != d.numel():
            return None
        # additions before the change was first made were recorded whatever their size: keep the stream's
        before, after = ([t for t in run if t.numel() == d.numel()] for run in runs)
        assert len(before) == len(after), f"{block} made different additions with and without the change"
        # compared as sorted values: a writer in window order (windowed attention) reaches the stream
        # rearranged, which changes no value
        flat = d.flatten().sort().values
        return [(b1 - b0).flatten().sort().values for b0, b1 in zip(before, after, strict=True)], flat

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
            with _zeroed(reference, [_contribution(subs[u]) for u in case]):
                want = self._logits(reference, ids)
            pruned = copy.deepcopy(model)
            self.prune(pruned, case)
            assert_kernel_close(
                self._pruned_logits(pruned, ids, f"removing {case}"),
                want,
                atol=self.atol,
                msg=lambda m, c=case: f"removing {c}: {m}",
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
            assert_kernel_close(
                self._pruned_logits(pruned, ids, f"removing {case}"),
                want,
                atol=self.atol,
                msg=lambda m, c=case: f"removing {c}: {m}",
            )
            named = dict(model.named_parameters())
            gone = sum(_numel(named, _params_under(named, blocks[u].module)) for u in case)
            left = _numel(dict(pruned.named_parameters()))
            assert left == total - gone, f"removing {case} left {left} params, expected {total - gone}"

    def test_config_consistent(self) -> None:
        probe = self.make_model()
        ir = self.adapter.build_ir(probe)
        plans = [(self.mixed_removal(ir), False)]
        if "depth" in self.capabilities:
            plans.insert(0, (self.block_plan(ir), True))
        for remove, uniform in plans:
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
        remove = self.mixed_removal(ir)
        self.prune(model, remove)
        self._assert_cached_matches(model, self.input_ids(model), f"removing {remove}")

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
                assert_kernel_close(
                    a[row],
                    b[0],
                    atol=self.atol,
                    msg=lambda m, r=row, s=step: f"row {r}, step {s}: padded scores differ: {m}",
                )

    def test_save_reload_roundtrip(self, tmp_path: Path) -> None:
        from ..io.checkpoint import load_pruned, read_plan, save_pruned

        probe = self.make_model()
        ir = self.adapter.build_ir(probe)
        ids = self.input_ids(probe)
        mask = torch.ones_like(ids)

        applied = self.apply(self.make_model(), self.mixed_removal(ir))
        model = applied.model
        out = save_pruned(model, tmp_path / "mixed", plan=applied.plan)
        loaded = self.configure_loaded(load_pruned(out))
        assert_identical(self._logits(loaded, ids), self._logits(model, ids))
        assert torch.equal(
            self._greedy(loaded, ids, mask, 0).sequences, self._greedy(model, ids, mask, 0).sequences
        )
        for a, b in zip(self._cached_logits(loaded, ids, 4), self._cached_logits(model, ids, 4), strict=True):
            assert_identical(a, b)
        plan = read_plan(out)
        assert plan is not None and plan.remove == applied.plan.remove
        if "depth" not in self.capabilities:
            return  # a uniform plan needs whole blocks: branch removals reload through load_pruned only

        model = self.prune(self.make_model(), self.block_plan(ir))
        out = save_pruned(model, tmp_path / "uniform")
        plain, info = self._plain_reload(model, out)
        assert not info["missing_keys"] and not info["unexpected_keys"], (
            f"plain from_pretrained of a uniform plan: missing {info['missing_keys']}, "
            f"unexpected {info['unexpected_keys']}"
        )
        # plain transformers memory-maps the weights (unaligned): the same weights, perhaps other kernels
        assert_same_weights(plain, model)
        assert_kernel_close(self._logits(plain, ids), self._logits(model, ids), atol=self.atol)
        for a, b in zip(self._cached_logits(plain, ids, 4), self._cached_logits(model, ids, 4), strict=True):
            assert_kernel_close(a, b, atol=self.atol)

    def test_plan_for_other_model_rejected(self) -> None:
        source = self.make_model()
        ir = self.adapter.build_ir(source)
        plan = PrunePlan(fingerprint=fingerprint(source, ir), remove=self.mixed_removal(ir))

        first = self.block_removals(ir)[0][0] if "depth" in self.capabilities else self.mixed_removal(ir)[0]
        other_structure = self.prune(self.make_model(), [first])
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
        for remove in (every_block, every_branch) if "depth" in self.capabilities else (every_branch,):
            snapshot = _snapshot(model)
            with pytest.raises(PlanError):
                self.prune(model, remove)
            assert _snapshot(model) == snapshot, "a rejected plan modified the model"

    def test_metrics_finite_on_every_unit(self) -> None:
        """Every registered metric scores every unit of its kind with a finite number."""
        from ..registry import plugins
        from ..scoring.calibration import ScoringContext, calibrate
        from ..scoring.metrics import ChannelMetric, ExpertMetric

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
        from ..surgery.width import group_slices

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
            assert_kernel_close(
                self._pruned_logits(pruned, ids, f"narrowing {groups}"),
                self._logits(reference, ids),
                atol=self.atol,
                msg=lambda m: f"narrowed model differs from the model with those groups zeroed: {m}",
            )

    def test_width_cached_generation_matches_full_forward(self) -> None:
        model, ir = self._width_model()
        groups = self.width_removals(ir, uniform=False)
        remove = self._whole_block(ir)  # a whole block too: depth and width in one plan
        groups = {f: g for f, g in groups.items() if not any(f.startswith(b + ".") for b in remove)}
        self.prune(model, remove, groups)
        self._assert_cached_matches(model, self.input_ids(model), f"removing {remove} and narrowing {groups}")

    def test_width_save_reload_roundtrip(self, tmp_path: Path) -> None:
        model, ir = self._width_model()
        uniform = self.apply(model, [], self.width_removals(ir, uniform=True))
        per_layer = self.apply(self.make_model(), [], self.width_removals(ir, uniform=False))
        self._check_roundtrips(tmp_path, uniform, per_layer)

    def _check_roundtrips(self, tmp_path: Path, uniform_run: AppliedPlan, per_layer_run: AppliedPlan) -> None:
        """A uniformly narrowed model reloads exactly with plain ``from_pretrained``, a per-layer one with
        ``load_pruned``."""
        from ..io.checkpoint import load_pruned, read_plan, save_pruned

        uniform, per_layer = uniform_run.model, per_layer_run.model
        ids = self.input_ids(uniform)
        assert uniform_run.plan.is_uniform and uniform_run.plan.width_uniform
        out = save_pruned(uniform, tmp_path / "uniform", plan=uniform_run.plan)
        plain, info = self._plain_reload(uniform, out)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert_same_weights(plain, uniform)
        assert_kernel_close(self._logits(plain, ids), self._logits(uniform, ids), atol=self.atol)
        fresh = type(uniform)(uniform.config)
        assert _numel(dict(fresh.named_parameters())) == _numel(dict(uniform.named_parameters())), (
            "a model built from the pruned config has a different parameter count"
        )

        assert not per_layer_run.plan.width_uniform
        out = save_pruned(per_layer, tmp_path / "per_layer", plan=per_layer_run.plan)
        loaded = self.configure_loaded(load_pruned(out))
        assert_identical(self._logits(loaded, ids), self._logits(per_layer, ids))
        for a, b in zip(
            self._cached_logits(loaded, ids, 4), self._cached_logits(per_layer, ids, 4), strict=True
        ):
            assert_identical(a, b)
        saved_plan = read_plan(out)
        assert saved_plan is not None and saved_plan.remove_groups == per_layer_run.plan.remove_groups

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
        model, ir = self._capable_model("stages")
        assert self.stage_width_removals(ir), (
            f"{type(self).__name__}.stage_width_removals chose no groups, but the IR has stage families"
        )
        unknown = sorted(set(self.normalised_stage_families) - set(ir.stage_channel_groups()))
        assert not unknown, f"normalised_stage_families names {unknown}, which are not stage families"
        return model, ir

    def test_stage_width_removal_equals_zeroed_groups(self) -> None:
        """Each stage family alone: the IR count and the parameter count drop by exactly the removed groups;
        where no normalisation over the channels follows, the model equals the unpruned one with every
        member slice of those groups zeroed."""
        from ..surgery.width import group_slices

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
            got = self._pruned_logits(pruned, ids, f"narrowing {fid} by {removed}")
            if fid in self.normalised_stage_families:
                assert torch.isfinite(got).all(), f"narrowing {fid} gave non-finite logits"
                continue
            reference = self.make_model()
            with torch.no_grad():
                for member, tensor in group_slices(reference, fam):
                    for g in removed:
                        tensor.narrow(member.axis, member.offset + g * member.width, member.width).zero_()
            assert_kernel_close(
                got,
                self._logits(reference, ids),
                atol=self.atol,
                msg=lambda m, f=fid: f"narrowing {f} differs from zeroing its removed channels: {m}",
            )

    def test_stage_width_cached_generation_matches_full_forward(self) -> None:
        """Every stage family narrowed and the first block with a KV cache removed (later cache indices
        shift): token-by-token decoding after a prefill equals one full forward."""
        model, ir = self._stage_model()
        cached = [b.id for b in ir.blocks() if b.removable and any(s.uses_cache for s in b.sublayers)]
        remove, groups = cached[:1] or self._whole_block(ir), self.stage_width_removals(ir)
        self.prune(model, remove, groups)
        self._assert_cached_matches(model, self.input_ids(model), f"removing {remove} and narrowing {groups}")

    def test_stage_width_save_reload_roundtrip(self, tmp_path: Path) -> None:
        """Each of :meth:`stage_width_plans`: ``load_pruned`` rebuilds the narrowed model exactly; when the
        config claims to describe it (uniform), plain ``from_pretrained`` must too, and a model built from
        the config must have its size."""
        from ..io.checkpoint import load_pruned, save_pruned

        _model, ir = self._stage_model()
        for i, groups in enumerate(self.stage_width_plans(ir)):
            applied = self.apply(self.make_model(), [], groups)
            model = applied.model
            ids = self.input_ids(model)
            out = save_pruned(model, tmp_path / f"stages{i}", plan=applied.plan)
            loaded = self.configure_loaded(load_pruned(out))
            assert_identical(self._logits(loaded, ids), self._logits(model, ids))
            if not applied.plan.width_uniform:
                continue
            plain, info = self._plain_reload(model, out)
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (
                f"narrowing {sorted(groups)} claims a uniform config, but plain from_pretrained reports {info}"
            )
            assert_same_weights(plain, model)
            assert_kernel_close(self._logits(plain, ids), self._logits(model, ids), atol=self.atol)
            fresh = type(model)(model.config)
            assert _numel(dict(fresh.named_parameters())) == _numel(dict(model.named_parameters()))

    # experts -------------------------------------------------------------------------------------------

    def _masked_logits(self, groups: dict[str, list[int]], ids: torch.Tensor) -> torch.Tensor:
        """Logits of the unpruned model whose routers give the ``groups`` experts a logit of -inf."""
        from ..surgery.routing import router_rows_masked

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
            applied = self.apply(self.make_model(), [], groups)
            pruned = applied.model
            assert_kernel_close(
                self._pruned_logits(pruned, ids, f"removing experts {groups}"),
                want,
                atol=self.atol,
                msg=lambda m, g=groups: (
                    f"removing experts {g} differs from forcing their logits to -inf: {m}"
                ),
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
            assert applied.plan.width_uniform == uniform

    def test_expert_cached_generation_matches_full_forward(self) -> None:
        model, ir = self._expert_model()
        blocks = self._whole_block(ir)
        groups = {
            f: g
            for f, g in self.expert_removals(ir, uniform=False).items()
            if not any(f.startswith(b + ".") for b in blocks)
        }
        self.prune(model, blocks, groups)
        self._assert_cached_matches(model, self.input_ids(model), f"removing {blocks} and experts {groups}")

    def test_expert_save_reload_roundtrip(self, tmp_path: Path) -> None:
        model, ir = self._expert_model()
        uniform = self.apply(model, [], self.expert_removals(ir, uniform=True))
        per_layer = self.apply(self.make_model(), [], self.expert_removals(ir, uniform=False))
        self._check_roundtrips(tmp_path, uniform, per_layer)

    def test_expert_remove_every_expert_rejected(self) -> None:
        model, ir = self._expert_model()
        fid, fam = next(iter(_routed(ir).items()))
        snapshot = _snapshot(model)
        with pytest.raises(PlanError, match="remove the sublayer instead"):
            self.prune(model, [], {fid: list(range(fam.count))})
        assert _snapshot(model) == snapshot, "a rejected plan modified the model"

    def test_expert_below_top_k_needs_a_policy(self) -> None:
        """Leaving exactly top_k experts needs no policy and equals the masked reference; leaving fewer is
        an error unless the plan clamps top_k; clamped, the model equals the masked reference (a removed
        expert's weight is zero after the softmax). With top_k 1, fewer is none, which
        ``test_expert_remove_every_expert_rejected`` covers."""
        model, ir = self._expert_model()
        fid, fam = next(iter(self.expert_removals(ir, uniform=True).items()))
        fam = _routed(ir)[fid]
        top_k = fam.top_k.value if fam.top_k else 1
        ids = self.input_ids(model)
        exactly = {fid: list(range(fam.count - top_k))}
        assert_kernel_close(
            self._pruned_logits(
                self.prune(self.make_model(), [], exactly), ids, f"removing experts {exactly}"
            ),
            self._masked_logits(exactly, ids),
            atol=self.atol,
            msg=lambda m: (
                f"leaving exactly top_k={top_k} experts of {fid} differs from masking the rest: {m}"
            ),
        )
        if fam.top_k is None or top_k < 2:
            return
        groups = {fid: list(range(fam.count - fam.top_k.value + 1))}
        snapshot = _snapshot(model)
        with pytest.raises(PlanError, match="top_k"):
            self.prune(model, [], groups)
        assert _snapshot(model) == snapshot, "a rejected plan modified the model"
        want = self._masked_logits(groups, ids)
        plan = PrunePlan(
            fingerprint=fingerprint(model, ir), remove=[], remove_groups=groups, top_k_policy="clamp"
        )
        apply_plan(model, plan, adapter=self.adapter)
        assert_kernel_close(
            self._pruned_logits(model, ids, f"removing experts {groups} with top_k clamped"),
            want,
            atol=self.atol,
            msg=lambda m: f"removing experts {groups} with top_k clamped differs from masking them: {m}",
        )
        for path in fam.top_k.counters:
            module, _, attr = path.rpartition(".")
            assert getattr(get_module(model, module), attr) == fam.top_k.value - 1, f"{path} not clamped"

    # towers: a vision tower next to the text tower -----------------------------------------------------

    def test_towers_blocks_removed_in_every_tower(self, tmp_path: Path) -> None:
        """One block of every tower removed in one plan: the logits equal the model with those blocks
        bypassed, every tower's config counts its kept blocks, and ``load_pruned`` reloads it exactly."""
        from ..io.checkpoint import load_pruned, save_pruned

        model, ir = self._capable_model("towers")
        ids = self.input_ids(model)
        remove = [
            next(b for b in t.blocks if b.removable) for t in ir.towers if any(b.removable for b in t.blocks)
        ]
        with _skipped(model, [b.module for b in remove]):
            want = self._logits(model, ids)
        pruned = self.prune(self.make_model(), [b.id for b in remove])
        assert_kernel_close(
            self._pruned_logits(pruned, ids, f"removing {[b.id for b in remove]}"),
            want,
            atol=self.atol,
            msg=lambda m: f"removing {[b.id for b in remove]} differs from bypassing those blocks: {m}",
        )
        configs = self.tower_configs(pruned)
        for tower in ir.towers:
            if not any(b.removable for b in tower.blocks):
                continue
            assert tower.name in configs, (
                f"tower_configs names {sorted(configs)}, not tower {tower.name!r}: a multi-tower adapter must "
                "give the config that counts each tower's blocks (ArchitectureAdapter.tower_configs)"
            )
            kept = len(tower.blocks) - 1
            assert configs[tower.name].num_hidden_layers == kept, (
                f"tower {tower.name!r}: config.num_hidden_layers={configs[tower.name].num_hidden_layers} "
                f"after removing one of its {len(tower.blocks)} blocks"
            )
        loaded = self.configure_loaded(load_pruned(save_pruned(pruned, tmp_path / "towers")))
        assert_identical(self._logits(loaded, ids), self._logits(pruned, ids))


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


def _checks() -> set[str]:
    """Every check of the kit."""
    return {n for n in vars(AdapterConformance) if n.startswith("test_")}


def _ir_capabilities(ir: ModelIR) -> dict[str, list[str]]:
    """Capability -> the units of ``ir`` that show it (empty when it does not)."""
    towers = [t.name for t in ir.towers if any(b.removable for b in t.blocks)]
    return {
        "depth": [b.id for b in ir.blocks() if b.removable],
        "sublayers": [s.id for s in ir.sublayers() if s.removable],
        "width": [f for f, (_s, g) in ir.channel_groups().items() if g.count >= 2 and not g.router],
        "experts": [f for f, g in _routed(ir).items() if g.count - (g.top_k.value if g.top_k else 1) >= 1],
        "stages": [f for f, (_s, g) in ir.stage_channel_groups().items() if g.count >= 2],
        "towers": towers if len(towers) >= 2 else [],
    }


def _missing_message(kit: AdapterConformance, capability: str) -> str:
    return (
        f"{type(kit).__name__} declares capability {capability!r} ({CAPABILITIES[capability]}), but the IR "
        f"{kit.adapter.name} builds for make_model()'s model shows none, so its checks cannot run: declare "
        f"it in the adapter's build_ir (or make make_model build a model that has it), or remove "
        f"{capability!r} from capabilities"
    )


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


#: the functions a tensor addition runs through (``a + b``, ``torch.add``, ``a += b``, ``a.add_(b)``)
_ADD_NAMES = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


class _Additions(TorchFunctionMode):
    """Records the result of every tensor addition while ``recording`` (of ``numel`` elements, once set)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.numel: int | None = None
        self.sums: list[torch.Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if (
            self.recording
            and getattr(func, "__name__", "") in _ADD_NAMES
            and isinstance(out, torch.Tensor)
            and (self.numel is None or out.numel() == self.numel)
        ):
            self.sums.append(out.detach().double().clone())
        return out


def _contribution(sub: Any) -> str:
    """The module whose output is what a branch adds to the stream: its last post module, else itself."""
    modules: tuple[str, ...] = sub.write.modules
    return modules[-1] if modules else str(sub.module)


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
