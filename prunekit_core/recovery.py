"""Recovery after pruning: LoRA healing with peft, merged back into plain weights.

:func:`heal_lora` attaches LoRA adapters (``peft``) to every ``nn.Linear`` inside the IR's blocks (every
tower the adapter describes: the decoder of a dense or MoE model, the language model of a multimodal one),
trains them on token windows with the causal-LM loss, and merges them into the weights, so the result is a
plain ``transformers`` model of the same shapes: it saves and reloads like any pruned model. Fused 3-D
expert tensors are not ``nn.Linear`` and stay frozen.

Deterministic for a seed: the LoRA initialisation, the order of the windows and the optimiser run from
``seed`` (on a fixed number of threads). The training text must be neither the calibration nor the
evaluation text; :func:`training_windows` cuts it from the packaged corpora.

The closed-form ``repair`` recovery is the least-squares fold of :mod:`prunekit_core.repair` (``--repair
lsq``): it adds no parameters.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .adapter import get_module
from .defaults import DEFAULT_HEAL_TEXTS
from .errors import CalibrationError, PlanError
from .ir import ModelIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraReport:
    """What one LoRA healing run did (recorded in the plan's ``recovery`` field)."""

    method: str
    rank: int
    alpha: float
    lr: float
    steps: int
    batch_size: int
    seq_len: int
    seed: int
    tokens: int
    targets: int
    trainable_params: int
    loss_first: float
    loss_last: float
    wall_s: float
    merge_max_abs_diff: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_targets(model: nn.Module, ir: ModelIR) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules inside the IR's blocks (what LoRA adapts)."""
    names: list[str] = []
    for block in ir.blocks():
        root = get_module(model, block.module)
        for name, mod in root.named_modules():
            if isinstance(mod, nn.Linear):
                names.append(f"{block.module}.{name}" if name else block.module)
    return names


def _mean_loss(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def heal_lora(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    ir: ModelIR | None = None,
    rank: int = 8,
    alpha: float | None = None,
    lr: float = 1e-3,
    steps: int = 110,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, LoraReport]:
    """Train LoRA adapters on ``windows`` ([n, seq_len] token ids), merge them, return the plain model.

    The learning rate warms up linearly over the first 10% of ``steps`` and decays linearly to zero. The
    returned model is ``model`` itself with merged weights (no adapter modules remain); the report says how
    far the merged model's logits are from the adapter model's on the first batch (``merge_max_abs_diff``).
    """
    from peft import LoraConfig, get_peft_model

    from .plugins import select_adapter

    ids = getattr(windows, "ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise CalibrationError("heal_lora needs integer token windows shaped [n, seq_len]")
    if rank < 1 or steps < 1 or batch_size < 1 or not (lr > 0):
        raise PlanError(
            f"LoRA options must be positive (rank={rank}, steps={steps}, batch_size={batch_size}, lr={lr})"
        )
    ir = ir or select_adapter(model).build_ir(model)
    targets = lora_targets(model, ir)
    if not targets:
        raise PlanError("LoRA healing found no nn.Linear inside the model's blocks to adapt")
    alpha = float(2 * rank if alpha is None else alpha)
    was_training = model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}  # peft freezes the base weights

    def _restore(base: nn.Module) -> None:
        base.train(was_training)
        for n, p in base.named_parameters():
            p.requires_grad_(grads.get(n, True))

    torch.manual_seed(seed)
    # peft annotates lora_alpha as int, but scales by lora_alpha / r and takes a float (prunekit's default is 2r)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # see the comment above
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1.0 - s / steps)
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(ids.shape[0], generator=gen)
    first = ids[order[:batch_size]]

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("LoRA healing", total=steps)
    peft_model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    pos = 0
    try:
        for _step in range(steps):
            if pos + batch_size > len(order):
                order = torch.randperm(ids.shape[0], generator=gen)
                pos = 0
            batch = ids[order[pos : pos + batch_size]]
            pos += batch_size
            loss = peft_model(input_ids=batch, labels=batch).loss
            if not math.isfinite(float(loss.detach())):
                raise PlanError(
                    f"LoRA healing diverged (loss {float(loss.detach())}); lower the learning rate"
                )
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(task, advance=1, description=f"LoRA healing (loss {losses[-1]:.3f})")
    except BaseException:
        _restore(peft_model.unload())  # drop the adapters unmerged: the model is as it was before
        raise
    finally:
        if bar is not None:
            bar.stop()
    wall = time.perf_counter() - t0
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=first).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        diff = float((merged(input_ids=first).logits - adapted).abs().max())
    _restore(merged)
    tail = losses[-max(1, len(losses) // 10) :]
    report = LoraReport(
        method="lora",
        rank=rank,
        alpha=alpha,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        seq_len=int(ids.shape[1]),
        seed=seed,
        tokens=steps * batch_size * int(ids.shape[1]),
        targets=len(targets),
        trainable_params=sum(p.numel() for p in trainable),
        loss_first=losses[0],
        loss_last=sum(tail) / len(tail),
        wall_s=wall,
        merge_max_abs_diff=diff,
    )
    log.info("LoRA healing: %s", report)
    plan = getattr(merged, "_prunekit_plan", None)
    if plan is not None:  # a saved model says how it was made
        merged._prunekit_plan = plan.model_copy(update={"recovery": report.as_dict()})
    return merged, report


def training_windows(
    tokenizer: Any,
    *,
    seq_len: int,
    texts: tuple[str, ...] = DEFAULT_HEAL_TEXTS,
    exclude: tuple[str, ...] = (),
    skip_tokens: dict[str, int] | None = None,
) -> torch.Tensor:
    """Token windows for healing from ``texts``, none of which may be in ``exclude`` (the evaluation text).

    ``skip_tokens`` maps a text to the number of tokens at its start to leave out (the calibration
    windows, when the calibration text is also a healing text), so healing never sees them.
    """
    from .text import read_text, token_windows

    clash = sorted(set(texts) & set(exclude))
    if clash:
        raise CalibrationError(
            f"healing text {clash} is also the evaluation text: choose other --lora-text texts"
        )
    parts = []
    for spec in texts:
        w = token_windows(tokenizer, read_text(spec), seq_len=seq_len, source=spec)
        skip = (skip_tokens or {}).get(spec, 0)
        parts.append(w[math.ceil(skip / seq_len) :])
    out = torch.cat(parts)
    if out.shape[0] < 1:
        raise CalibrationError(f"no healing windows left in {list(texts)} after skipping calibration tokens")
    return out
