"""``prunekit demo``: the whole flow on the real SmolLM2-135M-Instruct, with timings.

calibrate on c4 -> perplexity on wiki -> plan with prunekit's best planner -> prune -> perplexity again ->
save -> reload (plain transformers for a whole-block plan, :func:`~prunekit_core.load_pruned` otherwise)
and check that the reloaded model computes the same logits -> plot the scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch

from ..ir.errors import CheckpointError
from .pipeline import Reporter, prune

DEMO_MODEL = "smollm2-135m"
CALIB_TEXT = "c4"
EVAL_TEXT = "wiki"
PLOT_FILE = "scores.png"


def _null_status(_label: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


class _DemoReporter(Reporter):
    """The pipeline's stages as the demo's timing lines (its results are said from the PruneResult)."""

    def __init__(
        self,
        log: Callable[[str], None],
        status: Callable[[str], contextlib.AbstractContextManager[Any]],
        timings: dict[str, float],
    ) -> None:
        self.log, self.status, self.timings = log, status, timings
        self.elapsed = 0.0

    def info(self, message: str) -> None:
        self.log("  " + message)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.status(label + " ..."):
            yield
        took = time.perf_counter() - t0
        self.elapsed += took
        self.log(f"[{sum(self.timings.values()) + self.elapsed:6.1f} s] {label}: {took:.1f} s")


def check_demo_out(out: Path) -> None:
    """Refuse ``out`` unless it is new, an empty folder, or a previous prunekit output (has prunekit.json)."""
    from ..io.checkpoint import check_target

    check_target(out.absolute(), True)


def run_demo(
    *,
    out: str | Path = "prunekit-demo-out",
    ratio: float = 0.1,
    eval_windows: int = 8,
    eval_seq_len: int = 1024,
    calib_windows: int = 32,
    calib_seq_len: int = 256,
    model_spec: str = DEMO_MODEL,
    log: Callable[[str], None] = print,
    say: Callable[[str], None] = print,
    status: Callable[[str], contextlib.AbstractContextManager[Any]] = _null_status,
) -> dict[str, Any]:
    """Run the demo and return what it measured (JSON-serialisable).

    ``log`` receives progress and timing lines, ``say`` the results; ``status`` wraps long steps (a
    spinner). Raises :class:`~prunekit_core.ir.errors.PrunekitError` subclasses for unusable inputs before
    anything is written.
    """
    import prunekit_core as pk

    from ..io.text import resolve_text
    from ..ir.defaults import BEST
    from ..planning.planner import budget_params
    from .plots import plot_scores

    out = Path(out).expanduser()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    @contextlib.contextmanager
    def step(name: str, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with status(label + " ..."):
            yield
        timings[name] = time.perf_counter() - t0
        log(f"[{sum(timings.values()):6.1f} s] {label}: {timings[name]:.1f} s")

    # cheap checks before the minutes of work
    check_demo_out(out)
    resolve_text(CALIB_TEXT)
    resolve_text(EVAL_TEXT)
    from ..io.loading import resolve_model_source

    resolve_model_source(model_spec)

    with step("load", f"load {model_spec}"):
        model, tok, _src = pk.load_model(model_spec)
        ir = pk.inspect(model)
        cal_w = pk.load_windows(tok, CALIB_TEXT, seq_len=calib_seq_len, num_windows=calib_windows)
        eval_w = pk.load_windows(tok, EVAL_TEXT, seq_len=eval_seq_len, num_windows=eval_windows)
    target = budget_params(ir, ratio)
    say(
        f"model: {ir.architecture}, {len(ir.blocks())} blocks, {ir.total_params:,} parameters "
        f"({ir.block_params():,} in blocks)"
    )
    say(
        f"budget: at least {ratio:g} of the {ir.block_params():,} block parameters "
        f"(embeddings and head excluded) = {target:,} parameters"
    )

    with step("calibrate", f"calibrate on {cal_w.num_windows} x {cal_w.seq_len} tokens of {CALIB_TEXT}"):
        cal = pk.calibrate(model, cal_w.ids)
        block_scores = pk.score(model, cal, "bi")
        sublayer_scores = pk.score(model, cal, "sublayer_drop")

    planner, metric, granularity = BEST["planner"], BEST["metric"], BEST["granularity"]
    repair = BEST.get("repair", "none")
    params_before = pk.count_parameters(model).total
    # perplexity before, plan, apply (with its repair), perplexity after and save: one pipeline run
    res = prune(
        model,
        tokenizer=tok,
        ratio=ratio,
        calib=cal_w,
        calibration=cal,
        eval=eval_w,
        metric=metric,
        planner=planner,
        granularity=granularity,
        repair=repair,
        out=out,
        overwrite=True,
        reporter=_DemoReporter(log, status, timings),
    )
    pruned, plan = cast("torch.nn.Module", res.model), res.plan
    assert res.perplexity_before is not None and res.perplexity_after is not None and res.out is not None
    before, after, saved = res.perplexity_before, res.perplexity_after, res.out
    timings.update(res.timings)
    say(
        f"perplexity before: {before.perplexity:.3f} ({before.tokens} tokens of {EVAL_TEXT}, seq_len {before.seq_len})"
    )
    say(f"plan: remove {', '.join(plan.remove)}")
    say(
        f"achieved: {plan.removed_params:,} of {plan.block_params:,} block parameters removed "
        f"({plan.achieved_ratio:.2%}); {'uniform (whole blocks)' if plan.is_uniform else 'non-uniform'}"
    )
    params_after = int(res.report["params_after"])
    say(f"perplexity after:  {after.perplexity:.3f} (x{after.perplexity / before.perplexity:.3f})")
    say(f"parameters: {params_before:,} -> {params_after:,}")

    probe = eval_w.ids[:1, :16]
    with step("reload", "reload and compare logits"):
        reload = _reload_and_compare(pruned, saved, probe, uniform=plan.is_uniform)
    say(
        f"reloaded with {reload['loader']}: {len(reload['missing_keys'])} missing, "
        f"{len(reload['unexpected_keys'])} unexpected keys; max |logit diff| {reload['max_logit_diff']:.2e}"
    )

    with step("plot", "plot scores"):
        chosen_by = plan.method + (f" with repair {plan.repair}" if plan.repair != "none" else "")
        plot = plot_scores(
            block_scores, sublayer_scores, list(plan.remove), saved / PLOT_FILE, chosen_by=chosen_by
        )
    size = pk.size_on_disk(saved)
    total = time.perf_counter() - t_start
    say(f"saved to {saved} ({size / 2**20:.0f} MiB); plot: {plot}")
    log(f"total: {total:.1f} s")
    return {
        "model": model_spec,
        "out": str(saved),
        "ratio": ratio,
        "budget": {
            "ratio": ratio,
            "target_params": target,
            "block_params": ir.block_params(),
            "excludes": "embeddings and head",
        },
        "calibration": {"text": CALIB_TEXT, "windows": cal_w.num_windows, "seq_len": cal_w.seq_len},
        "plan": {
            "method": plan.method,
            "granularity": plan.granularity,
            "repair": plan.repair,
            "remove": list(plan.remove),
            "removed_params": plan.removed_params,
            "block_params": plan.block_params,
            "achieved_ratio": plan.achieved_ratio,
            "uniform": plan.is_uniform,
        },
        "perplexity_before": _ppl(before, EVAL_TEXT),
        "perplexity_after": _ppl(after, EVAL_TEXT),
        "params_before": params_before,
        "params_after": params_after,
        "size_on_disk_bytes": size,
        "reload": reload,
        "plot": str(plot),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "total_s": round(total, 2),
    }


def _ppl(res: Any, text: str) -> dict[str, Any]:
    return {**dataclasses.asdict(res), "text": text}


def _reload_and_compare(
    model: torch.nn.Module, folder: Path, probe: torch.Tensor, *, uniform: bool
) -> dict[str, Any]:
    """Reload ``folder`` and check it computes the in-memory model's logits on ``probe``."""
    if uniform:
        import transformers
        from transformers import AutoModelForCausalLM

        from ..adapters.base import from_pretrained_with_info

        loader = "transformers.AutoModelForCausalLM.from_pretrained"
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            reloaded, info = from_pretrained_with_info(AutoModelForCausalLM, folder)
        finally:
            transformers.logging.set_verbosity(verbosity)
        missing = sorted(info.get("missing_keys", ()))
        unexpected = sorted(info.get("unexpected_keys", ()))
    else:
        from ..io.checkpoint import load_pruned

        loader = "prunekit_core.load_pruned"
        reloaded = load_pruned(folder)  # raises on any missing or unexpected weight
        missing, unexpected = [], []
    reloaded.eval()
    with torch.inference_mode():
        want = model(input_ids=probe, use_cache=False).logits
        got = reloaded(input_ids=probe, use_cache=False).logits
    diff = float((want.float() - got.float()).abs().max())
    ok = not missing and not unexpected and diff <= 1e-4
    if not ok:
        raise CheckpointError(
            f"the reloaded model in {folder} differs from the pruned model in memory "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, max logit diff {diff:.3g})"
        )
    return {
        "loader": loader,
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "max_logit_diff": diff,
        "ok": ok,
    }
