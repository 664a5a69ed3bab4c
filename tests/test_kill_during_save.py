"""SIGKILL during a save leaves the old checkpoint (or the new one, once complete), never a mix, and never a
folder that loads although it is unfinished.

Saves run in real child processes (``os.fork`` of the test process, so no interpreter start-up per kill)
that are killed with SIGKILL: at random moments while they save in a loop, and at every file-system step
of one save (each rename, fsync, unlink, mkdir, ... in turn), with the atomic swap (``renameat2``) and
with the rename-aside fallback. After each kill the parent checks what a user would find.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import logits_of as logits
from helpers import tiny_pruned as pruned
from helpers import tiny_tokenizer

from prunekit_core.io import atomic
from prunekit_core.io.checkpoint import load_pruned, save_pruned
from prunekit_core.ir.errors import CheckpointError

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or sys.platform != "linux",
    reason="os.fork on Linux absent: these tests fork a child and kill it mid-save",
)

#: file-system calls a save makes; the step test kills the child at each of them in turn
STEPS = ("rename", "replace", "fsync", "unlink", "rmdir", "mkdir")


@pytest.fixture(scope="module")
def models() -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    ms = [pruned(0), pruned(1)]
    return ms, [logits(m) for m in ms]


def fork(child: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            # tqdm's write lock is a multiprocessing semaphore the child shares with the parent: a child
            # killed while it holds the lock (any progress bar transformers opens) would block the
            # parent's next progress bar forever. The child opens none.
            from huggingface_hub.utils import disable_progress_bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            disable_progress_bars()
            child()
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    return pid


def check_state(parent: Path, out: Path, want: list[torch.Tensor]) -> tuple[int, int]:
    """What a user finds after a kill: ``out`` loads as one of the complete saves, exactly; anything else
    in the folder is a recognised temporary that refuses to load. Returns (which save, temporaries)."""
    temps = [p for p in parent.iterdir() if p.name != out.name]
    for p in temps:
        assert atomic.is_temporary(p), f"unexpected leftover {p.name}"
        if p.is_dir():
            with pytest.raises(CheckpointError, match="unfinished save"):
                load_pruned(p)
    got = logits(load_pruned(out))  # recovers an aside folder first, if a kill left one
    matches = [i for i, w in enumerate(want) if torch.equal(got, w)]
    assert matches, "the checkpoint loads but holds neither the old nor the new weights"
    assert [p.name for p in parent.iterdir() if not atomic.is_temporary(p)] == [out.name]
    return matches[0], len(temps)


def test_random_sigkill_during_repeated_saves(tmp_path: Path, models) -> None:
    ms, want = models
    tok = tiny_tokenizer()
    out = tmp_path / "ckpt"
    save_pruned(ms[0], out, tokenizer=tok)
    rng = random.Random(8)  # derandomized: the same kill times on every run
    seen_models, seen_temps = set(), 0
    for _round in range(12):
        r, w = os.pipe()

        def saver(w: int = w) -> None:
            os.write(w, b"r")
            i = 1
            while True:
                save_pruned(ms[i % 2], out, tokenizer=tok, overwrite=True)
                os.write(w, b"s")  # one more complete save
                i += 1

        pid = fork(saver)
        os.close(w)
        assert os.read(r, 1) == b"r"
        for _ in range(rng.choice([0, 1, 2])):  # let 0, 1 or 2 saves complete, then kill during the next
            assert os.read(r, 1) == b"s"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child died on its own"
        which, temps = check_state(tmp_path, out, want)
        seen_models.add(which)
        seen_temps += temps
    # the kills really landed mid-save: some left temporaries, and both versions were seen complete
    assert seen_temps > 0 and seen_models == {0, 1}


def _targets() -> list[tuple[object, str]]:
    """The calls a kill can land before: os file-system calls, and the atomic swap of two folders."""
    return [(os, name) for name in STEPS] + [(atomic, "_exchange")]


def _count_steps(record: list[str]) -> Callable[[], None]:
    """Wrap the os calls of STEPS so each call appends its name to ``record`` (in the child only)."""

    def install() -> None:
        for owner, name in _targets():
            real = getattr(owner, name)

            def wrapped(*a, _real=real, _name=name, **k):  # noqa: ANN002, ANN003, ANN202
                record.append(_name)
                return _real(*a, **k)

            setattr(owner, name, wrapped)

    return install


def _kill_at(step: int) -> None:
    """Replace the os calls of STEPS by ones that SIGKILL this process at call number ``step``."""
    counter = [0]
    kill = os.kill
    for owner, name in _targets():
        real = getattr(owner, name)

        def wrapped(*a, _real=real, **k):  # noqa: ANN002, ANN003, ANN202
            if counter[0] == step:
                kill(os.getpid(), signal.SIGKILL)
            counter[0] += 1
            return _real(*a, **k)

        setattr(owner, name, wrapped)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_sigkill_at_every_step_of_an_overwrite(tmp_path: Path, models, exchange: bool) -> None:
    ms, want = models
    tok = tiny_tokenizer()
    out = tmp_path / "ckpt"
    save_pruned(ms[0], out, tokenizer=tok)

    def child_setup() -> None:
        if not exchange:
            atomic._exchange = lambda a, b: False  # type: ignore[assignment]  # the non-Linux fallback

    # count the steps of one overwrite (in a child, so the parent's os module stays untouched)
    r, w = os.pipe()

    def counting() -> None:
        child_setup()
        record: list[str] = []
        _count_steps(record)()
        save_pruned(ms[1], tmp_path / "scratch", tokenizer=tok)
        record.clear()
        save_pruned(ms[0], tmp_path / "scratch", tokenizer=tok, overwrite=True)
        os.write(w, " ".join(record).encode())

    pid = fork(counting)
    os.close(w)
    names = os.read(r, 65536).decode().split()
    steps = len(names)
    os.close(r)
    os.waitpid(pid, 0)
    shutil.rmtree(tmp_path / "scratch")
    assert {"fsync", "mkdir", "_exchange"} <= set(names), names
    outcomes = {0: 0, 1: 0}
    current = 0
    for step in range(steps + 1):

        def victim(step: int = step, current: int = current) -> None:
            child_setup()
            _kill_at(step)
            save_pruned(ms[1 - current], out, tokenizer=tok, overwrite=True)

        pid = fork(victim)
        _, status = os.waitpid(pid, 0)
        which, _ = check_state(tmp_path, out, want)
        outcomes[which] += 1
        current = which
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL
    # early kills keep the old checkpoint, late ones (after the swap) the new one: both happened
    assert outcomes[0] > 0 and outcomes[1] > 0
