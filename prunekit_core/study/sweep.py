"""``prunekit sweep``: a grid of pruning plans x quantization formats, kept in a resumable SQLite store.

What callers may rely on:

* :class:`SweepConfig` (pydantic, ``extra="forbid"``) validates a YAML or JSON file before any work; an error
  names the field (``formats.2``, ``ratios.0``...) and what would fix it.
* One row per finished cell, inserted and committed the moment the cell finishes, keyed by the cell id
  ``method|ratio|format``. A sweep killed at any moment and started again skips the rows it has and runs
  the rest: no row is lost or duplicated (the key is the table's primary key).
* A store remembers the model, texts, quantization scope and dtype it was made with; resuming with a
  different one is an error (extending methods, ratios or formats is allowed: new cells run).
* Executors: ``serial`` (this process, cells one after another), ``local`` (a process pool, by default one
  single-threaded worker per CPU core) and ``ray`` (the optional ``prunekit-core[ray]`` extra; a Ray
  cluster, or a local Ray instance when no address is given). All run the same :func:`run_cell`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..ir.defaults import EXECUTORS, PlannerName, RepairName
from ..ir.errors import PrunekitError

__all__ = [
    "Cell",
    "SweepConfig",
    "SweepConfigError",
    "SweepStore",
    "load_sweep_config",
    "plan_cells",
    "run_cell",
    "run_sweep",
]

Executor = Literal["local", "serial", "ray"]

# Only for tests of kill-and-resume: seconds each cell sleeps after its work, so a kill lands mid-sweep.
DELAY_ENV = "PRUNEKIT_SWEEP_CELL_DELAY"


class SweepConfigError(PrunekitError):
    """A sweep config file that cannot be read or does not validate."""


# --- the config ---------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextSpec(_Strict):
    """A text cut into ``windows`` windows of ``seq_len`` tokens (an alias such as ``c4`` or a path)."""

    text: str
    seq_len: int = Field(256, ge=2)
    windows: int = Field(8, ge=1)


class MethodSpec(_Strict):
    """A pruning method: ``name`` labels it; unset choices follow ``prunekit prune`` (``best`` if no metric)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    metric: str | None = None
    planner: PlannerName | None = None
    granularity: str | None = None
    repair: RepairName | None = None


class QuantScopeSpec(_Strict):
    """Which weights a format quantizes besides the decoder blocks' linear weights."""

    embeddings: bool = False
    head: bool = False
    base_bits: int = Field(16, ge=1, le=32, description="bits of every unquantized parameter")


class SweepConfig(_Strict):
    """A sweep: model, calibration and evaluation texts, methods x ratios x formats."""

    model: str
    calibration: TextSpec
    evaluation: TextSpec
    methods: list[MethodSpec] = Field(min_length=1)
    ratios: list[float] = Field(min_length=1)
    formats: list[str] = Field(min_length=1)
    quantize: QuantScopeSpec = QuantScopeSpec()
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, v: Any) -> Any:
        # a bare string is a metric name run as published ("best": prunekit's default planner)
        if isinstance(v, list):
            return [
                {"name": m} | ({} if m == "best" else {"metric": m}) if isinstance(m, str) else m for m in v
            ]
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 <= r < 1:
                raise ValueError(
                    f"ratio {r} is outside [0, 1): a ratio is the fraction of block parameters removed"
                )
        if len(set(v)) != len(v):
            raise ValueError("ratios repeat a value")
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        from ..quant.base import UnknownQuantFormatError, get_quant_format

        for name in v:
            if name != "none":
                try:
                    get_quant_format(name)
                except UnknownQuantFormatError as exc:
                    raise ValueError(str(exc)) from None
        if len(set(v)) != len(v):
            raise ValueError("formats repeat a name")
        return v

    @model_validator(mode="after")
    def _unique_methods(self) -> SweepConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names) or "none" in names:
            raise ValueError("method names must be unique and not 'none' (the unpruned row's name)")
        return self

    def identity(self) -> dict[str, Any]:
        """What every row of a store depends on (methods, ratios and formats only add cells)."""
        return self.model_dump(include={"model", "calibration", "evaluation", "quantize", "dtype"})


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a YAML (``.yaml``/``.yml``) or JSON sweep config.

    Raises :class:`SweepConfigError` naming the file, and for validation errors every bad field.
    """
    p = Path(path)
    if not p.is_file():
        raise SweepConfigError(
            f"sweep config {str(p)!r} does not exist; write a YAML or JSON file (docs/sweep.md)"
        )
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise SweepConfigError(
            f"{p}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from exc
    return validate_sweep_config(data, where=str(p))


def validate_sweep_config(data: Any, *, where: str = "sweep config") -> SweepConfig:
    if not isinstance(data, dict):
        raise SweepConfigError(
            f"{where}: the top level must be a mapping with model, calibration, ... fields"
        )
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise SweepConfigError(
            f"{where} is invalid ({exc.error_count()} errors):\n" + "\n".join(lines)
        ) from None


# --- cells --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One grid point. ``method`` is ``none`` for the unpruned model (ratio 0)."""

    method: str
    ratio: float
    format: str

    @property
    def key(self) -> str:
        return f"{self.method}|{self.ratio:g}|{self.format}"


def plan_cells(config: SweepConfig) -> list[Cell]:
    """The grid, in run order: ratio 0 runs once (method ``none``), other ratios once per method."""
    cells = []
    for ratio in sorted(config.ratios):
        methods = ["none"] if ratio == 0 else [m.name for m in config.methods]
        for method in methods:
            for f in config.formats:
                cells.append(Cell(method, ratio, f))
    return cells


# --- the store ----------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    cell TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    ratio REAL NOT NULL,
    format TEXT NOT NULL,
    perplexity REAL,
    nll REAL,
    eval_tokens INTEGER NOT NULL,
    params INTEGER NOT NULL,
    reference_params INTEGER NOT NULL,
    total_bits INTEGER NOT NULL,
    bits_per_param REAL NOT NULL,
    removed TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds REAL NOT NULL,
    worker TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
"""

COLUMNS = (
    "cell",
    "method",
    "ratio",
    "format",
    "perplexity",
    "nll",
    "eval_tokens",
    "params",
    "reference_params",
    "total_bits",
    "bits_per_param",
    "removed",
    "size",
    "seconds",
    "worker",
    "finished_at",
)


class SweepStore:
    """The SQLite results store (WAL journal; each row its own committed transaction)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def bind(self, config: SweepConfig) -> None:
        """Record the config's identity, or check it against the one recorded."""
        ident = json.dumps(config.identity(), sort_keys=True)
        row = self.db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        if row is None:
            with self.db:
                self.db.execute("INSERT INTO meta VALUES ('identity', ?)", (ident,))
            return
        old = json.loads(row[0])
        new = json.loads(ident)
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            raise SweepConfigError(
                f"{self.path} holds results of a sweep with a different {', '.join(diff)} "
                f"(was {', '.join(f'{k}={old.get(k)!r}' for k in diff)}); pass a new --results path "
                "or restore those fields"
            )

    def done(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT cell FROM results")}

    def add(self, row: dict[str, Any]) -> bool:
        """Insert a finished cell; False (and nothing written) if the cell is already there."""
        values = [row[c] if c not in ("removed", "size") else json.dumps(row[c]) for c in COLUMNS]
        with self.db:
            cur = self.db.execute(
                f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                "ON CONFLICT(cell) DO NOTHING",
                values,
            )
        return cur.rowcount == 1

    def rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM results ORDER BY ratio, method, bits_per_param"
        )
        out = []
        for values in cur:
            row = dict(zip(COLUMNS, values, strict=True))
            row["removed"] = json.loads(row["removed"])
            row["size"] = json.loads(row["size"])
            out.append(row)
        return out


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a results store (raises :class:`PrunekitError` if ``path`` is not one)."""
    p = Path(path)
    if not p.is_file():
        raise PrunekitError(
            f"results store {str(p)!r} does not exist; run `prunekit sweep CONFIG --results {p}`"
        )
    try:
        store = SweepStore(p)
        try:
            return store.rows()
        finally:
            store.close()
    except sqlite3.DatabaseError as exc:
        raise PrunekitError(f"{p} is not a prunekit results store (SQLite): {exc}") from None


# --- one cell (runs in any process) -------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _prepared(config: SweepConfig, *, calibrated: bool) -> dict[str, Any]:
    """Model, windows, calibration and plans, loaded once per process and per config.

    The calibration windows and pass are made only when a pruned cell first needs them (unpruned cells
    do not).
    """
    import torch

    from ..io.loading import load_model
    from ..io.text import load_windows
    from ..scoring.api import calibrate

    key = json.dumps(config.identity(), sort_keys=True)
    if _STATE.get("key") != key:
        _STATE.clear()
        dtype = getattr(torch, config.dtype)
        model, tok, _ = load_model(config.model, dtype=dtype)
        evalw = load_windows(
            tok,
            config.evaluation.text,
            seq_len=config.evaluation.seq_len,
            num_windows=config.evaluation.windows,
        ).ids
        _STATE.update(key=key, model=model, tok=tok, calib=None, eval=evalw, cal=None, plans={})
    if calibrated and _STATE["cal"] is None:
        _STATE["calib"] = load_windows(
            _STATE["tok"],
            config.calibration.text,
            seq_len=config.calibration.seq_len,
            num_windows=config.calibration.windows,
        ).ids
        _STATE["cal"] = calibrate(_STATE["model"], _STATE["calib"])
    return _STATE


def run_cell(config_data: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """Prune (plan made once per process), quantize a copy, measure perplexity and exact size."""
    from ..quant.base import QuantScope, get_quant_format, quantize_model, size_report
    from .evaluate import count_parameters, perplexity
    from .pipeline import prune

    t0 = time.perf_counter()
    config = SweepConfig.model_validate(config_data)
    st = _prepared(config, calibrated=cell.method != "none")
    model = st["model"]
    ref = count_parameters(model).total
    removed: list[str] = []
    if cell.method == "none":
        work = copy.deepcopy(model)
    else:
        pk = (cell.method, cell.ratio)
        # the last pruned (and repaired) model is kept: cells run grouped by (method, ratio), so the next
        # format usually reuses it; one copy bounds the memory. The plan is made once (on the first copy)
        # and applied again when its cells come back.
        if st.get("pruned_key") != pk:
            st["pruned"] = None
            spec = next(m for m in config.methods if m.name == cell.method)
            done = prune(
                copy.deepcopy(model),
                ratio=cell.ratio,
                calib=st["calib"],
                calibration=st["cal"],  # one calibration pass per process, shared by every method
                plan=st["plans"].get(pk),
                metric=spec.metric,
                planner=spec.planner,
                granularity=spec.granularity,  # type: ignore[arg-type]  # a config's str: plan_pruning checks it and names the choices
                repair=spec.repair,
            )
            st["plans"][pk] = done.plan
            st.update(pruned_key=pk, pruned=done.model)
        work = copy.deepcopy(st["pruned"])
        removed = list(st["plans"][pk].remove)
    q = config.quantize
    scope = QuantScope(blocks=True, embeddings=q.embeddings, head=q.head)
    if cell.format == "none":
        rep = size_report(work, None, base_bits=q.base_bits, reference_params=ref)
    else:
        rep = quantize_model(
            work, get_quant_format(cell.format), scope=scope, base_bits=q.base_bits, reference_params=ref
        )
    res = perplexity(work, st["eval"])
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    finite = res.perplexity == res.perplexity and res.perplexity != float("inf")
    return {
        "cell": cell.key,
        "method": cell.method,
        "ratio": cell.ratio,
        "format": cell.format,
        "perplexity": res.perplexity if finite else None,
        "nll": res.nll if res.nll == res.nll else None,
        "eval_tokens": res.tokens,
        "params": rep.total_params,
        "reference_params": ref,
        "total_bits": rep.total_bits,
        "bits_per_param": rep.bits_per_param,
        "removed": removed,
        "size": rep.to_dict(),
        "seconds": time.perf_counter() - t0,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --- executors ----------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _serial(config_data: dict[str, Any], cells: list[Cell], **_: Any) -> Iterator[dict[str, Any]]:
    for cell in cells:
        yield run_cell(config_data, cell)


def _local(
    config_data: dict[str, Any], cells: list[Cell], *, workers: int | None = None, **_: Any
) -> Iterator[dict[str, Any]]:
    import multiprocessing as mp

    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(cells)))
    threads = max(1, cores // workers)
    # forkserver, not fork: a forked torch process can deadlock on thread pools its parent started. The
    # server imports torch, transformers and prunekit once; workers fork from it (which has run no torch
    # op) instead of paying those imports each, as spawn would.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "prunekit_core.study.sweep",
            "prunekit_core.scoring.api",
            "prunekit_core.io.loading",
            "torchao.prototype.mx_formats.mx_tensor",
        ]
    )
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = [pool.submit(run_cell, config_data, c) for c in cells]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _ray(
    config_data: dict[str, Any],
    cells: list[Cell],
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    **_: Any,
) -> Iterator[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise PrunekitError(
            "--executor ray needs Ray: pip install 'prunekit-core[ray]' (an optional extra)"
        ) from None
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=None if ray_address else (workers or os.cpu_count()))
        started = True
    try:
        remote = ray.remote(num_cpus=1)(run_cell)
        pending = [remote.remote(config_data, c) for c in cells]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()


_EXECUTORS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "serial": _serial,
    "local": _local,
    "ray": _ray,
}


def run_sweep(
    config: SweepConfig,
    results: str | Path,
    *,
    executor: Executor = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    on_row: Callable[[dict[str, Any], int, int], None] | None = None,
    cells: Iterable[Cell] | None = None,
) -> dict[str, Any]:
    """Run every cell not yet in ``results``; each row is committed as its cell finishes.

    ``on_row(row, done, total)`` is called after each insert (progress). Returns counts and wall time.
    """
    if executor not in _EXECUTORS:
        raise PrunekitError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    store = SweepStore(results)
    try:
        store.bind(config)
        grid = list(cells) if cells is not None else plan_cells(config)
        have = store.done()
        todo = [c for c in grid if c.key not in have]
        done = len(grid) - len(todo)
        t0 = time.perf_counter()
        written = 0
        if todo:
            data = config.model_dump()
            for row in _EXECUTORS[executor](data, todo, workers=workers, ray_address=ray_address):
                if store.add(row):
                    written += 1
                done += 1
                if on_row:
                    on_row(row, done, len(grid))
        return {
            "cells": len(grid),
            "skipped": len(grid) - len(todo),
            "written": written,
            "wall_s": time.perf_counter() - t0,
            "executor": executor,
            "results": str(results),
        }
    finally:
        store.close()
