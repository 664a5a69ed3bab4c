"""Planning: defaults (the API and the CLI share resolve_method), and the rank and greedy planners on
hand-written IRs and scores whose plans are worked out by hand, or by brute force over every subset."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from prunekit_core import PrunekitError
from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.model import Block, Dim, ModelIR, ResidualEdge, Sublayer, Tower
from prunekit_core.planning.planner import _plan_greedy, _plan_rank, budget_params, resolve_method
from prunekit_core.scoring.builtin_metrics import SLEB
from prunekit_core.scoring.metrics import ImportanceMetric, Scores


def test_no_metric_means_best() -> None:
    # written out by hand: the benchmark's best (docs/benchmarks.md), not read back from the planning module
    assert resolve_method() == ("angular", "rank", "block", "lsq")
    # a single override keeps the rest
    assert resolve_method(repair="none") == ("angular", "rank", "block", "none")
    assert resolve_method(planner="rank", granularity="block") == ("angular", "rank", "block", "lsq")
    assert resolve_method(granularity="width") == ("obs", "rank", "width", "lsq")
    assert resolve_method(granularity="expert") == ("moe_pruner", "rank", "expert", "none")


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("bi", ("bi", "rank", "block", "none")),
        ("angular", ("angular", "rank", "block", "none")),
        ("sublayer_drop", ("sublayer_drop", "rank", "sublayer", "none")),
        ("nri", ("nri", "greedy", "block", "none")),
        ("sleb", ("sleb", "greedy", "block", "none")),
    ],
)
def test_named_metric_runs_as_published(metric: str, expected: tuple[str, ...]) -> None:
    assert resolve_method(metric) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "bi", "planner": "greedy"}, "trial metric"),
        ({"metric": "bi", "granularity": "sublayer"}, "scores blocks"),
        ({"metric": "sublayer_drop", "granularity": "block"}, "scores sublayers"),
        ({"metric": "bi", "repair": "magic"}, "unknown repair"),
        ({"metric": "bi", "planner": "annealing"}, "unknown planner"),
        ({"metric": "nri", "granularity": "width"}, "does not score channel groups"),
        ({"metric": "wanda", "granularity": "block"}, "scores channel groups"),
        ({"metric": "nri", "granularity": "depth"}, "unknown granularity"),
        ({"metric": "bii"}, "did you mean 'bi'"),
    ],
)
def test_bad_combinations_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(PrunekitError, match=f"(?i){message}"):
        resolve_method(**kwargs)


# --- the planners on hand-written models ---------------------------------------------------------------


def hand_ir(sizes: list[tuple[int, int]]) -> ModelIR:
    """One tower of blocks ``text.blocks.i`` with an attention of ``sizes[i][0]`` parameters and an MLP of
    ``sizes[i][1]`` (the block holds exactly its two branches)."""
    blocks = []
    for i, (attn, mlp) in enumerate(sizes):
        subs = tuple(
            Sublayer(
                id=f"text.blocks.{i}.{name}",
                kind=kind,
                module=f"layers.{i}.{name}",
                norm=None,
                output="tensor",
                residual=ResidualEdge(stream="text", source=2 * i + j, target=2 * i + j + 1),
                params=params,
            )
            for j, (name, kind, params) in enumerate((("attn", "attention", attn), ("mlp", "mlp", mlp)))
        )
        blocks.append(
            Block(id=f"text.blocks.{i}", index=i, module=f"layers.{i}", sublayers=subs, params=attn + mlp)
        )
    tower = Tower(
        name="text", width=Dim(name="hidden", size=8), blocks_path="layers", blocks=tuple(blocks), stages=()
    )
    total = sum(a + m for a, m in sizes)
    return ModelIR(
        architecture="Hand", model_type="hand", adapter="hand", towers=(tower,), total_params=total
    )


class FixedScores(ImportanceMetric):
    """Hand-written scores (insertion order kept: among equal scores the one listed first ranks lower)."""

    name = "fixed"
    description = "hand-written scores"

    def __init__(self, unit: str, values: dict, spans: dict[int, dict[str, float]] | None = None) -> None:
        self.unit, self.values, self.spans = unit, values, spans or {}

    def score(self, ctx, *, span: int | None = None) -> Scores:  # noqa: ANN001
        values = self.spans.get(span, {}) if self.unit == "span" else self.values
        return Scores(metric=self.name, unit=self.unit, values=values, span=span)


def rank(ir: ModelIR, metric: ImportanceMetric, granularity: str, target: int) -> list[str]:
    return _plan_rank(SimpleNamespace(ir=ir, candidates=None), metric, granularity, target)[0]


# blocks of 40, 40, 60 and 60 parameters: 200 in all
RANK_IR = [(10, 30), (10, 30), (20, 40), (20, 40)]
B = [f"text.blocks.{i}" for i in range(4)]
BLOCK_SCORES = {B[0]: 0.5, B[1]: 0.2, B[2]: 0.2, B[3]: 0.9}  # b1 and b2 tie; b1 is listed first


@pytest.mark.parametrize(
    ("ratio", "target", "expected"),
    [
        (0.2, 40, [B[1]]),  # exactly the budget: b1 alone (40) meets 40
        (0.205, 41, [B[1], B[2]]),  # one parameter more: b1 (40) falls short, its tie b2 follows
        (0.5, 100, [B[1], B[2]]),  # 100 exactly
        (0.7, 140, [B[1], B[2], B[0]]),  # 140 exactly, in rank order
    ],
)
def test_rank_planner_on_hand_written_block_scores(ratio: float, target: int, expected: list[str]) -> None:
    ir = hand_ir(RANK_IR)
    assert budget_params(ir, ratio) == target
    assert rank(ir, FixedScores("block", BLOCK_SCORES), "block", target) == expected


def test_rank_planner_breaks_ties_by_the_order_scores_list_units() -> None:
    ir = hand_ir(RANK_IR)
    swapped = {B[0]: 0.5, B[2]: 0.2, B[1]: 0.2, B[3]: 0.9}
    assert rank(ir, FixedScores("block", swapped), "block", 41) == [B[2]]  # b2 (60) alone meets 41


def test_rank_planner_never_empties_a_tower() -> None:
    ir = hand_ir(RANK_IR)
    # 141 needs all four blocks (b1, b2, b0 hold 140): the last is never removed
    with pytest.raises(
        PlanError, match=r"the budget \(141 parameters\) cannot be met without removing every block"
    ):
        rank(ir, FixedScores("block", BLOCK_SCORES), "block", 141)


def test_rank_planner_on_hand_written_mixed_scores() -> None:
    """Mixed granularity: once a branch of a block is gone, the whole block is no longer a candidate."""
    ir = hand_ir(RANK_IR)
    scores = {
        f"{B[0]}.attn": 0.05,  # 10 params
        B[1]: 0.1,  # 40
        B[0]: 0.2,  # 40, but its attention is already gone: skipped
        f"{B[2]}.mlp": 0.3,  # 40
        f"{B[0]}.mlp": 0.4,  # 30
        B[2]: 0.5,
        B[3]: 0.6,
    }
    assert rank(ir, FixedScores("sublayer", scores), "mixed", 50) == [f"{B[0]}.attn", B[1]]  # 50 exactly
    assert rank(ir, FixedScores("sublayer", scores), "mixed", 51) == [f"{B[0]}.attn", B[1], f"{B[2]}.mlp"]


def test_rank_planner_on_hand_written_span_scores() -> None:
    """Span metrics: the fewest blocks that meet the budget, then the lowest score among those spans."""
    ir = hand_ir(RANK_IR)
    spans = {
        1: {B[0]: 0.5, B[1]: 0.1, B[2]: 0.3, B[3]: 0.9},
        2: {B[0]: 0.1, B[1]: 0.4, B[2]: 0.2},
    }
    metric = FixedScores("span", {}, spans)
    assert rank(ir, metric, "block", 50) == [B[2]]  # b1 scores lower but holds 40 < 50; b2 beats b3
    assert rank(ir, metric, "block", 60) == [B[2]]  # 60 exactly
    # no single block holds 90: spans of two, b0+b1 (80) too small, b2+b3 (0.2) beats b1+b2 (0.4)
    assert rank(ir, metric, "block", 90) == [B[2], B[3]]


# --- greedy against brute force ---------------------------------------------------------------------------


class SyntheticRunner:
    """A trial runner whose calibration loss is a hand-written function of the removed set."""

    def __init__(self, loss) -> None:  # noqa: ANN001
        self.fn, self.committed, self.trials, self.block_forwards = loss, frozenset(), 0, 0

    def loss(self, remove=()) -> float:  # noqa: ANN001
        self.trials += 1
        return self.fn(self.committed | set(remove))

    def commit(self, remove) -> None:  # noqa: ANN001
        self.committed |= set(remove)

    @property
    def current_loss(self) -> float:
        return self.fn(self.committed)


def greedy(ir: ModelIR, loss, target: int) -> list[str]:  # noqa: ANN001
    """The real greedy planner with the real SLEB metric, measuring ``loss`` instead of a model."""
    runner = SyntheticRunner(loss)
    ctx = SimpleNamespace(ir=ir, candidates=None, _trials=runner, trials=lambda: runner)
    return _plan_greedy(ctx, SLEB(), "block", target, shortlist=None, on_step=None)[0]


def brute_force(ir: ModelIR, loss, target: int) -> list[tuple[float, frozenset[str]]]:  # noqa: ANN001
    """Every set of blocks that meets the budget and keeps a block, by loss."""
    blocks = {b.id: b.params for b in ir.blocks()}
    fits = [
        frozenset(s)
        for n in range(1, len(blocks))
        for s in itertools.combinations(blocks, n)
        if sum(blocks[u] for u in s) >= target
    ]
    return sorted(((loss(s), s) for s in fits), key=lambda f: f[0])


def additive(deltas: dict[str, float]):  # noqa: ANN201
    return lambda removed: 2.0 + sum(deltas[u] for u in removed)


@pytest.mark.parametrize("target", [1, 50, 51, 100, 101, 150])
@pytest.mark.parametrize(
    "deltas",
    [
        {B[0]: 0.30, B[1]: 0.05, B[2]: 0.20, B[3]: 0.10},
        {B[0]: 0.01, B[1]: 0.90, B[2]: 0.02, B[3]: 0.40},
    ],
)
def test_greedy_equals_brute_force_for_equal_blocks_and_additive_loss(target: int, deltas: dict) -> None:
    """Equal blocks and a loss that adds per block: the best k blocks are the k smallest increases, and
    greedy takes the smallest remaining one every round, so it must find the optimum."""
    ir = hand_ir([(20, 30)] * 4)  # 50 each
    loss = additive(deltas)
    chosen = greedy(ir, loss, target)
    (best, optimum), *rest = brute_force(ir, loss, target)
    assert not rest or rest[0][0] > best, "the test's optimum must be unique"
    assert frozenset(chosen) == optimum
    assert chosen == sorted(optimum, key=deltas.get)  # in order of increase


def test_greedy_with_unequal_blocks_is_not_optimal_even_for_additive_loss() -> None:
    """Blocks of 40, 40, 60, 60; budget 100. Greedy estimates each round's cost of finishing the budget
    (increase x parameters still needed / parameters removed): round 1 needs 100, b0 costs 0.10 x 100/40 =
    0.25, b1 0.11 x 100/40 = 0.275, b2 0.5, b3 0.583: b0. Round 2 needs 60: b1 0.11 x 60/40 = 0.165, b2 0.30
    (finishes alone), b3 0.35: b1. Round 3 needs 20: b2 0.30, b3 0.35: b2. It removes 140 parameters for
    +0.51, where b0 + b2 meets the budget for +0.40: a covering knapsack, which greedy only approximates."""
    ir = hand_ir(RANK_IR)
    deltas = {B[0]: 0.10, B[1]: 0.11, B[2]: 0.30, B[3]: 0.35}
    loss = additive(deltas)
    chosen = greedy(ir, loss, 100)
    assert chosen == [B[0], B[1], B[2]]
    (best, optimum), (second, _), *_ = brute_force(ir, loss, 100)
    assert optimum == {B[0], B[2]} and best == pytest.approx(2.40) and second > best
    assert loss(frozenset(chosen)) == pytest.approx(2.51)


def test_greedy_cannot_see_an_interaction_ahead() -> None:
    """Removing b0 makes every later removal cost 0.5 more. Greedy cannot see that in round 1: it takes b0
    (+0.10), then b1 (0.10 + 0.12 + 0.5, listed before its tie b2), for +0.72; the best pair is b1 + b2,
    +0.24."""
    ir = hand_ir([(20, 30)] * 4)
    base = {B[0]: 0.10, B[1]: 0.12, B[2]: 0.12, B[3]: 1.0}

    def loss(removed: frozenset[str]) -> float:
        return 2.0 + sum(base[u] for u in removed) + (0.5 if B[0] in removed and len(removed) > 1 else 0.0)

    chosen = greedy(ir, loss, 100)
    assert chosen == [B[0], B[1]] and loss(frozenset(chosen)) == pytest.approx(2.72)
    (best, optimum), *_ = brute_force(ir, loss, 100)
    assert optimum == {B[1], B[2]} and best == pytest.approx(2.24)


def test_greedy_re_measures_after_each_removal() -> None:
    """b1 is cheapest after b0 when measured alone, but after b0 it costs far more than b2: a planner that
    ranked once (the first round's losses) would take b0 and b1; greedy re-measures and takes b0 and b2,
    the optimum here."""
    ir = hand_ir([(20, 30)] * 4)
    base = {B[0]: 0.05, B[1]: 0.10, B[2]: 0.20, B[3]: 0.90}

    def loss(removed: frozenset[str]) -> float:
        return 2.0 + sum(base[u] for u in removed) + (1.0 if {B[0], B[1]} <= removed else 0.0)

    assert greedy(ir, loss, 100) == [B[0], B[2]]
    (best, optimum), *_ = brute_force(ir, loss, 100)
    assert optimum == {B[0], B[2]} and best == pytest.approx(2.25)
