"""NaN/inf checks of embedding matrices: a sample of rows on every open, every row on request.

A memory-mapped matrix is read with positioned reads, never through its map (see `check_finite`).
"""

from __future__ import annotations

import numpy as np

from vsectl.errors import DataError
from vsectl.retrieval.rows import RowReader

SAMPLE_ROWS = 1024  # rows of each side checked for NaN/inf on every open (all of them with verify=True)
SCAN_ROWS = 1 << 16  # rows per block of the full check
AGAIN = "the folder is damaged: embed it again"


def check_finite(name: str, matrix: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Refuse NaN or inf in `rows` of `matrix` (all rows, block by block, when None).

    A memory-mapped matrix is read with plain reads, not through its map: touching a sample of rows spread over a
    20 GB file through the map brought in ~1.5 GB of read-ahead pages that then stayed in the process's resident
    set (measured at 10M × 512, docs/scaling.md).
    """
    blocks = [rows] if rows is not None else [np.arange(a, min(a + SCAN_ROWS, len(matrix)))
                                              for a in range(0, len(matrix), SCAN_ROWS)]
    path = getattr(matrix, "filename", None)
    reader = RowReader(path) if isinstance(matrix, np.memmap) and path else None  # one for every block
    try:
        for block in blocks:
            if len(block) == 0:
                continue
            values = _read_rows(matrix, reader, block, contiguous=rows is None)
            finite = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
            if not finite.all():
                raise DataError(f"row {int(block[np.argmin(finite)])} of {name} holds NaN or inf values; {AGAIN}")
    finally:
        if reader is not None:
            reader.close()


def _read_rows(matrix: np.ndarray, reader: RowReader | None, rows: np.ndarray, contiguous: bool) -> np.ndarray:
    """matrix[rows] (a run of rows when `contiguous`); by positioned reads from the file when a reader is given."""
    if reader is None:
        return matrix[rows] if not contiguous else matrix[rows[0] : rows[-1] + 1]
    return reader.read(int(rows[0]), int(rows[-1]) + 1) if contiguous else reader.gather(rows)


def spread_rows(n: int) -> np.ndarray:
    """SAMPLE_ROWS rows evenly spread over n (all of them when fewer)."""
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)
