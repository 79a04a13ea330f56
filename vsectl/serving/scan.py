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
from typing import Any

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

    from vsectl.retrieval.exact import _best_k, _block_rows, sort_hits

    queries = np.array(np.atleast_2d(queries), dtype=np.float32)
    n, dim = matrix.shape
    if queries.shape[1] != dim or not 1 <= k <= n:
        raise ValueError(f"queries of shape {queries.shape} or k = {k} do not fit a {matrix.shape} matrix")
    q = queries.shape[0]
    rows = _block_rows(n, dim, 1)  # the single-query block size, so the selection sees the same blocks
    tq = [torch.from_numpy(queries[i : i + 1]) for i in range(q)]
    best_s = [np.empty((1, 0), dtype=np.float32) for _ in range(q)]
    best_i = [np.empty((1, 0), dtype=np.int64) for _ in range(q)]
    scores = np.empty((q, rows), dtype=np.float32)
    for a in range(0, n, rows):
        with warnings.catch_warnings():  # a read-only map: torch warns that writes would fail; nothing writes
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(matrix[a : a + rows])                         # (b, E) view of the map
        b = block.shape[0]
        for s, e in _slices(b, slice_rows):
            part = block[s:e].T                                                    # (E, slice) in cache
            for i in range(q):
                scores[i, s:e] = torch.mm(tq[i], part).numpy()[0]
        index = np.broadcast_to(np.arange(a, a + b, dtype=np.int64), (1, b))
        for i in range(q):
            s_i, r_i = _best_k(scores[i : i + 1, :b], index, k)
            best_s[i], best_i[i] = _best_k(np.concatenate([best_s[i], s_i], axis=1),
                                           np.concatenate([best_i[i], r_i], axis=1), k)
    out = [sort_hits(s, r) for s, r in zip(best_s, best_i, strict=True)]
    return np.concatenate([s for s, _ in out]), np.concatenate([r for _, r in out])


def make_hits(emb: Any, side: str, scores: np.ndarray, rows: np.ndarray) -> list[Any]:
    """`Hit`s of one query's (k,) scores and rows, with the records of the collection (as `vsectl.search` gives)."""
    from vsectl.retrieval import Hit

    hits = []
    for rank, (score, row) in enumerate(zip(scores.tolist(), rows.tolist(), strict=True), start=1):
        if side == "images":
            rec, image = emb.image(row), row
            caption = rec.get("caption")
        else:
            cap = emb.caption(row)
            image, caption = int(cap["image"]), cap["text"]
            rec = emb.image(image)
        hits.append(Hit(rank=rank, score=float(score), index=row, id=rec["id"], path=rec.get("path"),
                        caption=caption, image=image))
    return hits
