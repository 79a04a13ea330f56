"""Recall metrics and tie rules over retrieval ranks, and the running of an evaluation protocol (`protocols.py`).

Pure torch/numpy on precomputed embeddings; no model code. Similarities are fp32 and computed once, chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from vsectl.scoring.multi_positive import first_own_before
from vsectl.scoring.positives import GroundTruth, rank_ground_truth
from vsectl.scoring.ranking import RankCounts, rank_counts
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, TIE_RULES

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)  # fmt: skip

def recall_metrics(i2t_ranks: torch.Tensor | np.ndarray, t2i_ranks: torch.Tensor | np.ndarray) -> dict[str, float]:
    """R@1/5/10, medr, meanr per direction and rsum from 0-based ranks (EVAL-2).

    R@K = 100 · mean(rank < K); medr = floor(median(rank)) + 1 (numpy median: even counts average the middle pair);
    meanr = mean(rank) + 1; rsum = the sum of the six R@K.

    Args:
        i2t_ranks: (N,) rank of each image query.
        t2i_ranks: (C,) rank of each caption query.

    Returns:
        Plain floats under ``METRIC_KEYS``.
    """
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"{name} ranks must be a non-empty 1-D array, got shape {r.shape}")
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = float(100.0 * np.mean(r < k))
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(np.mean(r) + 1)
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    return {key: out[key] for key in METRIC_KEYS}


def tie_ranked_metrics(counts: RankCounts, rule: str = DEFAULT_TIE_RULE) -> dict[str, float]:
    """R@1/5/10, medr, meanr per direction and rsum from rank counts under a tie rule.

    - optimistic: a tied competitor never counts (rank = strictly greater candidates);
    - pessimistic: every tied competitor counts (rank = greater + tied);
    - expected (vsectl's default, `vsectl.scoring.tie_rules`): the expectation over a uniformly random order of the tied
      items: R@K is the probability that the (first) ground truth lands within the top K, meanr the expected rank + 1,
      medr from the expected ranks. Without ties all three are the same.

    Args:
        counts: from `rank_counts`.
        rule: one of ``TIE_RULES``.
    """
    if rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {rule!r}; use one of {', '.join(TIE_RULES)}")
    if rule == "optimistic":
        return recall_metrics(counts.i2t, counts.t2i)
    if rule == "pessimistic":
        return recall_metrics(counts.i2t + counts.i2t_ties, counts.t2i + counts.t2i_ties)
    out: dict[str, float] = {}
    t2i_own = counts.t2i_own_ties if counts.t2i_own_ties is not None else torch.ones_like(counts.t2i)
    for name, greater, ties, own in (("i2t", counts.i2t, counts.i2t_ties, counts.i2t_own_ties),
                                     ("t2i", counts.t2i, counts.t2i_ties, t2i_own)):
        g, t, m = (x.detach().cpu().numpy().astype(np.int64) for x in (greater, ties, own))
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = float(100.0 * np.mean(first_own_before(t, m, k - g)))
        rank = g + t / (m + 1.0)  # expected competitors before the first of m own items among t + m tied ones
        out[f"{name}_medr"] = float(np.floor(np.median(rank)) + 1)
        out[f"{name}_meanr"] = float(np.mean(rank) + 1)
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    return {key: out[key] for key in METRIC_KEYS}


def tie_counts(counts: RankCounts) -> dict[str, int]:
    """How many queries of each direction had at least one candidate scoring exactly their ground truth."""
    return {"i2t_queries_with_ties": int((counts.i2t_ties > 0).sum()),
            "t2i_queries_with_ties": int((counts.t2i_ties > 0).sum())}


def subset(cap2img: torch.Tensor, image_indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the captions of some images and re-index them to the selection.

    Args:
        cap2img: (C,) image index of each caption.
        image_indices: (K,) distinct images to keep; position k becomes local image k.

    Returns:
        caption_indices (C_sub,) ascending, and local_cap2img (C_sub,) in [0, K).
    """
    cap2img = cap2img.long()
    idx = torch.as_tensor(image_indices, dtype=torch.int64, device=cap2img.device).reshape(-1)
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("image_indices must be non-negative")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("image_indices must be distinct")
    size = max(int(cap2img.max()) + 1 if cap2img.numel() else 0, int(idx.max()) + 1 if idx.numel() else 0)
    lookup = torch.full((size,), -1, dtype=torch.int64, device=cap2img.device)
    lookup[idx] = torch.arange(idx.numel(), device=cap2img.device)
    local = lookup[cap2img]
    caption_indices = (local >= 0).nonzero().squeeze(1)
    return caption_indices, local[caption_indices]


def evaluate_images(
    img_embs: Sequence[torch.Tensor],
    cap_embs: Sequence[torch.Tensor],
    gt: GroundTruth,
    image_indices: torch.Tensor | None,
    chunk_size: int,
    tie_rule: str = DEFAULT_TIE_RULE,
) -> dict:
    """Metrics over the given images (all if None) and their captions: {"n_images", "n_captions", "metrics", "ties"}.

    One correct image per caption (`gt.cap2img`) takes the exact single-positive ranking of `rank_counts`. Several
    correct candidates per query (`positives.rank_ground_truth`) rank the best correct one for R@K, medr and meanr,
    and add R-Precision and mAP@R per direction (`<dir>_r_precision`, `<dir>_map_at_r`), all under `tie_rule`; such
    ground truth is ranked over the whole split.
    """
    if gt.cap2img is None:
        if image_indices is not None:
            raise ValueError("ground truth with several correct candidates per query is ranked over the whole split")
        counts, precision = rank_ground_truth(list(zip(img_embs, cap_embs, strict=True)), gt, chunk_size, tie_rule)
        return {"n_images": gt.n_images, "n_captions": gt.n_captions,
                "metrics": {**tie_ranked_metrics(counts, tie_rule), **precision}, "ties": tie_counts(counts)}
    cap2img = gt.cap2img.to(img_embs[0].device)
    if image_indices is None:
        pairs = list(zip(img_embs, cap_embs, strict=True))
    else:
        cap_idx, cap2img = subset(cap2img, image_indices)
        pairs = [
            (img[image_indices.to(img.device)], cap[cap_idx.to(cap.device)])
            for img, cap in zip(img_embs, cap_embs, strict=True)
        ]
    counts = rank_counts(pairs, cap2img, chunk_size=chunk_size)
    return {"n_images": counts.i2t.numel(), "n_captions": counts.t2i.numel(),
            "metrics": tie_ranked_metrics(counts, tie_rule), "ties": tie_counts(counts)}


def metrics_by_rule(img: torch.Tensor, cap: torch.Tensor, cap2img: torch.Tensor) -> tuple[dict[str, dict], dict]:
    """Rank one split once and read it under every tie rule: (rule → metrics, queries with exact ties)."""
    counts = rank_counts([(img, cap)], cap2img)
    return {rule: tie_ranked_metrics(counts, rule) for rule in TIE_RULES}, tie_counts(counts)
