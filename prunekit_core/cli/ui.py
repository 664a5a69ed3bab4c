"""Where a command writes, how it formats numbers, and the logging quiet that every command runs under.

Imports nothing heavy at module level: ``prunekit --help`` and ``prunekit plugins`` import no torch.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from ..study.pipeline import Reporter

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --- output ----------------------------------------------------------------------------------------


class UI:
    """Where a command writes: results on stdout (tables or one JSON object), progress on stderr."""

    def __init__(self, *, json_mode: bool) -> None:
        from rich.console import Console

        self.json_mode = json_mode
        # piped output (files, tests, grep) gets wide tables instead of rows wrapped at 80 columns
        piped = not sys.stdout.isatty()
        self.out = Console(file=sys.stdout, highlight=False, width=160 if piped else None)
        self.err = Console(file=sys.stderr, highlight=False)

    def say(self, message: str = "") -> None:
        """A result line for people (suppressed with ``--json``)."""
        if not self.json_mode:
            self.out.print(message, markup=False)

    def table(self, table: Any) -> None:
        if not self.json_mode:
            self.out.print(table)

    def info(self, message: str) -> None:
        """Progress and timings: always on stderr, so stdout stays clean for ``--json``."""
        self.err.print(message, markup=False, highlight=False)

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()

    @contextmanager
    def step(self, label: str) -> Iterator[dict[str, float]]:
        """Run one step under a spinner and report how long it took (``timing['s']``). When stderr is not
        a terminal (a logged run), a line every :data:`HEARTBEAT_S` seconds instead of the spinner."""
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        if self.err.is_terminal:
            with self.err.status(label + " ..."):
                yield timing
        else:
            with heartbeat(self, label):
                yield timing
        timing["s"] = time.perf_counter() - t0
        self.info(f"{label}: {timing['s']:.1f} s")


#: seconds between the progress lines of a long step whose stderr is not a terminal
HEARTBEAT_S = 5.0


class _LastMessage(logging.Handler):
    """Keeps the latest INFO message of prunekit's loggers (what a long step is doing now)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


@contextmanager
def heartbeat(ui: UI, label: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs, a line on stderr every ``every`` seconds: the step, the time so far and the
    latest progress message of prunekit's loggers (``plan: 35 s so far; width: uniform width 2/3 measured
    ...``), so a logged run never sits silent. A thread, because the step's own work (a torch forward)
    cannot be interrupted to print."""
    import threading

    last = _LastMessage()
    loggers = [logging.getLogger(name) for name in our_loggers()]
    for lg in loggers:
        lg.addHandler(last)
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every):
            now = f"; {last.message}" if last.message else ""
            ui.info(f"{label}: {time.perf_counter() - t0:.0f} s so far{now}")

    thread = threading.Thread(target=beat, name="prunekit-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for lg in loggers:
            lg.removeHandler(last)


class UIReporter(Reporter):
    """What :func:`prunekit_core.prune` reports, printed as the command prints it: results on stdout,
    progress and step timings on stderr, the plan as a table; progress bars only on a terminal, LoRA
    healing's progress always (a bar on a terminal, else a line every 10 s: training is never silent), and
    off a terminal every long step's line every :data:`HEARTBEAT_S` s (:func:`heartbeat`)."""

    training_progress = True

    def __init__(self, ui: UI) -> None:
        self.ui = ui
        self.bars = bars()

    def say(self, message: str) -> None:
        self.ui.say(message)

    def info(self, message: str) -> None:
        self.ui.info(message)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col, justify="right" if col in ("params", "score") else "left")
        for row in rows:
            table.add_row(*row)
        self.ui.table(table)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        with self.ui.step(label):
            yield


def finite(obj: Any) -> Any:
    """JSON has no inf/nan: they become null (the accompanying nll still says what happened)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def bars() -> bool:
    """Progress bars only on an interactive stderr (piped logs get the timing lines instead)."""
    return sys.stderr.isatty()


def fmt_params(n: int) -> str:
    return f"{n:,}"


# --- logging and third-party noise -------------------------------------------------------------------


if TYPE_CHECKING:  # generic in typeshed; at run time only from Python 3.11
    _StreamHandler = logging.StreamHandler[TextIO]
else:
    _StreamHandler = logging.StreamHandler


class _StderrHandler(_StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest swaps it between tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


#: third-party loggers that print at import or load time (torchao: "Failed to load .../_C_*.so"; torch's
#: _pytree: "... is an Enum subclass" when torchao registers its enums); shown only with -v
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "peft", "accelerate", "huggingface_hub")
#: read by transformers and huggingface_hub when they are first imported (the CLI imports them lazily)
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def our_loggers() -> tuple[str, ...]:
    """The loggers whose records the CLI shows (WARNING, INFO with -v): the core's and those of every
    installed plugin's package, as the registry names them (read from entry points: nothing imported)."""
    from ..registry.plugins import plugin_packages

    return ("prunekit_core", *(p for p in plugin_packages() if p != "prunekit_core"))


@contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """Silence third-party warnings, logs and progress bars unless ``-v``; route our logs to stderr.

    Imports nothing heavy: a library imported while a command runs (torch, transformers, torchao are
    imported only by the commands that need them) finds its loggers and environment already quiet; one
    imported before (a test calling :func:`~prunekit_core.cli.main` again) is quietened through its own API.
    """
    import os

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # INFO records are made always (a long step's heartbeat line shows the latest); stderr gets them with -v
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    saved_levels = []
    for name in our_loggers():
        lg = logging.getLogger(name)
        saved_levels.append((lg, lg.level))
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    saved_env: dict[str, str | None] = {}
    if not verbose:
        for name in _NOISY_LOGGERS:
            lg = logging.getLogger(name)
            saved_levels.append((lg, lg.level))
            lg.setLevel(logging.ERROR)
        for key, value in _QUIET_ENV.items():
            saved_env[key] = os.environ.get(key)
            os.environ[key] = value
    hf = sys.modules.get("transformers") is not None
    if hf:
        import transformers
        from transformers.utils import logging as hf_logging

        old_verbosity = transformers.logging.get_verbosity()
        bars_were_enabled = hf_logging.is_progress_bar_enabled()
        if verbose:
            transformers.logging.set_verbosity_warning()
        else:
            transformers.logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                from huggingface_hub.utils.tqdm import disable_progress_bars

                disable_progress_bars()
            except ImportError:  # pragma: no cover - hub is a transformers dependency
                pass
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in reversed(saved_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        if hf:
            transformers.logging.set_verbosity(old_verbosity)
            if bars_were_enabled:
                hf_logging.enable_progress_bar()
