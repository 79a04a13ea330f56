"""Ranked top lists of both directions from one chunked pass over the image × caption similarities.

Each similarity is computed once (one GEMM per chunk of image rows, as `vsectl.scoring.ranking` does): a chunk's rows
give the image queries their top L captions at once, and the caption queries' top L images are merged chunk by chunk.
Memory is one (chunk × captions) block plus the lists. Queries whose list may be cut inside a tie group are ranked again
in full (`full_lists`). Pure torch on precomputed embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from vsectl.scoring.ranking import similarity_chunk

DIRECTIONS = ("i2t", "t2i")  # image queries over captions, caption queries over images
LIST_MARGIN = 8  # places kept beyond the needed depth, so a tie group at the depth rarely reaches the list's end


@dataclass(frozen=True)
class TopLists:
    """The best-scoring candidates of every query of one direction, best first.

    Attributes:
        values: (Q, L) scores in descending order per row.
        indices: (Q, L) int64 candidate index of each score.
        n_candidates: how many candidates each query was ranked against (L ≤ n_candidates).
    """

    values: torch.Tensor
    indices: torch.Tensor
    n_candidates: int

    @property
    def complete(self) -> bool:
        """Whether every candidate is listed (no tie group can be cut)."""
        return self.values.shape[1] == self.n_candidates


def prepare_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Check (img (N, E_m), cap (C, E_m)) per model and return them in one float dtype: float64 when every input is
    float64, else float32 (the precision vsectl ranks in).

    Raises:
        ValueError: on no input, mismatched shapes or devices, an empty side, or NaN/inf values.
    """
    if not pairs:
        raise ValueError("need at least one (img_emb, cap_emb) pair")
    dtype = torch.float64 if all(x.dtype == torch.float64 for p in pairs for x in p) else torch.float32
    imgs, caps = [img.to(dtype) for img, _ in pairs], [cap.to(dtype) for _, cap in pairs]
    n_img, n_cap, device = imgs[0].shape[0], caps[0].shape[0], imgs[0].device
    for m, (img, cap) in enumerate(zip(imgs, caps, strict=True)):
        if img.dim() != 2 or cap.dim() != 2 or img.shape[1] != cap.shape[1]:
            raise ValueError(f"model {m}: expected img (N, E) and cap (C, E), got {tuple(img.shape)} and "
                             f"{tuple(cap.shape)}")
        if img.shape[0] != n_img or cap.shape[0] != n_cap or img.device != device or cap.device != device:
            raise ValueError(f"model {m}: {tuple(img.shape)} and {tuple(cap.shape)} on {img.device}; model 0 has "
                             f"{n_img} × {n_cap} on {device}")
        if not (torch.isfinite(img.sum()) and torch.isfinite(cap.sum())):  # a NaN or inf makes the sum one
            raise ValueError(f"model {m}: embeddings contain NaN or infinite values")
    if n_img == 0 or n_cap == 0:
        raise ValueError(f"nothing to rank: {n_img} images, {n_cap} captions")
    return imgs, caps


def list_length(depth: int, n_candidates: int) -> int:
    """Places to keep for a needed depth: the depth plus a margin, at most every candidate."""
    return min(n_candidates, depth + max(LIST_MARGIN, depth // 4))


def top_lists(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], depth_i2t: int, depth_t2i: int,
              chunk_size: int = 1024, on_chunk: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
              ) -> tuple[TopLists, TopLists]:
    """The top lists of both directions from one pass over the (ensemble) similarities S = Σ_m I_m C_mᵀ.

    Args:
        pairs: one (img (N, E_m), cap (C, E_m)) pair per model, on one device.
        depth_i2t: places each image query needs (its list keeps a margin more).
        depth_t2i: places each caption query needs.
        chunk_size: image rows per similarity block; peak extra memory ≈ chunk_size × C scores.
        on_chunk: called with (r0, the block's scores (b, C), its image rows' lists' values (b, L1)) for every block
            of image rows r0:r0+b, before the block is overwritten: a caller reads whole image rows there.

    Returns:
        (i2t lists (N, L1) over captions, t2i lists (C, L2) over images).

    Raises:
        ValueError: on bad inputs or similarities that overflow.
    """
    if chunk_size < 1 or depth_i2t < 1 or depth_t2i < 1:
        raise ValueError(f"chunk_size and depths must be ≥ 1, got {chunk_size}, {depth_i2t}, {depth_t2i}")
    imgs, caps = prepare_pairs(pairs)
    n_img, n_cap, device = imgs[0].shape[0], caps[0].shape[0], imgs[0].device
    l_i2t, l_t2i = list_length(depth_i2t, n_cap), list_length(depth_t2i, n_img)
    chunk_size = min(chunk_size, n_img)
    i2t_v = torch.empty(n_img, l_i2t, dtype=imgs[0].dtype, device=device)
    i2t_i = torch.empty(n_img, l_i2t, dtype=torch.int64, device=device)
    t2i_v = t2i_i = None  # (C, ≤ L2) best images so far
    buf = torch.empty(chunk_size, n_cap, dtype=imgs[0].dtype, device=device)  # reused: fresh blocks cost page faults
    for r0 in range(0, n_img, chunk_size):
        r1 = min(r0 + chunk_size, n_img)
        sims = buf[: r1 - r0]
        similarity_chunk(imgs, caps, r0, r1, out=sims)  # (b, C)
        if not bool(torch.isfinite(sims.sum())):  # a NaN or inf anywhere makes the sum one (15× cheaper than isfinite)
            raise ValueError("the similarities overflow: embeddings must be of moderate size (unit vectors)")
        torch.topk(sims, l_i2t, dim=1, out=(i2t_v[r0:r1], i2t_i[r0:r1]))
        if on_chunk is not None:
            on_chunk(r0, sims, i2t_v[r0:r1])
        merged = _merge_above(sims, r0, t2i_v, t2i_i) if t2i_v is not None and t2i_v.shape[1] == l_t2i else None
        if merged is None:
            merged = _merge_top(sims, r0, t2i_v, t2i_i, l_t2i)
        t2i_v, t2i_i = merged
    return TopLists(i2t_v, i2t_i, n_cap), TopLists(t2i_v, t2i_i, n_img)


def _merge_top(sims: torch.Tensor, r0: int, values: torch.Tensor | None, indices: torch.Tensor | None,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption's best images so far (C, ≤ length), merged with its best in image rows r0: of `sims` (b, C)."""
    cols = sims.T.contiguous()  # (C, b): a row-wise top-k over a contiguous block is the fast one
    v, i = torch.topk(cols, min(length, cols.shape[1]), dim=1)
    i += r0
    if values is None:
        return v, i
    v, order = torch.topk(torch.cat([values, v], dim=1), min(length, values.shape[1] + v.shape[1]), dim=1)
    return v, torch.cat([indices, i], dim=1).gather(1, order)


def _merge_above(sims: torch.Tensor, r0: int, values: torch.Tensor, indices: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_merge_top` for full lists, reading only the scores above each caption's current last one.

    After the first chunks few scores beat a caption's last listed one, so they are gathered sparsely, padded per
    caption and merged: 3-4× cheaper than a top-k over every score. None when too many pass (the dense merge is then
    the cheaper one).
    """
    n_cap, length = values.shape
    cols, rows = (sims > values[:, -1]).T.nonzero(as_tuple=True)  # scores that enter a list, caption by caption
    if rows.numel() == 0:
        return values, indices
    if rows.numel() > n_cap * length:
        return None
    counts = torch.bincount(cols, minlength=n_cap)  # (C,)
    place = torch.arange(cols.numel(), device=cols.device) - (counts.cumsum(0) - counts)[cols]
    new_v = torch.full((n_cap, int(counts.max())), -math.inf, dtype=values.dtype, device=values.device)
    new_i = torch.zeros(new_v.shape, dtype=torch.int64, device=values.device)
    new_v[cols, place] = sims[rows, cols]  # scores are finite (checked), so -inf padding never enters a list
    new_i[cols, place] = rows + r0
    v, order = torch.topk(torch.cat([values, new_v], dim=1), length, dim=1)
    return v, torch.cat([indices, new_i], dim=1).gather(1, order)


def full_scores(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str, queries: torch.Tensor,
                block: int = 1024 * 25_000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The given queries' scores against every candidate, a block of queries at a time.

    Args:
        pairs: as for `top_lists`.
        direction: "i2t" (image queries) or "t2i" (caption queries).
        queries: (K,) query indices.
        block: scores held at once (queries per block = block // candidates, at least one).

    Yields:
        (positions into `queries` (CPU), their (b, candidates) scores on the embeddings' device).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    imgs, caps = prepare_pairs(pairs)
    query_side, candidates = (imgs, caps) if direction == "i2t" else (caps, imgs)
    step = max(1, block // candidates[0].shape[0])
    for s in range(0, queries.numel(), step):
        pos = torch.arange(s, min(s + step, queries.numel()))
        q = queries[pos].to(query_side[0].device)
        scores = query_side[0][q] @ candidates[0].T  # (b, n_cand)
        for side, cand in zip(query_side[1:], candidates[1:], strict=True):
            scores.addmm_(side[q], cand.T)
        yield pos, scores


def full_lists(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str, queries: torch.Tensor,
               block: int = 1024 * 25_000) -> Iterator[tuple[torch.Tensor, TopLists]]:
    """Rank the given queries against every candidate, a block of queries at a time (arguments as `full_scores`).

    Yields:
        (positions into `queries`, their complete lists).
    """
    for pos, scores in full_scores(pairs, direction, queries, block):
        values, indices = torch.sort(scores, dim=1, descending=True)
        yield pos, TopLists(values, indices, scores.shape[1])
