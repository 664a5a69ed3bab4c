"""Per-layer compression errors: quantization, unstructured pruning and whole-layer removal (issue 20).

The question (Kuzmin et al. 2023, "Pruning vs Quantization: Which is Better?", arXiv 2307.02973): at equal
compression, which error is smaller? The paper compares, per layer and at equal storage (b-bit
quantization against pruning that keeps a fraction b/16 of fp16 weights, mask cost ignored), the
signal-to-quantization-noise ratio ``SQNR = 10 log10(||y||^2 / ||y - y_hat||^2)`` of

* its analytical model (section 2): magnitude pruning of the weights drawn from a distribution. In weight
  space magnitude pruning is the optimal mask for a given sparsity, so its SNR is the ceiling of every
  pruning pattern, whole-layer removal included (:func:`gaussian_pruning_snr_db`,
  :func:`weight_pruning_snr_db`);
* the layer-wise post-training problem (section 3) ``min_{m, w'} ||X (m * w') - X w||^2``, whose optimum
  lies between a lower bound and what a solver attains. Here the attained side is OBS (SparseGPT's
  column-wise Optimal Brain Surgeon, :func:`obs_prune`) and magnitude pruning (:func:`magnitude_prune`).

:func:`layer_errors` measures, for every decoder block of a causal LM on calibration windows, the SQNR of
the block's output (the residual stream after the block) when the block's linear weights are quantized,
magnitude- or OBS-pruned at the sparsity of equal compression, or when the block is removed whole (its
output is then its input: the error is the block's contribution to the stream). It then removes the k
blocks ShortGPT ranks first (lowest Block Influence) and compares the error at the end of the stack with
unstructured pruning of every block at the same fraction of the body's parameters.

Everything is measured one-shot on the unmodified model's block inputs (cached by
:class:`~prunekit_core.scoring.calibration.TrialRunner`); the Hessians ``X^T X`` of every linear come from
the same pass (not re-collected after earlier blocks are pruned, as SparseGPT's sequential mode would).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..ir.errors import CalibrationError

__all__ = [
    "BlockErrors",
    "ErrorsResult",
    "RemovalPoint",
    "gaussian_pruning_snr_db",
    "layer_errors",
    "layerwise_error",
    "magnitude_prune",
    "obs_prune",
    "render_errors_markdown",
    "sqnr_db",
    "weight_pruning_snr_db",
]

#: storage bits of an unquantized weight: the paper's reference (fp16) for "equal compression"
BASE_BITS = 16


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in dB, in float64: ``inf`` for an exact copy, 0 dB
    for an all-zero approximation."""
    ref = reference.detach().double()
    err = float((ref - approx.detach().double()).pow(2).sum())
    sig = float(ref.pow(2).sum())
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def _db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _prune_count(numel: int, sparsity: float) -> int:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(sparsity * numel))


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``weight`` with its ``round(sparsity * numel)`` smallest-magnitude entries set to zero (one threshold
    for the whole tensor, as in the paper; no update of the kept weights)."""
    k = _prune_count(weight.numel(), sparsity)
    out = weight.detach().clone()
    if k:
        idx = weight.detach().abs().flatten().topk(k, largest=False).indices
        out.view(-1)[idx] = 0
    return out


def layerwise_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer-wise objective ``||X w'^T - X w^T||^2 = tr((w - w') H (w - w')^T)`` with ``H = X^T X``
    (``weight``: out x in, as an ``nn.Linear`` stores it)."""
    d = (weight.double() - approx.double()).to(hessian.device)
    return float(((d @ hessian.double()) * d).sum())


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Optimal Brain Surgeon pruning of an ``nn.Linear`` weight (out x in) at ``sparsity`` against the
    layer-wise objective with Hessian ``hessian = X^T X`` (in x in): SparseGPT's algorithm (Frantar and
    Alistarh 2023). Columns are processed left to right in blocks of ``blocksize``; each block's mask keeps
    the weights with the largest OBS saliency ``w^2 / [H^-1]_jj^2`` (so the whole tensor reaches the
    sparsity), and every pruned weight's error is spread over the columns not yet processed through the
    Cholesky factor of ``H^-1``. ``percdamp`` of the mean diagonal is added to ``H`` for stability.

    Written out (some 30 lines) rather than imported: the reference implementation is a research script,
    not a package.
    """
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    n = w.shape[1]
    if h.shape != (n, n):
        raise ValueError(f"hessian shape {tuple(h.shape)} does not match weight inputs {n}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        sal = w1.pow(2) / torch.diag(hinv1).reshape(1, -1).pow(2)
        k = _prune_count(sal.numel(), sparsity)
        mask = torch.zeros_like(w1, dtype=torch.bool)
        if k:
            mask.view(-1)[sal.flatten().topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            q = col.clone()
            q[mask[:, i]] = 0.0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


def gaussian_pruning_snr_db(sparsity: float) -> float:
    """Kuzmin et al.'s analytical pruning SNR for Gaussian weights: magnitude pruning at ``sparsity`` zeroes
    ``|w| < t`` with ``P(|z| < t) = sparsity``, leaving the error ``E[z^2; |z| < t] = s - 2 t phi(t)``."""
    if sparsity <= 0.0:
        return math.inf
    if sparsity >= 1.0:
        return 0.0
    t = math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(sparsity, dtype=torch.float64)))
    err = sparsity - 2.0 * t * math.exp(-t * t / 2.0) / math.sqrt(2.0 * math.pi)
    return -10.0 * math.log10(err) if err > 0 else math.inf


def weight_pruning_snr_db(weights: Sequence[torch.Tensor], sparsity: float) -> float:
    """Weight-space SNR of magnitude pruning at ``sparsity`` over ``weights`` taken together: the highest
    SNR any pattern of that sparsity reaches in weight space (zeroing the smallest entries is optimal there),
    so whole-layer removal can never exceed it."""
    flat = torch.cat([w.detach().double().flatten() for w in weights])
    k = _prune_count(flat.numel(), sparsity)
    sq = flat.pow(2)
    noise = float(sq.topk(k, largest=False).values.sum()) if k else 0.0
    return _db(float(sq.sum()), noise)


# --- the study on a model -------------------------------------------------------------------------------


@dataclass
class BlockErrors:
    """One decoder block's output SQNR (dB) under each compression.

    ``removal``: the block removed whole (output = input). ``block_influence``: ShortGPT's BI, ``1 - mean
    cos(input, output)`` over tokens. ``quant``: format -> SQNR. ``magnitude``/``obs``: sparsity -> SQNR.
    ``weight_snr``: sparsity -> weight-space SNR of magnitude pruning of the block's linears (the ceiling of
    every pattern at that sparsity); ``quant_weight_snr``: format -> weight-space SNR.
    """

    block: str
    index: int
    params: int
    removal: float
    block_influence: float
    quant: dict[str, float] = field(default_factory=dict)
    quant_weight_snr: dict[str, float] = field(default_factory=dict)
    magnitude: dict[float, float] = field(default_factory=dict)
    obs: dict[float, float] = field(default_factory=dict)
    weight_snr: dict[float, float] = field(default_factory=dict)


@dataclass
class RemovalPoint:
    """ShortGPT removing ``blocks`` (``ratio``: their share of the body's parameters) against unstructured
    pruning of every block at that ratio, as SQNR (dB) of the stream at the end of the stack.

    ``removal_weight_snr`` / ``bound_weight_snr``: weight-space SNR over the body of the removal and of the
    best pattern at that sparsity (magnitude); ``gaussian``: the paper's analytical value for Gaussian
    weights. ``removal`` / ``magnitude`` / ``obs``: output SQNR at the end of the stack.
    """

    blocks: list[str]
    ratio: float
    removal: float
    magnitude: float
    obs: float
    removal_weight_snr: float
    bound_weight_snr: float
    gaussian: float


@dataclass
class ErrorsResult:
    """What :func:`layer_errors` measured. ``formats``: format -> (bits per weight, equal-compression
    sparsity ``1 - bits/16``). ``sparsities``: every sparsity measured per block.
    ``block_share``: one block's share of the body's parameters (the compression of removing one block)."""

    blocks: list[BlockErrors]
    removals: list[RemovalPoint]
    formats: dict[str, tuple[float, float]]
    sparsities: list[float]
    tokens: int
    block_share: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        return {
            "tokens": self.tokens,
            "block_share": self.block_share,
            "formats": {k: {"bits": b, "sparsity": s} for k, (b, s) in self.formats.items()},
            "sparsities": self.sparsities,
            "blocks": [
                {
                    "block": b.block,
                    "params": b.params,
                    "removal_db": num(b.removal),
                    "block_influence": b.block_influence,
                    "quant_db": {k: num(v) for k, v in b.quant.items()},
                    "quant_weight_snr_db": {k: num(v) for k, v in b.quant_weight_snr.items()},
                    "magnitude_db": {str(k): num(v) for k, v in b.magnitude.items()},
                    "obs_db": {str(k): num(v) for k, v in b.obs.items()},
                    "weight_snr_db": {str(k): num(v) for k, v in b.weight_snr.items()},
                }
                for b in self.blocks
            ],
            "removals": [
                {
                    "blocks": r.blocks,
                    "ratio": r.ratio,
                    "removal_db": num(r.removal),
                    "magnitude_db": num(r.magnitude),
                    "obs_db": num(r.obs),
                    "removal_weight_snr_db": num(r.removal_weight_snr),
                    "bound_weight_snr_db": num(r.bound_weight_snr),
                    "gaussian_db": num(r.gaussian),
                }
                for r in self.removals
            ],
        }


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@contextlib.contextmanager
def _weights_replaced(new: dict[nn.Linear, torch.Tensor]) -> Iterator[None]:
    """Swap linear weights for the ``with`` body; the originals come back on exit (even on error)."""
    old = {m: m.weight.data for m in new}
    try:
        for m, w in new.items():
            m.weight.data = w.to(m.weight.dtype)
        yield
    finally:
        for m, w in old.items():
            m.weight.data = w


def _call(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    kw = dict(kwargs)
    args = kw.pop("__args__", ())
    out = block(x, *args, **kw)
    y: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return y


def _hessians(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> dict[nn.Linear, torch.Tensor]:
    """``X^T X`` (float64) of every linear's input during one call of ``block`` on ``x``; linears that
    read the same tensor (q/k/v, gate/up) share one matrix."""
    # keyed by the input tensor's id; the tensor is kept alive beside its matrix so no id is reused
    by_input: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[nn.Linear, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        inp = args[0]
        key = id(inp)
        if key not in by_input:
            a = inp.detach().reshape(-1, inp.shape[-1]).double()
            by_input[key] = (inp, a.T @ a)
        assert isinstance(m, nn.Linear)  # registered on linears only
        out[m] = by_input[key][1]

    handles = [m.register_forward_pre_hook(hook) for m in _linears(block).values()]
    try:
        _call(block, x, kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


def _pruned(
    hess: dict[nn.Linear, torch.Tensor], sparsity: float, method: str
) -> dict[nn.Linear, torch.Tensor]:
    if method == "magnitude":
        return {m: magnitude_prune(m.weight.data, sparsity) for m in hess}
    return {m: obs_prune(m.weight.data, h, sparsity) for m, h in hess.items()}


def layer_errors(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    formats: Sequence[str] = ("int8", "int4_g128"),
    sparsities: Sequence[float] = (),
    max_removed: int = 6,
    progress: Any = None,
) -> ErrorsResult:
    """Measure every decoder block's output SQNR under quantization (``formats``), magnitude and OBS
    pruning (at each format's equal-compression sparsity ``1 - bits/16``, at ``sparsities``, and at one
    block's share of the body) and whole-block removal, on ``windows`` (token ids, windows x seq_len) of
    calibration text; then ShortGPT's removal of the 1..``max_removed`` lowest-BI blocks against pruning
    every block at the same parameter share (see the module docstring). ``progress(label)`` is called
    before each block, when given."""
    from ..quant.base import get_quant_format
    from ..registry.plugins import select_adapter
    from ..scoring.calibration import TrialRunner

    fmts = {name: get_quant_format(name) for name in formats}
    runner = TrialRunner(model, select_adapter(model), windows)
    tower = runner.tower
    blocks = runner.blocks
    if not blocks:
        raise CalibrationError("the model has no decoder blocks to measure")
    body = sum(b.params for b in tower.blocks)
    one_block = tower.blocks[0].params / body
    fmt_info: dict[str, tuple[float, float]] = {}
    for name, fmt in fmts.items():
        lin = [m.weight for m in _linears(blocks[0]).values()]
        bits = sum(fmt.bits(tuple(w.shape)) for w in lin) / sum(w.numel() for w in lin)
        fmt_info[name] = (bits, max(0.0, 1.0 - bits / BASE_BITS))
    sp = sorted({round(s, 4) for s in [*sparsities, *(s for _, s in fmt_info.values()), one_block]})

    results: list[BlockErrors] = []
    hessians: list[dict[nn.Linear, torch.Tensor]] = []
    cache: dict[tuple[str, float], dict[nn.Linear, torch.Tensor]] = {}
    with torch.inference_mode():
        for i, (blk, info) in enumerate(zip(blocks, tower.blocks, strict=True)):
            if progress is not None:
                progress(f"block {i + 1}/{len(blocks)}")
            x, kw = runner.inputs[i], runner.kwargs[i]
            hess = _hessians(blk, x, kw)
            hessians.append(hess)
            y = _call(blk, x, kw)
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            be = BlockErrors(
                block=info.id,
                index=i,
                params=info.params,
                removal=sqnr_db(y, x),
                block_influence=float(1.0 - cos.mean()),
            )
            weights = [m.weight.data for m in hess]
            for name, fmt in fmts.items():
                q = {m: fmt.fake_quantize(m.weight.data) for m in hess}
                with _weights_replaced(q):
                    be.quant[name] = sqnr_db(y, _call(blk, x, kw))
                noise = sum(float((m.weight.data.double() - w.double()).pow(2).sum()) for m, w in q.items())
                be.quant_weight_snr[name] = _db(sum(float(w.double().pow(2).sum()) for w in weights), noise)
            for s in sp:
                be.weight_snr[s] = weight_pruning_snr_db(weights, s)
                for method, into in (("magnitude", be.magnitude), ("obs", be.obs)):
                    pruned = _pruned(hess, s, method)
                    if s == round(one_block, 4):  # kept for ShortGPT's one-block point (same sparsity)
                        cache.setdefault((method, s), {}).update(pruned)
                    with _weights_replaced(pruned):
                        into[s] = sqnr_db(y, _call(blk, x, kw))
            results.append(be)

        removals = _shortgpt_points(runner, results, hessians, body, max_removed, progress, cache)
    return ErrorsResult(
        blocks=results,
        removals=removals,
        formats=fmt_info,
        sparsities=sp,
        tokens=int(windows.numel()),
        block_share=round(one_block, 4),
    )


def _run_stack(runner: Any, skipped: set[int]) -> torch.Tensor:
    x = runner.inputs[0]
    for i, blk in enumerate(runner.blocks):
        if i not in skipped:
            x = _call(blk, x, runner.kwargs[i])
    out: torch.Tensor = x
    return out


def _shortgpt_points(
    runner: Any,
    blocks: list[BlockErrors],
    hessians: list[dict[nn.Linear, torch.Tensor]],
    body: int,
    max_removed: int,
    progress: Any,
    cache: dict[tuple[str, float], dict[nn.Linear, torch.Tensor]],
) -> list[RemovalPoint]:
    """ShortGPT's k lowest-BI blocks removed vs every block pruned at their parameter share, k = 1.."""
    ref = _run_stack(runner, set())
    order = sorted(range(len(blocks)), key=lambda i: blocks[i].block_influence)
    all_weights = [m.weight.data for h in hessians for m in h]
    total_sq = sum(float(w.double().pow(2).sum()) for w in all_weights)
    points = []
    for k in range(1, min(max_removed, len(blocks) - 1) + 1):
        if progress is not None:
            progress(f"ShortGPT {k} block(s)")
        gone = set(order[:k])
        ratio = sum(blocks[i].params for i in gone) / body
        removed_sq = sum(float(m.weight.data.double().pow(2).sum()) for i in gone for m in hessians[i])
        point = {"removal": sqnr_db(ref, _run_stack(runner, gone))}
        for method in ("magnitude", "obs"):
            new = cache.get((method, round(ratio, 4)))
            if new is None:
                new = {}
                for h in hessians:
                    new.update(_pruned(h, ratio, method))
            with _weights_replaced(new):
                point[method] = sqnr_db(ref, _run_stack(runner, set()))
        points.append(
            RemovalPoint(
                blocks=[blocks[i].block for i in sorted(gone)],
                ratio=ratio,
                removal=point["removal"],
                magnitude=point["magnitude"],
                obs=point["obs"],
                removal_weight_snr=_db(total_sq, removed_sq),
                bound_weight_snr=weight_pruning_snr_db(all_weights, ratio),
                gaussian=gaussian_pruning_snr_db(ratio),
            )
        )
    return points


# --- the report -----------------------------------------------------------------------------------------


def _f(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _sum_db(values: Sequence[float]) -> float:
    """SQNR of independent errors added: ``-10 log10(sum 10^(-v/10))``."""
    return -10.0 * math.log10(sum(10 ** (-v / 10.0) for v in values)) if values else math.inf


def spread_sqnr(blocks: Sequence[BlockErrors], sparsity: float, method: str) -> float:
    """Predicted stream SQNR of pruning every block at ``sparsity`` (their relative errors added)."""
    return _sum_db([(b.obs if method == "obs" else b.magnitude)[sparsity] for b in blocks])


def render_errors_markdown(res: ErrorsResult) -> str:
    """Two tables: every block (quantization vs pruning at equal compression, removal vs the pruning
    bounds at one block's share of the body) and ShortGPT's k-block removals at the end of the stack."""
    one = res.block_share
    fmt_cols = list(res.formats)
    head = ["block", "BI", "removal"]
    for f in fmt_cols:
        bits, s = res.formats[f]
        head += [f"{f} ({bits:.2f} b)", f"mag {s:.0%}", f"OBS {s:.0%}"]
    head += [f"OBS {one:.1%} (all blocks)", "removal vs bounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    obs_all = spread_sqnr(res.blocks, one, "obs")
    mag_all = spread_sqnr(res.blocks, one, "magnitude")
    for b in res.blocks:
        row = [b.block, f"{b.block_influence:.3f}", _f(b.removal)]
        for f in fmt_cols:
            s = round(res.formats[f][1], 4)
            row += [_f(b.quant[f]), _f(b.magnitude[s]), _f(b.obs[s])]
        row.append(_f(obs_all))
        if b.removal >= obs_all:
            verdict = "inside (at or above OBS)"
        elif b.removal >= mag_all:
            verdict = f"inside the magnitude..OBS band, {obs_all - b.removal:.1f} dB below OBS"
        else:
            verdict = f"outside: {obs_all - b.removal:.1f} dB below OBS"
        row.append(verdict)
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| k | removed (ShortGPT, lowest BI) | share of body | removal | magnitude | OBS | "
        "weight SNR: removal | weight SNR: bound (magnitude) | Gaussian bound | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(res.removals, 1):
        verdict = (
            "inside (>= OBS)"
            if r.removal >= r.obs
            else ("between magnitude and OBS" if r.removal >= r.magnitude else "outside (below magnitude)")
        )
        lines.append(
            f"| {k} | {', '.join(r.blocks)} | {r.ratio:.1%} | {_f(r.removal)} | {_f(r.magnitude)} | "
            f"{_f(r.obs)} | {_f(r.removal_weight_snr)} | {_f(r.bound_weight_snr)} | {_f(r.gaussian)} | "
            f"{verdict} |"
        )
    return "\n".join(lines) + "\n"


def study_errors(
    model: str,
    *,
    calib: str,
    seq_len: int = 256,
    windows: int = 32,
    formats: Sequence[str] = ("int8", "int4_g128"),
    sparsities: Sequence[float] = (),
    max_removed: int = 6,
    markdown: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: Any = None,
) -> ErrorsResult:
    """What ``prunekit study errors`` does, as one call: check the inputs, load ``model``, take ``windows``
    x ``seq_len`` tokens of ``calib`` and run :func:`layer_errors`; with ``markdown``, write
    :func:`render_errors_markdown`'s tables to that file (atomically)."""
    from ..io.text import load_windows
    from ..quant.base import get_quant_format
    from .pipeline import Clock, Reporter, check_model_spec, check_text, load_timed

    rep = reporter if reporter is not None else Reporter()
    for name in formats:  # cheap checks first: an unknown format fails before the model loads
        get_quant_format(name)
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise CalibrationError(f"--sparsity {s} is not between 0 and 1 (exclusive): give e.g. 0.5")
    if max_removed < 1:
        raise CalibrationError(f"--max-removed {max_removed} must be at least 1")
    check_text(calib)
    check_model_spec(model)
    net, tok, _src = load_timed(rep, Clock(rep), model, allow_pickle, trust_remote_code)
    win = load_windows(tok, calib, seq_len=seq_len, num_windows=windows)
    rep.info(f"calibration: {win.num_windows} windows x {win.seq_len} tokens of {calib}")
    with rep.step("errors"):
        res = layer_errors(
            net, win.ids, formats=formats, sparsities=sparsities, max_removed=max_removed, progress=rep.info
        )
    if markdown is not None:
        from ..io.atomic import write_text

        write_text(markdown, render_errors_markdown(res))
    return res
