"""Atomic writes: every file and folder prunekit writes appears whole or not at all.

Files (plans, reports, plots, JSON) are written to a hidden temporary sibling ``.NAME.tmp-PID-HEX`` in the
same folder, flushed and ``fsync``-ed, then moved over the target with :func:`os.replace` (atomic on POSIX
and Windows), and the parent folder is ``fsync``-ed so the rename itself survives a power cut.

Folders (checkpoints, the GGUF conversion cache) are built in a hidden sibling ``.NAME.partial-PID-HEX``;
every file in it is ``fsync``-ed, then it is moved into place. Replacing an existing folder swaps the two
in one atomic ``renameat2(RENAME_EXCHANGE)`` where the OS offers it (Linux); elsewhere the old folder is
first renamed aside to ``.NAME.old-PID-HEX``, the new one renamed in, and the old one deleted. At every
instant the target path holds the complete old folder, the complete new one, or (only in that fallback, for
the moment between the two renames) nothing, with the old folder intact beside it. :func:`recover`
puts such an aside folder back and deletes temporaries whose process is dead; every hidden temporary or
aside name is recognised by :func:`is_temporary` so loaders never take it for a result.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = [
    "atomic_file",
    "atomic_folder",
    "atomic_path",
    "fsync_tree",
    "is_temporary",
    "recover",
    "write_bytes",
    "write_text",
]

#: ``.NAME.KIND-PID-HEX``: the names of every temporary and aside path this module makes
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|partial|old)-(?P<pid>\d+)-(?P<hex>[0-9a-f]{8})$")


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary(path: str | Path) -> bool:
    """True for a hidden temporary or aside path left by an atomic write (never a finished result)."""
    return bool(_TEMP_RE.match(Path(path).name))


def temporary_owner(path: str | Path) -> tuple[str, str, int] | None:
    """``(target name, kind, pid)`` of a temporary/aside path, or ``None`` for an ordinary path."""
    m = _TEMP_RE.match(Path(path).name)
    return (m["name"], m["kind"], int(m["pid"])) if m else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing (when unsure: yes, so nothing live is deleted)."""
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def _fsync_fd_path(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    _fsync_fd_path(Path(path), os.O_RDONLY)


def fsync_tree(root: str | Path) -> None:
    """``fsync`` every file under ``root``, then every folder (deepest first), then ``root`` itself."""
    root = Path(root)
    folders = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            _fsync_fd_path(Path(dirpath) / f, os.O_RDONLY)
        folders.append(Path(dirpath))
    for d in reversed(folders):
        fsync_dir(d)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait

EARLY_WRITEBACK = True
"""Whether :func:`atomic_folder` starts the disk writes while the folder is filled (see ``_Writeback``);
``bench/perf.py`` turns it off to measure what it saves. Durability does not depend on it."""


def _load_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class _Writeback:
    """Starts the kernel's writeback of files while they are being written (Linux ``sync_file_range``).

    A durable save must ``fsync`` every file before the rename; started only then, the fsync waits for the
    whole folder to reach the disk. A background thread that asks for writeback of what each file holds so
    far, every few milliseconds while the folder is filled, lets the disk work while the writer serializes,
    and the final fsync (which still runs and still decides durability) has little left to wait for. Where
    ``sync_file_range`` is unavailable this does nothing.
    """

    def __init__(self, root: Path, interval: float = 0.01) -> None:
        self.root = root
        self.interval = interval
        self._fn: Callable[[int, int, int, int], int] | None = (
            _load_sync_file_range() if EARLY_WRITEBACK else None
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: dict[str, int] = {}

    def __enter__(self) -> _Writeback:
        if self._fn is not None:
            self._thread = threading.Thread(target=self._run, name="prunekit-writeback", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._pass()
            except OSError:  # files renamed or removed under us: the final fsync covers everything
                pass

    def _pass(self) -> None:
        fn = self._fn
        if fn is None:  # (the thread that calls this runs only with a function)
            return
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                path = os.path.join(dirpath, f)
                size = os.stat(path).st_size
                if size <= self._done.get(path, 0):
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
                finally:
                    os.close(fd)
                self._done[path] = size


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:  # removed meanwhile by its owner
        return 0.0


def recover(target: str | Path) -> None:
    """Tidy what killed writes of ``target`` left behind (call before reading or writing ``target``).

    An aside folder (``.NAME.old-*``, the previous complete version) is renamed back when ``target`` is
    missing, which restores the old state after a kill between the two renames of a replacement.
    Temporaries of processes that are no longer alive are deleted. Those of live processes are left alone
    (another save may be in progress).
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    mine = []
    for entry in entries:
        owner = temporary_owner(entry)
        if owner is not None and owner[0] == target.name:
            mine.append((entry, owner[1], owner[2]))
    for entry, kind, pid in sorted(mine, key=lambda e: _mtime(e[0])):
        if _alive(pid):
            continue
        if kind == "old" and not os.path.lexists(target):
            try:
                os.rename(entry, target)
                fsync_dir(parent)
                log.warning("restored %s from %s, left by a replacement that was killed", target, entry.name)
                continue
            except OSError as exc:
                log.warning("could not restore %s from %s: %s", target, entry, exc)
                continue
        log.info("removing %s, left by an interrupted write (process %d is gone)", entry, pid)
        _remove(entry)


# --- files ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path to write (by any library); on success it replaces ``path`` atomically.

    On an exception the temporary file is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        _fsync_fd_path(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Like ``open(path, mode)`` for writing, but ``path`` changes only when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)
    return Path(path)


# --- folders -------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2() -> Any:
    if not hasattr(os, "fork") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or file system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _replace_folder(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, replacing what is there without a mixed state."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        fsync_dir(target.parent)
        _remove(tmp)  # now holds the old folder
        return
    aside = _sibling(target, "old")
    os.rename(target, aside)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    _remove(aside)


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it becomes ``path`` in one atomic step.

    With ``replace=False`` an existing ``path`` at the end raises :class:`FileExistsError` (and the new
    folder is discarded); with ``replace=True`` it is replaced as described in the module docstring. On any
    exception (including ``KeyboardInterrupt``) the temporary folder is deleted and ``path`` is untouched.
    """
    path = Path(path).absolute()
    recover(path)
    tmp = _sibling(path, "partial")
    tmp.mkdir()
    try:
        with _Writeback(tmp):
            yield tmp
        fsync_tree(tmp)
        if not replace and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "target appeared while writing", str(path))
        _replace_folder(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise
