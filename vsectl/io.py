"""Atomic file writes (a temporary file in the same folder, fsync, then rename over the target) and file hashes.

Every file vsectl writes whole goes through here, so a kill never leaves half a file under the final name and the
result gets the mode a plain `open()` would give it (0o666 less the umask: 0644 under umask 022), not the 0600 of a
temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def umask_mode() -> int:
    """0o666 less the process umask: the mode a new file gets from a plain `open()`."""
    try:  # Linux reports it without changing it, which is safe while other threads create files
        with open("/proc/self/status") as fh:
            mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # elsewhere reading the umask means setting it; it is put back at once
        os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file `tmp` the umask's mode, flush it to disk and rename it over `path`."""
    os.chmod(tmp, umask_mode())
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish(tmp_path, path)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a failed write() names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write `data` atomically; return its sha256."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, ensure_ascii: bool = True,
                      newline: bool | None = None) -> str:
    """Write `obj` as JSON atomically; return the sha256 of the bytes written.

    `newline` ends the file with one (default: after indented JSON only); `ensure_ascii=False` writes UTF-8 as is.
    """
    text = json_text(obj, indent=indent, ensure_ascii=ensure_ascii)  # never NaN or Infinity
    end = "\n" if (indent is not None if newline is None else newline) else ""
    return atomic_write_bytes(Path(path), (text + end).encode("utf-8"))


HASH_BLOCK = 1 << 20  # bytes per read while hashing a file


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    """Hex sha256 of a file's bytes (of its first `limit` bytes when given), read in blocks."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(HASH_BLOCK if left is None else min(HASH_BLOCK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def finite(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN or Infinity, which are not JSON (browsers and `jq` reject them): a
    non-finite number becomes null."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
