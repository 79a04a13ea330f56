"""One pass over the embeddings for several queries at once, bit for bit the hits of one query at a time.

A single query's exact top-k (`vsectl.retrieval.topk`) is a matrix-vector product per block of rows, bound by memory
bandwidth. Several queries as one matrix product would change the floating-point sums (and so, at near ties, the
order) and, for a handful of queries, is slower than one product each on this kind of CPU. Here each block is cut
into cache-sized slices and every query's matrix-vector product runs on a slice while it is in cache: the matrix is
read from memory once for all queries, each score is computed by the same kernel on the same rows as a single
query's, and the block-wise selection is the single-query code's own.
"""

from __future__ import annotations

import warnings

import numpy as np

SLICE_ROWS = 1024  # rows per cache-resident slice: 2 MiB at 512-d fp32 (measured fastest of 1024-8192 here)


def _slices(b: int, size: int) -> list[tuple[int, int]]:
    """[start, end) slices of a block of b rows, none shorter than `size` unless the block itself is: a short tail is
    merged into the slice before it, since BLAS may switch to another kernel (other rounding) for very short rows."""
    bounds = list(range(0, b, size)) + [b]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < size:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shared_topk(matrix: np.ndarray, queries: np.ndarray, k: int, slice_rows: int = SLICE_ROWS
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over `matrix`, equal (scores and order) to `topk` run on each query alone.

    Args:
        matrix: (N, E) float32, typically a read-only memmap of unit vectors.
        queries: (Q, E) float32.
        k: 1 ≤ k ≤ N.
        slice_rows: rows per slice (the last slice of a block takes up to twice as many).

    Returns:
        scores (Q, k) float32 and rows (Q, k) int64, best first (ties: lower row first).
    """
    import torch

    from vsectl.retrieval.exact import block_rows, sort_hits

    queries = np.array(np.atleast_2d(queries), dtype=np.float32)
    n, dim = matrix.shape
    if queries.shape[1] != dim or not 1 <= k <= n:
        raise ValueError(f"queries of shape {queries.shape} or k = {k} do not fit a {matrix.shape} matrix")
    q = queries.shape[0]
    rows = block_rows(n, dim, 1)  # the single-query block size, so the selection sees the same blocks
    tq = [torch.from_numpy(queries[i : i + 1]) for i in range(q)]
    best = [(torch.empty((1, 0)), torch.empty((1, 0), dtype=torch.int64)) for _ in range(q)]
    scores = torch.empty((q, rows))
    for a in range(0, n, rows):
        with warnings.catch_warnings():  # a read-only map: torch warns that writes would fail; nothing writes
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(matrix[a : a + rows])                         # (b, E) view of the map
        b = block.shape[0]
        for s, e in _slices(b, slice_rows):
            part = block[s:e].T                                                    # (E, slice) in cache
            for i in range(q):
                torch.mm(tq[i], part, out=scores[i : i + 1, s:e])
        for i in range(q):  # the selection of `topk`, step for step, so ties resolve the same way
            top_s, top_i = torch.topk(scores[i : i + 1, :b], min(k, b), dim=1)
            best_s, best_i = torch.cat([best[i][0], top_s], dim=1), torch.cat([best[i][1], top_i + a], dim=1)
            if best_s.shape[1] > k:
                best_s, keep = torch.topk(best_s, k, dim=1)
                best_i = torch.gather(best_i, 1, keep)
            best[i] = (best_s, best_i)
    out = [sort_hits(s.numpy(), r.numpy()) for s, r in best]
    return np.concatenate([s for s, _ in out]), np.concatenate([r for _, r in out])
