"""Exact top-k by inner product over a (memory-mapped) matrix, in row blocks: the `flat` index.

The matrix is never copied: each block of rows is a view of the map, multiplied with all queries at once, and only the
running (Q, k) best survive a block. On unit vectors the inner product is the cosine similarity the model was trained
with. The products are torch's fp32 GEMM, the one `vsectl eval` ranks with, so scores (and hence ranks, ties
included) are bit for bit those of the evaluation; numpy's BLAS differs in the last bit for about 15 % of entries.
"""

from __future__ import annotations

import warnings

import numpy as np

BLOCK_BYTES = 64 << 20  # rows per block: 64 MiB of the matrix (32768 rows of 512 fp32)
SCORE_BYTES = 256 << 20  # the (Q, block) score buffer stays under this; larger query batches use smaller blocks


def block_rows(n: int, dim: int, n_queries: int) -> int:
    """Rows of the collection scored per block: a block and its (Q, rows) scores stay within their byte budgets."""
    rows = max(1, BLOCK_BYTES // (4 * dim))
    rows = min(rows, max(1, SCORE_BYTES // (4 * n_queries)))
    return min(rows, n)


def sort_hits(scores: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score, highest first; equal scores by row index, lowest first (deterministic)."""
    order = np.lexsort((index, -scores), axis=1)  # last key is primary
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(index, order, axis=1)


def topk(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `matrix` with the largest inner product with each query, exactly.

    Args:
        matrix: (N, E) float32, typically a read-only memmap of unit vectors.
        queries: (Q, E) or (E,) float32.
        k: 1 ≤ k ≤ N.

    Returns:
        scores (Q, k) float32 and indices (Q, k) int64, best first (ties: lower index first).
    """
    queries = np.array(np.atleast_2d(queries), dtype=np.float32)  # a writable copy (Q × E floats)
    n, dim = matrix.shape
    if queries.shape[1] != dim:
        raise ValueError(f"queries are {queries.shape[1]}-d but the matrix is {dim}-d")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    import torch

    q = queries.shape[0]
    rows = block_rows(n, dim, q)
    tq = torch.from_numpy(queries)
    best_s = torch.empty((q, 0), dtype=torch.float32)
    best_i = torch.empty((q, 0), dtype=torch.int64)
    for a in range(0, n, rows):
        with warnings.catch_warnings():  # a read-only map: torch warns that writes would fail; nothing writes
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(matrix[a : a + rows])  # (b, E) view of the map: pages are read, not copied
        scores = torch.mm(tq, block.T)  # (Q, b), the only buffer the size of a block
        s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # (Q, ≤k)
        best_s, best_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i + a], dim=1)
        if best_s.shape[1] > k:
            best_s, keep = torch.topk(best_s, k, dim=1)
            best_i = torch.gather(best_i, 1, keep)
    best_s, best_i = best_s.numpy(), best_i.numpy()
    return sort_hits(best_s, best_i)
