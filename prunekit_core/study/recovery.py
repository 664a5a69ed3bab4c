"""Recovery after pruning: LoRA healing with peft, merged back into plain weights.

:func:`heal_lora` attaches LoRA adapters (``peft``) to every ``nn.Linear`` inside the IR's blocks (every
tower the adapter describes: the decoder of a dense or MoE model, the language model of a multimodal one),
trains them on token windows with the causal-LM loss, and merges them into the weights, so the result is a
plain ``transformers`` model of the same shapes: it saves and reloads like any pruned model. Fused 3-D
expert tensors are not ``nn.Linear`` and stay frozen.

Deterministic for a seed: the LoRA initialisation, the order of the windows and the optimiser run from
``seed`` (on a fixed number of threads and the same ``precision``).

Speed: a step costs about four times the model's parameters in FLOPs per token (the forward, and the
input gradients of every frozen layer back to the first adapted one; frozen weights get no gradients). On a CPU with native bfloat16 matrix
multiplication (``avx512_bf16`` or AMX; e.g. AMD Zen 4, Intel Sapphire Rapids), ``precision="auto"`` runs
the matrix multiplications under bfloat16 autocast (the weights, the adapters and the optimiser stay fp32);
elsewhere it trains in fp32. ``progress=True`` reports step, loss, steps per second, threads and the
machine's load on stderr: a bar on a terminal, a line every ``progress_every`` seconds otherwise. Training
with several threads on a machine whose cores other processes also use can be several times slower than
with one thread (each parallel region waits for its slowest thread): the first progress line says so when
the load average exceeds this process's threads by ``BUSY_MARGIN``. The training text must be neither the calibration nor the
evaluation text; :func:`training_windows` cuts it from the packaged corpora.

The closed-form ``repair`` recovery is the least-squares fold of :mod:`prunekit_core.surgery.repair` (``--repair
lsq``): it adds no parameters.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import get_module
from ..ir.defaults import DEFAULT_HEAL_TEXTS, LORA_PRECISIONS
from ..ir.errors import CalibrationError, PlanError
from ..ir.model import ModelIR

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
    steps_per_s: float
    threads: int
    precision: str

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


PRECISIONS = LORA_PRECISIONS

#: Load beyond this process's own threads from which healing calls the machine busy (other processes keep
#: most of a core running).
BUSY_MARGIN = 0.75


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (``avx512_bf16`` or AMX), per oneDNN."""
    try:
        available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return bool(available and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's query
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bfloat16 matmul, else ``fp32``; other values as given."""
    if precision not in PRECISIONS:
        raise PlanError(f"LoRA precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class _HealProgress:
    """Progress of LoRA healing on stderr: a ``rich`` bar on a terminal, else a line every ``every`` s.

    Each report has the step, the loss, steps per second over the steps so far, the torch thread count and
    the 1-minute load average against the cores, so a slow run says whether the machine was busy.
    """

    def __init__(self, steps: int, every: float) -> None:
        self.steps = steps
        self.every = every
        self.threads = torch.get_num_threads()
        self.cores = cpu_cores()
        self.t0 = time.perf_counter()
        self.last = -math.inf
        self.bar: Any = None
        load = load_average()
        # this process's threads account for about `threads` of the load: more means other work competes
        if load is not None and self.threads > 1 and load > min(self.threads, self.cores) + BUSY_MARGIN:
            self._line(
                f"LoRA healing: the machine is busy (load {load:.1f} on {self.cores} cores, {self.threads} "
                "torch threads here); each step waits for the slowest thread, so one thread "
                "(OMP_NUM_THREADS=1) can be several times faster on a shared machine"
            )
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("LoRA healing"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("heal", total=steps, status="")

    @staticmethod
    def _line(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def status(self, step: int, loss: float, *, short: bool = False) -> str:
        """``loss 3.412, 0.21 steps/s (4.8 s/step), 2 threads, load 1.9 on 2 cores, 7.0 min left``.

        ``short``: loss and speed only (the bar has the step and the time).
        """
        wall = time.perf_counter() - self.t0
        rate = step / wall if wall > 0 else 0.0
        parts = [f"loss {loss:.3f}", f"{rate:.2f} steps/s ({1 / rate if rate else math.inf:.1f} s/step)"]
        if short:
            return ", ".join(parts)
        parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        load = load_average()
        if load is not None:
            parts.append(f"load {load:.1f} on {self.cores} cores")
        if step < self.steps and rate > 0:
            parts.append(f"{(self.steps - step) / rate / 60:.1f} min left")
        return ", ".join(parts)

    def update(self, step: int, loss: float) -> None:
        """After ``step`` (1-based) steps, the last with ``loss``."""
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=self.status(step, loss, short=True))
        elif step in (1, self.steps) or now - self.last >= self.every:
            self._line(f"LoRA healing step {step}/{self.steps}: {self.status(step, loss)}")
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
    progress_every: float = 10.0,
    precision: str = "auto",
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, LoraReport]:
    """Train LoRA adapters on ``windows`` ([n, seq_len] token ids), merge them, return the plain model.

    The learning rate warms up linearly over the first 10% of ``steps`` and decays linearly to zero. The
    returned model is ``model`` itself with merged weights (no adapter modules remain); the report says how
    far the merged model's logits are from the adapter model's on the first batch (``merge_max_abs_diff``).
    ``precision``: ``fp32``, ``bf16`` (bfloat16 autocast for the forward and backward; the weights, adapters
    and optimiser stay fp32) or ``auto`` (bf16 on a CPU with native bfloat16 matmul, else fp32).
    ``progress=True`` reports on stderr (see :class:`_HealProgress`), every ``progress_every`` seconds when
    stderr is not a terminal. ``on_step(step, loss)`` is called after each step (1-based), e.g. to time it.
    To record the healing in a checkpoint, put the report in the plan you save:
    ``save_pruned(model, out, plan=plan.model_copy(update={"recovery": report.as_dict()}))``.
    """
    from peft import LoraConfig, get_peft_model

    from ..registry.plugins import select_adapter

    ids = getattr(windows, "ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise CalibrationError("heal_lora needs integer token windows shaped [n, seq_len]")
    if rank < 1 or steps < 1 or batch_size < 1 or not (lr > 0):
        raise PlanError(
            f"LoRA options must be positive (rank={rank}, steps={steps}, batch_size={batch_size}, lr={lr})"
        )
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
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

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = _HealProgress(steps, progress_every) if progress else None
    peft_model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    pos = 0
    try:
        for step in range(steps):
            if pos + batch_size > len(order):
                order = torch.randperm(ids.shape[0], generator=gen)
                pos = 0
            batch = ids[order[pos : pos + batch_size]]
            pos += batch_size
            with autocast:
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
                bar.update(step + 1, losses[-1])
            if on_step is not None:
                on_step(step + 1, losses[-1])
    except BaseException:
        _restore(peft_model.unload())  # drop the adapters unmerged: the model is as it was before
        raise
    finally:
        if bar is not None:
            bar.close()
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
        steps_per_s=steps / wall if wall > 0 else 0.0,
        threads=torch.get_num_threads(),
        precision=precision,
    )
    log.info("LoRA healing: %s", report)
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
    from ..io.text import read_text, token_windows

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
