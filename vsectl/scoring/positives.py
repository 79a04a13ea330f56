"""Ground truth with any number of correct candidates per query, and its ranking by vsectl's one engine for it.

A Karpathy split has one correct image per caption, and an image's correct captions are its own: `ranking.rank_counts`
ranks that case (the fast, exact path that published numbers are compared on). Protocols with extended annotations give
a `GroundTruth` with both relations (several correct candidates per query, not necessarily symmetric), or named
`PositiveSets` (ECCV Caption, CxC: `evaluate_sets`). Both are ranked from one pass over the similarities
(`vsectl.scoring.top_lists`): each query keeps its best candidates as deep as its largest R (or K) needs, its positives
are located in that list (`vsectl.scoring.multi_positive`), and the queries a list cannot settle are ranked against
every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vsectl.scoring.multi_positive import PositiveSets, PositiveStats, positive_stats, query_metrics, truncated_ties
from vsectl.scoring.ranking import RankCounts
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, TIE_RULES
from vsectl.scoring.top_lists import DIRECTIONS, TopLists, full_lists, full_scores, list_length, top_lists

LIST_DEPTH_LIMIT = 1024  # sets needing deeper lists than this (plausible match) are ranked in full instead
RECALL_DEPTH = 10  # places a GroundTruth's lists hold at least: R@10 and most best ranks are read from them
EXACT_FLOAT_COUNT = 2**24  # 0/1 values summed in fp32 are exact while the sum stays below this (the significand)


def _csr(n_queries: int, queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, candidate) pairs → (ptr (Q+1,), idx) with each query's candidates ascending, duplicates removed."""
    key = torch.unique(queries.long() * (int(candidates.max()) + 1 if candidates.numel() else 1) + candidates.long())
    width = int(candidates.max()) + 1 if candidates.numel() else 1
    q, c = key // width, key % width
    ptr = torch.zeros(n_queries + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(q, minlength=n_queries).cumsum(0)
    return ptr, c


@dataclass(frozen=True)
class GroundTruth:
    """Which candidates are correct for each query, per direction, as CSR lists (CPU int64).

    Image i's correct captions are ``i2t_idx[i2t_ptr[i]:i2t_ptr[i + 1]]``; caption c's correct images are
    ``t2i_idx[t2i_ptr[c]:t2i_ptr[c + 1]]``. ``cap2img`` is set when there is exactly one correct image per caption and
    an image's correct captions are those that name it: the single-positive case, ranked by `ranking.rank_counts`.
    """

    n_images: int
    n_captions: int
    i2t_ptr: torch.Tensor
    i2t_idx: torch.Tensor
    t2i_ptr: torch.Tensor
    t2i_idx: torch.Tensor
    cap2img: torch.Tensor | None = None

    @classmethod
    def from_cap2img(cls, cap2img: torch.Tensor | np.ndarray) -> GroundTruth:
        """One correct image per caption; each image's correct captions are its own."""
        cap2img = torch.as_tensor(cap2img).long().cpu()
        n_img = int(cap2img.max()) + 1 if cap2img.numel() else 0
        i2t_ptr = torch.zeros(n_img + 1, dtype=torch.int64)
        i2t_ptr[1:] = torch.bincount(cap2img, minlength=n_img).cumsum(0)
        i2t_idx = torch.argsort(cap2img, stable=True)  # each image's captions, ascending
        return cls(n_img, cap2img.numel(), i2t_ptr, i2t_idx, torch.arange(cap2img.numel() + 1), cap2img.clone(),
                   cap2img)

    @classmethod
    def from_pairs(cls, n_images: int, n_captions: int, i2t: Sequence[tuple[int, int]],
                   t2i: Sequence[tuple[int, int]]) -> GroundTruth:
        """From (image, caption) pairs correct for image queries and (caption, image) pairs for caption queries."""
        a = torch.as_tensor(list(i2t), dtype=torch.int64).reshape(-1, 2)
        b = torch.as_tensor(list(t2i), dtype=torch.int64).reshape(-1, 2)
        i2t_ptr, i2t_idx = _csr(n_images, a[:, 0], a[:, 1])
        t2i_ptr, t2i_idx = _csr(n_captions, b[:, 0], b[:, 1])
        gt = cls(n_images, n_captions, i2t_ptr, i2t_idx, t2i_ptr, t2i_idx)
        gt.check()
        return gt

    def check(self) -> None:
        """Every query has a correct candidate and every index is in range."""
        for name, ptr, idx, n in (("image", self.i2t_ptr, self.i2t_idx, self.n_captions),
                                  ("caption", self.t2i_ptr, self.t2i_idx, self.n_images)):
            empty = (ptr[1:] == ptr[:-1]).nonzero().squeeze(1)
            if empty.numel():
                raise ValueError(f"{empty.numel()} {name} queries have no correct candidate, e.g. {empty[:5].tolist()}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{name} queries name candidates outside [0, {n})")

    def positive_sets(self) -> tuple[PositiveSets, PositiveSets]:
        """Both relations as `PositiveSets` (image queries', caption queries'): every query is evaluated, and its R is
        its number of correct candidates."""
        out = [PositiveSets(torch.arange(ptr.numel() - 1), ptr.clone(), idx.clone(), ptr.diff())
               for ptr, idx in ((self.i2t_ptr, self.i2t_idx), (self.t2i_ptr, self.t2i_idx))]
        return out[0], out[1]


def located_stats(lists: TopLists | None, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str,
                  sets: PositiveSets, depth: int) -> PositiveStats:
    """Positive statistics of one set: from the top lists where they are deep enough, else from full rankings.

    The lists are cut to the set's own `depth` (plus the margin): a set that needs fewer places reads fewer. The rows
    read are brought to the CPU, where the sets are (they are small).
    """
    if lists is not None:
        width, rows = _width(lists, depth), sets.queries.to(lists.values.device)
        values, indices = lists.values[rows, :width].cpu(), lists.indices[rows, :width].cpu()
        redo = truncated_ties(values, depth, width == lists.n_candidates).nonzero().squeeze(1)
        if redo.numel() == 0:
            parts = [positive_stats(values, indices, sets, lists.n_candidates)]
        else:
            keep = torch.ones(sets.n_queries, dtype=torch.bool)
            keep[redo] = False
            kept = keep.nonzero().squeeze(1)
            parts = [_relabel(positive_stats(values[kept], indices[kept], sets.select(kept), lists.n_candidates),
                              kept)]
    else:
        redo, parts = torch.arange(sets.n_queries), []
    if redo.numel():
        for pos, full in full_lists(pairs, direction, sets.queries[redo]):
            sub = redo[pos]
            parts.append(_relabel(positive_stats(full.values.cpu(), full.indices.cpu(), sets.select(sub),
                                                 full.n_candidates), sub))
    return PositiveStats.cat(parts)


def _width(lists: TopLists, depth: int) -> int:
    """Places of `lists` that a set needing `depth` places reads."""
    return min(lists.values.shape[1], list_length(depth, lists.n_candidates))


def _relabel(stats: PositiveStats, positions: torch.Tensor) -> PositiveStats:
    """Stats of a subset of queries, owners mapped back to positions in the whole set."""
    return PositiveStats(positions[stats.owner], stats.greater, stats.equal, stats.tied_pos, stats.pos_above,
                         stats.index_in_tie)


def needed_depths(sets: dict[str, tuple[PositiveSets, PositiveSets]], wanted: dict[str, Sequence[str]]
                  ) -> dict[str, int]:
    """Places the top lists of each direction must hold: the largest R, or K, of the sets they serve."""
    ks = [int(m[2:]) for names in wanted.values() for m in names if m.startswith("r@")]
    depth = {}
    for d, direction in enumerate(DIRECTIONS):
        needs = [max(s[d].max_relevant(), *ks) for s in sets.values() if s[d].max_relevant() <= LIST_DEPTH_LIMIT]
        depth[direction] = max(needs, default=0)
    return depth


def evaluate_sets(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  sets: dict[str, tuple[PositiveSets, PositiveSets]], wanted: dict[str, Sequence[str]],
                  tie_rule: str, chunk_size: int = 1024, lists: dict[str, TopLists] | None = None) -> dict[str, Any]:
    """Score several annotation sets from one pass over the similarities.

    Args:
        pairs: one (img (N, E_m), cap (C, E_m)) pair per model (an ensemble sums their similarities).
        sets: annotation name → (i2t sets, t2i sets) on the split's indices.
        wanted: annotation name → measures of `query_metrics` to report ("r@1", "r_precision", ...).
        tie_rule: one of ``TIE_RULES``.
        lists: top lists at least `needed_depths` deep (computed here when None).

    Returns:
        {"metrics": {name: {"<dir>_<measure>": percent}}, "n_queries": {name: {dir: Q}}, "ties": {name: {dir:
        queries with a positive tied exactly with a candidate that is not one}}}; a measure "r@K" is named "rK".
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    depth = needed_depths(sets, wanted)
    if lists is None and any(depth.values()):
        lists = dict(zip(DIRECTIONS, top_lists(pairs, max(1, depth["i2t"]), max(1, depth["t2i"]), chunk_size),
                         strict=True))
    out: dict[str, Any] = {"metrics": {}, "n_queries": {}, "ties": {}}
    for name, both in sets.items():
        out["metrics"][name], out["n_queries"][name], out["ties"][name] = {}, {}, {}
        for d, direction in enumerate(DIRECTIONS):
            s = both[d]
            deep = s.max_relevant() > LIST_DEPTH_LIMIT
            ks = sorted({int(m[2:]) for m in wanted[name] if m.startswith("r@")})
            stats = located_stats(None if deep else lists[direction], pairs, direction, s,
                                  max(s.max_relevant(), *ks, 1))
            per_query = query_metrics(stats, s, ks, tie_rule)
            out["metrics"][name].update({f"{direction}_{m.replace('@', '')}": float(100.0 * per_query[m].mean())
                                         for m in wanted[name]})
            out["n_queries"][name][direction] = s.n_queries
            tied = stats.owner[stats.equal > stats.tied_pos]
            out["ties"][name][direction] = int(torch.unique(tied).numel())
    return out


def rank_ground_truth(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], gt: GroundTruth, chunk_size: int = 1024,
                      tie_rule: str = DEFAULT_TIE_RULE) -> tuple[RankCounts, dict[str, float]]:
    """Rank every query of a `GroundTruth`, in both directions, from one pass over the fp32 similarities.

    R@K, medr and meanr follow each query's best correct candidate: its `RankCounts` (wrong candidates scoring strictly
    above it, wrong ones tied with it, correct ones tied with it) are what `metrics.tie_ranked_metrics` reads. Every
    correct candidate counts for R-Precision and mAP@R (R = the query's number of correct candidates), under `tie_rule`.

    Args:
        pairs: one (img (N, E_m), cap (C, E_m)) pair per model (an ensemble sums their similarities).
        gt: the correct candidates of every query.
        chunk_size: image rows per similarity block.
        tie_rule: one of ``TIE_RULES``.

    Returns:
        (the best correct candidates' counts (CPU), {"i2t_r_precision", "i2t_map_at_r", "t2i_r_precision",
        "t2i_map_at_r"} in percent).

    Raises:
        ValueError: for embeddings that do not fit the ground truth, bad inputs or an unknown tie rule.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    pairs = [(img.float(), cap.float()) for img, cap in pairs]  # ranked in fp32, as the single-positive path is
    shape = (pairs[0][0].shape[0], pairs[0][1].shape[0]) if pairs else (0, 0)
    if shape != (gt.n_images, gt.n_captions):
        raise ValueError(f"embeddings of {shape[0]} images × {shape[1]} captions, ground truth of {gt.n_images} × "
                         f"{gt.n_captions}")
    sets = dict(zip(DIRECTIONS, gt.positive_sets(), strict=True))
    depth = {d: max(s.max_relevant(), RECALL_DEPTH) for d, s in sets.items()}
    shallow = {d: s.max_relevant() <= LIST_DEPTH_LIMIT for d, s in sets.items()}
    rows = _ImageRowCounts(sets["i2t"]) if shallow["i2t"] else None
    lists = dict(zip(DIRECTIONS, top_lists(pairs, *(depth[d] if shallow[d] else 1 for d in DIRECTIONS), chunk_size,
                                           on_chunk=rows), strict=True)) if any(shallow.values()) else {}
    best, precision = {}, {}
    for direction, s in sets.items():
        found = lists[direction] if shallow[direction] else None
        stats = located_stats(found, pairs, direction, s, depth[direction])
        width = _width(found, depth[direction]) if found is not None else None
        cut = width if found is not None and width < found.n_candidates else None
        known = rows if direction == "i2t" else None
        best[direction] = _best_counts(stats, s, cut, pairs, direction, known)
        per_query = query_metrics(stats, s, (), tie_rule)
        precision.update({f"{direction}_{m}": float(100.0 * per_query[m].mean()) for m in ("r_precision", "map_at_r")})
    i2t, t2i = best["i2t"], best["t2i"]
    return RankCounts(i2t[0], t2i[0], i2t[1], t2i[1], i2t[2], t2i[2]), precision


class _ImageRowCounts:
    """`_count_best` of the image queries whose list will not settle them, taken from the pass's blocks of whole image
    rows (`top_lists`' `on_chunk`): a query whose best positive does not score above its list's last value."""

    def __init__(self, sets: PositiveSets) -> None:
        self.sets = sets  # every image is a query, in order
        self.counts = torch.zeros(3, sets.n_queries, dtype=torch.int64)
        self.done = torch.zeros(sets.n_queries, dtype=torch.bool)

    def __call__(self, r0: int, sims: torch.Tensor, top_values: torch.Tensor) -> None:
        if top_values.shape[1] == sims.shape[1]:
            return  # lists of every candidate settle every query
        here = self.sets.select(torch.arange(r0, r0 + sims.shape[0]))
        best = _best_scores(sims, here)
        rows = (best <= top_values[:, -1]).nonzero().squeeze(1).cpu()
        if rows.numel():
            every = rows.numel() == sims.shape[0]  # a weak model: no copy of the block
            self.counts[:, r0 + rows] = _count_best(sims if every else sims[rows.to(sims.device)],
                                                    here if every else here.select(rows))
            self.done[r0 + rows] = True


def _best_counts(stats: PositiveStats, sets: PositiveSets, width: int | None,
                 pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str,
                 known: _ImageRowCounts | None = None) -> torch.Tensor:
    """(3, Q) int64 per query of `sets`: wrong candidates strictly above its best positive, wrong ones tied with it,
    and positives tied with it (itself included).

    Read from the located positives where the list settles them: the query's best positive is listed and its tie group
    ends inside the list (`width` places; None: the lists hold every candidate). The others are taken from `known`
    (counted during the pass) or counted against every candidate, without sorting.
    """
    out = torch.zeros(3, sets.n_queries, dtype=torch.int64)
    first = (stats.pos_above == 0) & (stats.index_in_tie == 0)  # one per query with a positive in its list
    owner, g, e, m = (x[first] for x in (stats.owner, stats.greater, stats.equal, stats.tied_pos))
    keep = torch.ones_like(g, dtype=torch.bool) if width is None else g + e < width
    out[:, owner[keep]] = torch.stack([g, e - m, m])[:, keep]
    todo = torch.ones(sets.n_queries, dtype=torch.bool)
    todo[owner[keep]] = False
    if known is not None:
        out[:, todo & known.done] = known.counts[:, todo & known.done]
        todo &= ~known.done
    todo = todo.nonzero().squeeze(1)
    if todo.numel():
        for pos, scores in full_scores(pairs, direction, sets.queries[todo]):
            out[:, todo[pos]] = _count_best(scores, sets.select(todo[pos]))
    return out


def _best_scores(scores: torch.Tensor, sets: PositiveSets) -> torch.Tensor:
    """(b,) the best positive's score of each query whose scores against every candidate are the rows of `scores`."""
    owners, targets = sets.owners().to(scores.device), sets.targets.to(scores.device)
    best = torch.full((scores.shape[0],), -math.inf, dtype=scores.dtype, device=scores.device)
    return best.scatter_reduce_(0, owners, scores[owners, targets], "amax")


def _count_best(scores: torch.Tensor, sets: PositiveSets) -> torch.Tensor:
    """`_best_counts` (3, b) of the queries whose scores against every candidate are the rows of `scores` (b, n)."""
    owners, targets = sets.owners().to(scores.device), sets.targets.to(scores.device)
    best = _best_scores(scores, sets)
    own = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    own.index_add_(0, owners, (scores[owners, targets] == best[owners]).long())
    if scores.shape[1] < EXACT_FLOAT_COUNT:  # 0/1 masks summed by a matrix-vector product: 5× faster than a bool sum
        mask, ones = torch.empty_like(scores), torch.ones(scores.shape[1], dtype=scores.dtype, device=scores.device)
        greater = torch.mv(torch.gt(scores, best[:, None], out=mask), ones).long()
        equal = torch.mv(torch.eq(scores, best[:, None], out=mask), ones).long()
    else:
        greater, equal = (scores > best[:, None]).sum(1), (scores == best[:, None]).sum(1)
    return torch.stack([greater, equal - own, own]).cpu()
