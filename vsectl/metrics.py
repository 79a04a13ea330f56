"""Recall metrics, tie rules and evaluation protocols (COCO 1K/5K, Flickr30K 1K, dev 1K) over retrieval ranks.

Pure torch/numpy on precomputed embeddings; no model code. Similarities are fp32 and computed once, chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from vsectl.ranking import RankCounts, rank_counts, rank_retrieval  # noqa: F401  (kept importable from here)
from vsectl.tie_rules import DEFAULT_TIE_RULE, TIE_RULES  # noqa: F401  (TIE_RULES: kept importable from here)

logger = logging.getLogger(__name__)

PROTOCOLS = ("f30k", "coco1k", "coco5k", "dev1k")
COCO_5K_IMAGES = 5000  # images in COCO Karpathy `testall`; coco1k and coco5k refuse any other count
COCO_FOLD_SIZE = 1000  # COCO 1K folds are contiguous blocks of this many images
DEV_IMAGES = 1000  # model selection ranks the first 1,000 dev images
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


def _first_own_before(t: np.ndarray, m: np.ndarray, r: np.ndarray) -> np.ndarray:
    """P(fewer than r of the t tied competitors come before the first of the m own items), all orders equally likely.

    P(at least r competitors first) = prod_{i<r} (t - i) / (t + m - i) for 0 <= r <= t, and 0 for r > t.
    """
    out = np.zeros(t.shape, dtype=np.float64)
    at_least = np.ones(t.shape, dtype=np.float64)  # P(X >= 0)
    top = int(r.max(initial=0))
    for i in range(top + 1):
        out = np.where(r == i, 1.0 - at_least, out)  # P(X < i) = 1 - P(X >= i)
        at_least = at_least * np.clip(t - i, 0, None) / np.maximum(t + m - i, 1)
    return np.where(r > top, 1.0, np.where(r <= 0, 0.0, out))


def tie_ranked_metrics(counts: RankCounts, rule: str = DEFAULT_TIE_RULE) -> dict[str, float]:
    """R@1/5/10, medr, meanr per direction and rsum from rank counts under a tie rule.

    - optimistic: a tied competitor never counts (rank = strictly greater candidates);
    - pessimistic: every tied competitor counts (rank = greater + tied);
    - expected (vsectl's default, `vsectl.tie_rules`): the expectation over a uniformly random order of the tied
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
    ones = torch.ones_like(counts.t2i)
    for name, greater, ties, own in (("i2t", counts.i2t, counts.i2t_ties, counts.i2t_own_ties),
                                     ("t2i", counts.t2i, counts.t2i_ties, ones)):
        g, t, m = (x.detach().cpu().numpy().astype(np.int64) for x in (greater, ties, own))
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = float(100.0 * np.mean(_first_own_before(t, m, k - g)))
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


def _evaluate_images(
    img_embs: Sequence[torch.Tensor],
    cap_embs: Sequence[torch.Tensor],
    cap2img: torch.Tensor,
    image_indices: torch.Tensor | None,
    chunk_size: int,
    tie_rule: str = DEFAULT_TIE_RULE,
) -> tuple[dict[str, float], int, int, dict[str, int]]:
    """Metrics over the given images (all if None) and their captions, the image and caption counts, the tie counts."""
    if image_indices is None:
        pairs = list(zip(img_embs, cap_embs, strict=True))
    else:
        cap_idx, cap2img = subset(cap2img, image_indices)
        pairs = [
            (img[image_indices.to(img.device)], cap[cap_idx.to(cap.device)])
            for img, cap in zip(img_embs, cap_embs, strict=True)
        ]
    counts = rank_counts(pairs, cap2img, chunk_size=chunk_size)
    return tie_ranked_metrics(counts, tie_rule), counts.i2t.numel(), counts.t2i.numel(), tie_counts(counts)


def evaluate_protocol(
    img_embs: Sequence[torch.Tensor],
    cap_embs: Sequence[torch.Tensor],
    cap2img: torch.Tensor,
    protocol: str,
    chunk_size: int = 1024,
    tie_rule: str = DEFAULT_TIE_RULE,
) -> dict:
    """Run one evaluation protocol of spec §10.1 on the embeddings of one split.

    ``f30k`` and ``coco5k`` rank the whole split at once (coco5k requires ``COCO_5K_IMAGES`` images). ``coco1k`` ranks
    contiguous folds of ``COCO_FOLD_SIZE`` images with their captions and reports the mean of every metric over the
    folds. ``dev1k`` ranks the first ``DEV_IMAGES`` images (all if fewer) with their captions. Several models form an
    equal-weight ensemble, per fold for coco1k.

    Args:
        img_embs: Per model m, (N, E_m) image embeddings.
        cap_embs: Per model m, (C, E_m) caption embeddings.
        cap2img: (C,) image index of each caption.
        protocol: One of ``PROTOCOLS``.
        chunk_size: Image rows per similarity chunk.
        tie_rule: how candidates tied exactly with the ground truth count (``TIE_RULES``).

    Returns:
        {"protocol", "n_images", "n_captions" (the counts ranked), "metrics": {METRIC_KEYS}, "tie_rule", "ties":
        queries with exact ties per direction (summed over folds)} and, for coco1k, "folds": one metrics dict per
        fold and "fold_ties".

    Raises:
        ValueError: for an unknown protocol, a COCO split without exactly ``COCO_5K_IMAGES`` images, or bad inputs.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    if len(img_embs) == 0 or len(img_embs) != len(cap_embs):
        raise ValueError(f"need one caption tensor per image tensor, got {len(img_embs)} and {len(cap_embs)}")
    n_img = img_embs[0].shape[0]
    device = cap2img.device
    if protocol in ("coco1k", "coco5k") and n_img != COCO_5K_IMAGES:
        raise ValueError(
            f"protocol {protocol!r} needs the {COCO_5K_IMAGES}-image COCO testall split, got {n_img} images "
            "(SCAN's 1K 'test' split is not comparable)"
        )
    result: dict = {"protocol": protocol, "tie_rule": tie_rule}
    if protocol == "coco1k":
        folds, fold_ties = [], []
        for f in range(COCO_5K_IMAGES // COCO_FOLD_SIZE):
            fold_images = torch.arange(f * COCO_FOLD_SIZE, (f + 1) * COCO_FOLD_SIZE, device=device)
            metrics, _, _, ties = _evaluate_images(img_embs, cap_embs, cap2img, fold_images, chunk_size, tie_rule)
            folds.append(metrics)
            fold_ties.append(ties)
        metrics = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
        total = {key: sum(t[key] for t in fold_ties) for key in fold_ties[0]}
        result.update(n_images=n_img, n_captions=cap2img.numel(), metrics=metrics, ties=total, folds=folds,
                      fold_ties=fold_ties)
    else:
        images = torch.arange(min(DEV_IMAGES, n_img), device=device) if protocol == "dev1k" else None
        metrics, n_ranked_img, n_ranked_cap, ties = _evaluate_images(img_embs, cap_embs, cap2img, images, chunk_size,
                                                                     tie_rule)
        result.update(n_images=n_ranked_img, n_captions=n_ranked_cap, metrics=metrics, ties=ties)
    return result
