"""Retrieval ranks by counting: for every query, how many candidates score strictly higher than its (best) ground
truth, and how many tie with it, from fp32 similarities computed once, chunk by chunk, with no per-query loop.

Pure torch/numpy on precomputed embeddings; `metrics.py` turns these counts into recalls under each protocol.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Counts are sums of 0/1 floats done by a matrix-vector product; every partial sum is an integer, so they are exact
# while the count stays below 2**24 (the fp32 significand).
_EXACT_COUNT_LIMIT = 2**24
_FP32_UNIT_ROUNDOFF = 2.0**-24
# Half-width of the band around the row-wise GT score, in units of sqrt(terms) * u * sum_k |x_k y_k|. The gap between a
# row-wise dot product and the GEMM's value for the same pair is measured below 0.05 of this unit (E = 1024), and every
# caption is checked afterwards, so the band only has to be wide in practice, not provably.
GT_BAND_SCALE = 2.0
_ROWWISE_BLOCK = 4096  # captions per block when computing row-wise GT scores; bounds the gathered copy


def _prepare(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], cap2img: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Validate the inputs and return fp32 image and caption embeddings plus an int64 caption→image index.

    Raises:
        ValueError: on empty input, mismatched shapes or devices, an out-of-range index or an image without captions.
    """
    if len(pairs) == 0:
        raise ValueError("rank_retrieval needs at least one (img_emb, cap_emb) pair")
    imgs = [img.float() for img, _ in pairs]  # fp16/bf16/fp64 inputs are ranked in fp32 (spec §10.3)
    caps = [cap.float() for _, cap in pairs]
    n_img, n_cap = imgs[0].shape[0], caps[0].shape[0]
    device = imgs[0].device
    for m, (img, cap) in enumerate(zip(imgs, caps, strict=True)):
        if img.dim() != 2 or cap.dim() != 2 or img.shape[1] != cap.shape[1]:
            raise ValueError(
                f"model {m}: expected img (N, E) and cap (C, E), got {tuple(img.shape)} and {tuple(cap.shape)}"
            )
        if img.shape[0] != n_img or cap.shape[0] != n_cap:
            raise ValueError(
                f"model {m}: {img.shape[0]} images × {cap.shape[0]} captions, model 0 has {n_img} × {n_cap}"
            )
        if img.device != device or cap.device != device:
            raise ValueError(f"model {m}: all embeddings must be on {device}")
    if n_img == 0 or n_cap == 0:
        raise ValueError(f"nothing to rank: {n_img} images, {n_cap} captions")
    if n_cap >= _EXACT_COUNT_LIMIT:
        raise ValueError(f"{n_cap} captions exceed the exact-count limit of {_EXACT_COUNT_LIMIT}")
    if cap2img.shape != (n_cap,) or cap2img.dtype.is_floating_point or cap2img.dtype == torch.bool:
        raise ValueError(
            f"cap2img must be an integer tensor of shape ({n_cap},), got {cap2img.dtype} {tuple(cap2img.shape)}"
        )
    cap2img = cap2img.to(device=device, dtype=torch.int64)
    if int(cap2img.min()) < 0 or int(cap2img.max()) >= n_img:
        raise ValueError(f"cap2img values must lie in [0, {n_img}), got [{int(cap2img.min())}, {int(cap2img.max())}]")
    counts = torch.bincount(cap2img, minlength=n_img)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().squeeze(1)
        raise ValueError(f"{missing.numel()} image(s) have no caption, e.g. {missing[:5].tolist()}")
    return imgs, caps, cap2img


def similarity_chunk(imgs: list[torch.Tensor], caps: list[torch.Tensor], r0: int, r1: int, out: torch.Tensor) -> None:
    """Write the (ensemble) similarity rows r0:r1 into ``out`` (r1 - r0, C).

    Ensembles are summed, not averaged: ranks ignore the positive factor 1/M, and dividing would only add rounding.
    """
    torch.mm(imgs[0][r0:r1], caps[0].T, out=out)
    for img, cap in zip(imgs[1:], caps[1:], strict=True):
        out.addmm_(img[r0:r1], cap.T)


def _rowwise_gt_scores(
    imgs: list[torch.Tensor], caps: list[torch.Tensor], cap2img: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise GT score of every caption and the matching sum of |terms|, both (C,).

    These come from a different summation order than the GEMM, so they only place a band (see ``_T2ICounter``); the
    exact GT score is taken from the GEMM itself.
    """
    n_cap = cap2img.shape[0]
    score = torch.zeros(n_cap, device=cap2img.device)
    abs_sum = torch.zeros(n_cap, device=cap2img.device)
    for s in range(0, n_cap, _ROWWISE_BLOCK):
        e = min(s + _ROWWISE_BLOCK, n_cap)
        for img, cap in zip(imgs, caps, strict=True):
            prod = img[cap2img[s:e]] * cap[s:e]  # (block, E)
            score[s:e] += prod.sum(-1)
            abs_sum[s:e] += prod.abs_().sum(-1)
    return score, abs_sum


def _t2i_ranks_direct(
    imgs: list[torch.Tensor], caps: list[torch.Tensor], cap2img: torch.Tensor, cap_idx: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """t2i ranks and exact-tie counts of the captions ``cap_idx`` (K,) from whole similarity columns (exact fallback).

    Each column and its GT score come from the same product, so they are consistent by construction.
    """
    n_img, n_cap = imgs[0].shape[0], caps[0].shape[0]
    block = max(1, chunk_size * n_cap // n_img)  # keeps the (N, block) product within the chunk memory budget
    ranks = torch.empty(cap_idx.shape[0], dtype=torch.int64, device=cap_idx.device)
    ties = torch.empty_like(ranks)
    for s in range(0, cap_idx.shape[0], block):
        cols = cap_idx[s : s + block]
        sims = imgs[0] @ caps[0][cols].T  # (N, block)
        for img, cap in zip(imgs[1:], caps[1:], strict=True):
            sims.addmm_(img, cap[cols].T)
        arange = torch.arange(cols.shape[0], device=cols.device)
        gt = sims[cap2img[cols], arange]
        sims[cap2img[cols], arange] = -math.inf  # the GT image never counts against itself
        ranks[s : s + block] = (sims > gt).sum(0)
        ties[s : s + block] = (sims == gt).sum(0)
    return ranks, ties


class _T2ICounter:
    """Accumulates EVAL-3 t2i ranks over image chunks, although a caption's GT row may come after other rows.

    A row-wise dot product estimates each GT score and a narrow band is kept around it. In chunks before the GT row,
    entries above the band are counted at once and entries inside it are stored; once the GT row is reached, the
    GEMM's own GT value is the threshold and the stored entries are compared with it. Columns whose GEMM value falls
    outside the band, or whose stored entries would outgrow memory, are recounted from whole columns. Every comparison
    thus has the GEMM's values on both sides, so exact ties (a duplicate of the GT image) never count.
    """

    def __init__(self, imgs: list[torch.Tensor], caps: list[torch.Tensor], cap2img: torch.Tensor, chunk_size: int):
        n_cap, device = cap2img.shape[0], cap2img.device
        self.lo = self.hi = torch.zeros(n_cap, device=device)
        self.banded = chunk_size < imgs[0].shape[0]  # with one chunk every GT row comes first and no band is needed
        if self.banded:
            estimate, abs_sum = _rowwise_gt_scores(imgs, caps, cap2img)
            n_terms = sum(img.shape[1] for img in imgs)
            half_width = GT_BAND_SCALE * math.sqrt(n_terms) * _FP32_UNIT_ROUNDOFF * abs_sum
            self.lo, self.hi = estimate - half_width, estimate + half_width  # (C,)
        # Thresholds in use: the band edges until a caption's GT row is reached, then its GEMM GT value in both.
        self.thr_lo, self.thr_hi = self.lo.clone(), self.hi.clone()
        # With captions sorted by image, the captions still waiting for their GT row are a suffix of the columns.
        self.sorted = bool((cap2img[1:] >= cap2img[:-1]).all())
        self.n_pending = n_cap
        self.overflow = torch.zeros(n_cap, dtype=torch.bool, device=device)
        self.ranks = torch.zeros(n_cap, dtype=torch.int64, device=device)
        self.ties = torch.zeros(n_cap, dtype=torch.int64, device=device)  # other images scoring exactly the GT score
        self.known = torch.zeros(n_cap, device=device)  # 1.0 once the caption's GT row (its exact GT score) is reached
        self.band_cols: list[torch.Tensor] = []
        self.band_vals: list[torch.Tensor] = []
        self.band_stored, self.band_budget = 0, chunk_size * n_cap  # stored entries never outgrow one chunk
        self.ones = torch.ones(chunk_size, device=device)

    def add_chunk(
        self, sims: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, gt_vals: torch.Tensor
    ) -> None:
        """Count one chunk of similarities (b, C); ``mask`` (b, C) is scratch; (rows, cols) locate its GT entries."""
        ones = self.ones[: sims.shape[0]]
        self.thr_hi[cols] = gt_vals
        self.thr_lo[cols] = gt_vals
        self.known[cols] = 1.0
        self.n_pending -= cols.numel()
        torch.eq(sims, self.thr_hi, out=mask)
        mask[rows, cols] = 0.0
        self.ties += (torch.mv(mask.T, ones) * self.known).long()  # pending columns' ties sit in the band (finish)
        torch.gt(sims, self.thr_hi, out=mask)
        mask[rows, cols] = 0.0  # the GT image never counts against itself
        above = torch.mv(mask.T, ones)  # (C,)
        self.ranks += above.long()
        if self.n_pending == 0:
            return
        p0 = self.ranks.shape[0] - self.n_pending if self.sorted else 0  # first column that may still be pending
        torch.gt(sims[:, p0:], self.thr_lo[p0:], out=mask[:, p0:])
        above_lo = torch.mv(mask[:, p0:].T, ones)  # (C - p0,); equals ``above`` wherever the GT value is known
        ambiguous = ((above_lo != above[p0:]) & ~self.overflow[p0:]).nonzero().squeeze(1) + p0
        if ambiguous.numel() == 0:
            return
        sub = sims[:, ambiguous]  # (b, A)
        r, c = ((sub > self.lo[ambiguous]) & (sub <= self.hi[ambiguous])).nonzero(as_tuple=True)
        if self.band_stored + r.numel() > self.band_budget:
            self.overflow[ambiguous] = True
        else:
            self.band_cols.append(ambiguous[c])
            self.band_vals.append(sub[r, c])
            self.band_stored += r.numel()

    def finish(
        self, imgs: list[torch.Tensor], caps: list[torch.Tensor], cap2img: torch.Tensor, chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resolve the stored band entries and recount the columns the band could not settle.

        Returns:
            (C,) ranks and (C,) counts of other images scoring exactly the GT score.
        """
        gt_score = self.thr_hi  # every GT row has been reached, so this holds the GEMM's GT values
        if self.band_cols:
            cols, vals = torch.cat(self.band_cols), torch.cat(self.band_vals)
            self.ranks += torch.bincount(cols[vals > gt_score[cols]], minlength=self.ranks.shape[0])
            self.ties += torch.bincount(cols[vals == gt_score[cols]], minlength=self.ranks.shape[0])
        redo = self.overflow
        if self.banded:  # every GEMM GT value must lie strictly inside its band (an entry equal to it is then stored)
            redo = redo | (gt_score <= self.lo) | (gt_score > self.hi)
        redo = redo.nonzero().squeeze(1)
        if redo.numel():
            logger.debug("recounting %d of %d t2i columns from whole columns", redo.numel(), self.ranks.shape[0])
            self.ranks[redo], self.ties[redo] = _t2i_ranks_direct(imgs, caps, cap2img, redo, chunk_size)
        return self.ranks, self.ties


@dataclass(frozen=True)
class RankCounts:
    """Per query: candidates scoring strictly above the ground truth, and candidates tied with it exactly.

    Attributes:
        i2t, t2i: (N,) and (C,) int64 counts of strictly greater candidates (the optimistic 0-based rank).
        i2t_ties, t2i_ties: (N,) and (C,) counts of other queries' candidates scoring exactly the (best) GT score.
        i2t_own_ties: (N,) how many of the image's own captions score exactly its best GT score (at least 1).
        t2i_own_ties: (C,) the same for caption queries with several correct images (None: one each).
    """

    i2t: torch.Tensor
    t2i: torch.Tensor
    i2t_ties: torch.Tensor
    t2i_ties: torch.Tensor
    i2t_own_ties: torch.Tensor
    t2i_own_ties: torch.Tensor | None = None


def rank_retrieval(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], cap2img: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks under the strict-greater tie rule; see `rank_counts`.

    Returns:
        i2t_ranks (N,) int64 and t2i_ranks (C,) int64, on the input device.
    """
    counts = rank_counts(pairs, cap2img, chunk_size)
    return counts.i2t, counts.t2i


def rank_counts(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], cap2img: torch.Tensor, chunk_size: int = 1024
) -> RankCounts:
    """Rank every image query among all captions and every caption query among all images (EVAL-1, EVAL-3).

    The similarity is S = sum_m I_m C_mᵀ (an equal-weight ensemble; ranks equal those of the mean), computed once in
    fp32, ``chunk_size`` image rows at a time; the full (N, C) matrix is never held. Ranks are 0-based and count the
    candidates with a strictly greater similarity than the ground truth; an image's ground truth is the best of its
    captions. Counting is vectorised; for t2i the GT score is taken from the same GEMM as the entries it is compared
    with (see ``_T2ICounter``).

    Args:
        pairs: One (img_emb (N, E_m), cap_emb (C, E_m)) pair per model, on one device; any float dtype.
        cap2img: (C,) integer image index of each caption; every image needs at least one caption.
        chunk_size: Image rows per similarity chunk; peak extra memory is about 2 * chunk_size * C * 4 bytes.

    Exact ties with the ground truth are counted beside the ranks (from the same GEMM values), so any tie rule can be
    applied afterwards (`tie_ranked_metrics`).

    Returns:
        The counts, on the input device.

    Raises:
        ValueError: on inconsistent shapes, non-finite embeddings, a bad ``cap2img`` or an image without captions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    imgs, caps, cap2img = _prepare(pairs, cap2img)
    n_img, n_cap, device = imgs[0].shape[0], caps[0].shape[0], imgs[0].device
    chunk_size = min(chunk_size, n_img)

    order = torch.argsort(cap2img, stable=True)  # captions grouped by image, so a chunk's captions are one slice
    bounds = [0, *torch.bincount(cap2img, minlength=n_img).cumsum(0).tolist()]
    t2i = _T2ICounter(imgs, caps, cap2img, chunk_size)
    i2t = torch.empty(n_img, dtype=torch.int64, device=device)
    i2t_ties, i2t_own = torch.empty_like(i2t), torch.empty_like(i2t)
    sims_buf = torch.empty(chunk_size, n_cap, device=device)  # reused: a fresh 100 MB block per chunk costs page faults
    mask_buf = torch.empty(chunk_size, n_cap, device=device)  # 0/1 as fp32 so counting is a matrix-vector product
    ones_cap = torch.ones(n_cap, device=device)

    for r0 in range(0, n_img, chunk_size):
        r1 = min(r0 + chunk_size, n_img)
        sims, mask = sims_buf[: r1 - r0], mask_buf[: r1 - r0]
        similarity_chunk(imgs, caps, r0, r1, out=sims)  # (b, C)
        cols = order[bounds[r0] : bounds[r1]]  # captions whose image is in this chunk
        rows = cap2img[cols] - r0
        gt_vals = sims[rows, cols]
        if not bool(torch.isfinite(gt_vals).all()):  # a NaN/inf anywhere in a row or column reaches its GT entries
            raise ValueError("embeddings contain NaN or infinite values, or their similarities overflow fp32")
        best = torch.full((r1 - r0,), -math.inf, device=device).scatter_reduce_(0, rows, gt_vals, "amax")
        torch.gt(sims, best[:, None], out=mask)
        i2t[r0:r1] = torch.mv(mask, ones_cap).long()
        torch.eq(sims, best[:, None], out=mask)
        own = torch.zeros(r1 - r0, device=device).index_add_(0, rows, (gt_vals == best[rows]).float())  # (b,)
        i2t_own[r0:r1] = own.long()
        i2t_ties[r0:r1] = (torch.mv(mask, ones_cap) - own).long()
        t2i.add_chunk(sims, mask, rows, cols, gt_vals)
    t2i_ranks, t2i_ties = t2i.finish(imgs, caps, cap2img, chunk_size)
    return RankCounts(i2t, t2i_ranks, i2t_ties, t2i_ties, i2t_own)
