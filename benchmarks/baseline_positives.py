"""The baseline of the several-positives benchmarks: vsectl's earlier generic several-positives ranking, kept verbatim.

Until it was unified with the top-list engine (`vsectl.scoring.top_lists` + `vsectl.scoring.multi_positive`), a
`GroundTruth` without `cap2img` was ranked here in two passes over the similarities (pass 1: each caption's best correct
score; pass 2: counts and every correct candidate's position), R-Precision and mAP@R then always placing correct
candidates before the wrong ones tied with them. `old_evaluate` is what `metrics.evaluate_images` returned for such
ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vsectl.scoring.metrics import tie_counts, tie_ranked_metrics
from vsectl.scoring.positives import GroundTruth
from vsectl.scoring.ranking import RankCounts, similarity_chunk


def _entries(gt: GroundTruth, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, candidate) index pairs of one direction ('i2t' or 't2i'), each (P,)."""
    ptr, idx = (gt.i2t_ptr, gt.i2t_idx) if direction == "i2t" else (gt.t2i_ptr, gt.t2i_idx)
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1]), idx


@dataclass(frozen=True)
class PositiveRanks:
    """The best correct candidate's counts per query (as `RankCounts`) and every correct candidate's position.

    ``i2t_positions`` / ``t2i_positions`` hold, in `_entries` order, how many candidates (correct ones
    included) score strictly above each correct candidate.
    """

    counts: RankCounts
    i2t_positions: torch.Tensor
    t2i_positions: torch.Tensor


def rank_positives(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], gt: GroundTruth,
                   chunk_size: int = 1024) -> PositiveRanks:
    """Rank every query with any number of correct candidates, from fp32 similarities in image chunks (two passes).

    A query's rank counts the wrong candidates scoring strictly above its best correct one; ties count the wrong
    candidates scoring exactly that, own ties the correct ones that do. Pass 1 finds each caption's best correct
    score (its correct images may lie in any chunk); pass 2 recomputes the same chunks and counts.
    """
    imgs, caps = [i.float() for i, _ in pairs], [c.float() for _, c in pairs]
    n_img, n_cap, device = imgs[0].shape[0], caps[0].shape[0], imgs[0].device
    if (n_img, n_cap) != (gt.n_images, gt.n_captions):
        raise ValueError(f"embeddings of {n_img} images × {n_cap} captions, ground truth of {gt.n_images} × "
                         f"{gt.n_captions}")
    chunk_size = max(1, min(chunk_size, n_img))
    iq, ic = (t.to(device) for t in _entries(gt, "i2t"))   # image query, correct caption
    tq, ti = (t.to(device) for t in _entries(gt, "t2i"))   # caption query, correct image
    by_image = torch.argsort(ti, stable=True)
    t_bounds = torch.searchsorted(ti[by_image], torch.arange(0, n_img + chunk_size, chunk_size, device=device))
    t_vals = torch.empty(tq.numel(), device=device)
    best_t2i = torch.full((n_cap,), -math.inf, device=device)
    sims = torch.empty(chunk_size, n_cap, device=device)
    for r0 in range(0, n_img, chunk_size):  # pass 1: each caption's best correct score
        r1 = min(r0 + chunk_size, n_img)
        similarity_chunk(imgs, caps, r0, r1, out=sims[: r1 - r0])
        e = by_image[t_bounds[r0 // chunk_size]: t_bounds[r0 // chunk_size + 1]]
        t_vals[e] = sims[ti[e] - r0, tq[e]]
        best_t2i.scatter_reduce_(0, tq[e], t_vals[e], "amax")
    if not bool(torch.isfinite(best_t2i).all()):
        raise ValueError("embeddings contain NaN or infinite values, or their similarities overflow fp32")
    out = {k: torch.zeros(n, dtype=torch.int64, device=device) for k, n in (
        ("i2t", n_img), ("i2t_ties", n_img), ("i2t_own", n_img), ("t2i", n_cap), ("t2i_ties", n_cap),
        ("t2i_own", n_cap), ("i2t_pos", iq.numel()), ("t2i_pos", tq.numel()))}
    i_bounds = torch.searchsorted(iq, torch.arange(0, n_img + chunk_size, chunk_size, device=device))
    for r0 in range(0, n_img, chunk_size):  # pass 2: count
        r1 = min(r0 + chunk_size, n_img)
        s = sims[: r1 - r0]
        similarity_chunk(imgs, caps, r0, r1, out=s)
        k = r0 // chunk_size
        _count_i2t(s, r0, iq, ic, slice(int(i_bounds[k]), int(i_bounds[k + 1])), out)
        _count_t2i(s, r0, tq, ti, by_image[t_bounds[k]: t_bounds[k + 1]], t_vals, best_t2i, out)
    out["t2i_ties"] -= out["t2i_own"]
    counts = RankCounts(out["i2t"], out["t2i"], out["i2t_ties"], out["t2i_ties"], out["i2t_own"], out["t2i_own"])
    return PositiveRanks(counts, out["i2t_pos"], out["t2i_pos"])


def _count_i2t(s: torch.Tensor, r0: int, iq: torch.Tensor, ic: torch.Tensor, sl: slice,
               out: dict[str, torch.Tensor]) -> None:
    """Image queries r0:r0+b of one chunk `s` (b, C): their correct entries are `iq[sl]`, `ic[sl]`."""
    q, c = iq[sl] - r0, ic[sl]
    vals = s[q, c]
    best = torch.full((s.shape[0],), -math.inf, device=s.device).scatter_reduce_(0, q, vals, "amax")
    if not bool(torch.isfinite(best).all()):
        raise ValueError("embeddings contain NaN or infinite values, or their similarities overflow fp32")
    rows = slice(r0, r0 + s.shape[0])
    own = torch.zeros(s.shape[0], dtype=torch.int64, device=s.device).index_add_(0, q, (vals == best[q]).long())
    out["i2t"][rows] = (s > best[:, None]).sum(1)  # a correct caption never scores above the best one
    out["i2t_own"][rows] = own
    out["i2t_ties"][rows] = (s == best[:, None]).sum(1) - own
    block = max(1, (1 << 22) // s.shape[1])
    for a in range(0, q.numel(), block):  # every correct caption's position in its image's list
        e = min(a + block, q.numel())
        out["i2t_pos"][sl.start + a: sl.start + e] = (s[q[a:e]] > vals[a:e, None]).sum(1)


def _count_t2i(s: torch.Tensor, r0: int, tq: torch.Tensor, ti: torch.Tensor, here: torch.Tensor,
               t_vals: torch.Tensor, best: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Add image rows r0:r0+b (chunk `s`) to every caption query's counts; `here`: the entries whose image is here."""
    vals = s[ti[here] - r0, tq[here]]
    out["t2i"] += (s > best).sum(0)
    out["t2i"].index_add_(0, tq[here], -(vals > best[tq[here]]).long())  # a correct image is not a wrong one above
    out["t2i_ties"] += (s == best).sum(0)
    out["t2i_own"].index_add_(0, tq[here], (vals == best[tq[here]]).long())
    block = max(1, (1 << 22) // s.shape[0])
    for a in range(0, tq.numel(), block):  # every correct image's position in its caption's list, chunk by chunk
        cols = tq[a: a + block]
        out["t2i_pos"][a: a + block] += (s[:, cols] > t_vals[a: a + block]).sum(0)


def positions_in_order(ptr: torch.Tensor, positions: torch.Tensor) -> list[np.ndarray]:
    """Per query, its correct candidates' 0-based list positions, ascending; tied correct candidates take the next
    free places (a candidate tied with a correct one is not counted above it)."""
    pos = positions.cpu().numpy()
    out = []
    for q in range(ptr.numel() - 1):
        p = np.sort(pos[int(ptr[q]): int(ptr[q + 1])])
        out.append(np.maximum.accumulate(p - np.arange(p.size)) + np.arange(p.size) if p.size else p)
    return out


def precision_metrics(ptr: torch.Tensor, positions: torch.Tensor) -> dict[str, float]:
    """R-Precision and mAP@R in percent over the queries of one direction (R = the query's number of correct ones).

    R-P = |correct in the top R| / R; mAP@R = (1/R) Σ_{i ≤ R} P@i · [item i is correct].
    """
    r_prec, map_r = [], []
    for p in positions_in_order(ptr, positions):
        r = p.size
        top = p < r
        r_prec.append(top.sum() / r)
        map_r.append(float(np.sum((np.arange(1, r + 1) / (p + 1))[top])) / r)
    return {"r_precision": 100.0 * float(np.mean(r_prec)), "map_at_r": 100.0 * float(np.mean(map_r))}


def old_evaluate(img_embs: Sequence[torch.Tensor], cap_embs: Sequence[torch.Tensor], gt: GroundTruth,
                 chunk_size: int, tie_rule: str) -> dict:
    """The result `metrics.evaluate_images(..., image_indices=None, ...)` gave for `gt` without `cap2img`."""
    ranked = rank_positives(list(zip(img_embs, cap_embs, strict=True)), gt, chunk_size=chunk_size)
    metrics = tie_ranked_metrics(ranked.counts, tie_rule)
    for name, ptr, positions in (("i2t", gt.i2t_ptr, ranked.i2t_positions),
                                 ("t2i", gt.t2i_ptr, ranked.t2i_positions)):
        metrics.update({f"{name}_{k}": v for k, v in precision_metrics(ptr, positions).items()})
    return {"n_images": gt.n_images, "n_captions": gt.n_captions, "metrics": metrics,
            "ties": tie_counts(ranked.counts)}
