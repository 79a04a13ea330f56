"""One writer per output folder: an exclusive lock beside each run, embeddings, index or export folder.

`folder_lock(folder, command)` takes an advisory lock on the file `.NAME.lock` next to `folder` (the folder itself
may not exist yet: `embed` and `export` create it by a rename at the end). The lock is the kernel's `flock`, so it
is released when the process exits in any way, a SIGKILL included: a lock file left by a crash is stale and simply
taken over. The file records the holder (pid, host, command, start time), so a second writer is refused with one
line that names it. Where the file system has no `flock` (some network mounts), the file is created exclusively
instead, and a file whose process is gone (checked by its pid, on the same host) is taken as stale.

Within one process a lock is re-entrant: `train` called by a sweep that already holds the run's lock goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vsectl.errors import VsectlError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock unsupported on this file system
WAIT_STEP = 0.05  # seconds between two tries while waiting for a holder
_held: dict[str, int] = {}  # lock file → depth, for re-entry within this process


class FolderBusy(VsectlError):
    """Another process is writing the folder."""


def lock_path(folder: Path) -> Path:
    """The lock file of `folder`: `.NAME.lock` in its parent folder."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def holds_lock(folder: str | Path) -> bool:
    """Whether this process holds `folder`'s lock (inside `folder_lock(folder)`)."""
    return os.path.abspath(lock_path(Path(folder))) in _held


def _holder_record(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _busy(folder: Path, holder: dict[str, Any]) -> FolderBusy:
    pid = holder.get("pid", "?")
    command = str(holder.get("command") or "vsectl")[:200]
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", since {holder['since']}" if holder.get("since") else ""
    return FolderBusy(f"{folder} is being written by another process (pid {pid}{where}: {command}{since}); wait for "
                      f"it to finish or stop it, then run this again")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder unlinks it before it unlocks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _stale_foreign(fd: int, path: Path) -> bool:
    """Whether a lock file we may only read is free; if so it is removed (the folder is ours to write) and closed."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held (or no flock here): the caller's flock on it reports the holder
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)
    return True


def _flock(path: Path, folder: Path, record: dict[str, Any]) -> int | None:
    """An open, flock-ed descriptor of the lock file; None where the file system has no flock."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except PermissionError:  # a lock file of another user's: test it read-only, replace it if it is stale
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if _stale_foreign(fd, path):
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, _read_holder(path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in NO_FLOCK:
                return None
            raise
        if _same_file(fd, path):  # else the holder removed this file as we opened it: take the new one
            _write_record(fd, record)
            return fd
        os.close(fd)


def _exclusive_file(path: Path, folder: Path, record: dict[str, Any]) -> int:
    """The lock without flock: the file is created exclusively; a file of a process that is gone is stale."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            holder = _read_holder(path)
            if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
                log.info("removing the stale lock %s of process %s, which is gone", path, holder.get("pid"))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise _busy(folder, holder) from None
        _write_record(fd, record)
        return fd
    raise _busy(folder, _read_holder(path))


def _take(path: Path, folder: Path, record: dict[str, Any], wait: float) -> int:
    """The lock file's descriptor, locked; a holder is waited for up to `wait` seconds, then named (FolderBusy)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = _flock(path, folder, record)
            return _exclusive_file(path, folder, record) if fd is None else fd
        except FolderBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(WAIT_STEP)


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str | None = None, wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive write lock of `folder` for the duration of the block.

    Args:
        folder: the run, embeddings, index, export or eval folder (it need not exist yet; its parent is created).
        command: what holds it, shown to a second writer (default: this process's command line).
        wait: seconds to wait for another holder to let go (for writers that hold it briefly); 0: refuse at once.

    Raises:
        FolderBusy: another process holds the lock (still, after `wait`); the message names it.
    """
    folder = Path(folder)
    path = lock_path(folder)
    key = os.path.abspath(path)
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    program = "vsectl" if program in ("__main__.py", "vsectl") else program  # `python -m vsectl` runs __main__.py
    record = _holder_record(command or " ".join([program, *sys.argv[1:]])[:500])
    fd = _take(path, folder, record, wait)
    _held[key] = 1
    try:
        yield folder
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the unlock: a waiting writer that opened this file sees it gone and reopens
        os.close(fd)
