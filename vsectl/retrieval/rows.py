"""Rows of a 2-d float32 .npy file by positioned reads on one descriptor: never through a memory map, so nothing read
stays in the process's resident set (a sample of rows touched through the map of a 20 GB file brought in 1.5 GB of
read-ahead pages, docs/scaling.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vsectl.errors import DataError

BLOCK_ROWS = 65536  # rows per read when streaming a whole range (128 MiB at 512-d fp32)


class RowReader:
    """Rows of a 2-d float32 .npy file: a run [a, b) (`read`) or scattered rows (`gather`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            view = np.load(self.path, mmap_mode="r")  # reads the header only; the map is dropped at once
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{self.path} is not a readable .npy file ({e}); embed again") from None
        if view.ndim != 2 or view.dtype != np.float32 or not view.flags.c_contiguous:
            raise DataError(f"{self.path} is not a C-ordered 2-d float32 array")
        self.n, self.dim, self.offset = int(view.shape[0]), int(view.shape[1]), int(view.offset)
        del view
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))  # one descriptor for every read

    def _into(self, out: np.ndarray, first: int) -> None:
        """Fill `out` (rows first, first + len(out)) from the file, in as many reads as the kernel needs."""
        view, at = memoryview(out).cast("B"), self.offset + first * self.dim * 4
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], at + done)
            if got <= 0:
                raise DataError(f"{self.path} is shorter than its header says; embed again")
            done += got

    def read(self, a: int, b: int) -> np.ndarray:
        """(b - a, dim) float32, a fresh array."""
        out = np.empty((b - a, self.dim), dtype=np.float32)
        self._into(out, a)
        return out

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Scattered rows, one positioned read each: (len(rows), dim) (e.g. a query's candidates)."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        view, size = memoryview(out).cast("B"), self.dim * 4
        for j, r in enumerate(np.asarray(rows).tolist()):
            if os.preadv(self.fd, [view[j * size : (j + 1) * size]], self.offset + r * size) != size:
                raise DataError(f"{self.path} is shorter than its header says; embed again")
        return out

    def blocks(self, a: int, b: int, size: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Rows [a, b) in blocks of `size`: (first row, block)."""
        for s in range(a, b, size):
            yield s, self.read(s, min(s + size, b))

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()
