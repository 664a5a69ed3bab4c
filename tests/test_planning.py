"""Planning defaults and budgets: the API and the CLI share resolve_method."""

from __future__ import annotations

import pytest

from prunekit_core import PrunekitError
from prunekit_core.planning import BEST, resolve_method


def test_no_metric_means_best() -> None:
    assert resolve_method() == (BEST["metric"], BEST["planner"], BEST["granularity"], BEST["repair"])
    # a single override keeps the rest of BEST
    assert resolve_method(repair="none")[3] == "none"


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("bi", ("bi", "rank", "block", "none")),
        ("angular", ("angular", "rank", "block", "none")),
        ("sublayer_drop", ("sublayer_drop", "rank", "sublayer", "none")),
        ("nri", ("nri", "greedy", BEST["granularity"], "none")),
        ("sleb", ("sleb", "greedy", BEST["granularity"], "none")),
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
