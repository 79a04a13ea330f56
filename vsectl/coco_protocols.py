"""ECCV Caption and CxC on COCO 5K (and plausible-match R-Precision), with the original COCO 5K R@K beside them.

Every score comes from one pass over the similarities (`vsectl.top_lists`): each query keeps its best candidates as
deep as its largest R (or K) needs, and the positives of every annotation set are located in those lists
(`vsectl.multi_positive`). Metrics are percentages, like vsectl's R@K.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.coco_annotations import CocoIds, annotation_dir, load_annotation, load_plausible
from vsectl.metrics import TIE_RULES
from vsectl.multi_positive import PositiveSets, PositiveStats, positive_stats, query_metrics, truncated_ties
from vsectl.top_lists import DIRECTIONS, TopLists, full_lists, top_lists

RECALL_KS = (1, 5, 10)
LIST_DEPTH_LIMIT = 1024  # sets needing deeper lists than this (plausible match) are ranked in full instead
# protocol → {annotation set: the per-query metrics it reports}
PROTOCOL_METRICS = {
    "eccv": {"eccv": ("map_at_r", "r_precision", "r@1"), "coco5k": ("r@1", "r@5", "r@10")},
    "cxc": {"cxc": ("r@1", "r@5", "r@10"), "coco5k": ("r@1", "r@5", "r@10")},
}
PLAUSIBLE_METRICS = ("r_precision",)


def coco5k_sets(cap2img: np.ndarray) -> tuple[PositiveSets, PositiveSets]:
    """The split's own ground truth: an image's captions, a caption's image."""
    cap2img = np.asarray(cap2img, dtype=np.int64)
    by_image: dict[int, list[int]] = {}
    for k, j in enumerate(cap2img.tolist()):
        by_image.setdefault(j, []).append(k)
    return PositiveSets.from_lists(by_image), PositiveSets.from_lists({k: [j] for k, j in enumerate(cap2img.tolist())})


def _stats(lists: TopLists | None, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str,
           sets: PositiveSets, depth: int) -> PositiveStats:
    """Positive statistics of one set: from the top lists where they are deep enough, else from full rankings."""
    if lists is not None:
        values, indices = lists.values[sets.queries], lists.indices[sets.queries]
        redo = truncated_ties(values, depth, lists.complete).nonzero().squeeze(1)
        keep = torch.ones(sets.n_queries, dtype=torch.bool)
        keep[redo] = False
        kept = keep.nonzero().squeeze(1)
        parts = [_relabel(positive_stats(values[kept], indices[kept], sets.select(kept), lists.n_candidates), kept)]
    else:
        redo, parts = torch.arange(sets.n_queries), []
    if redo.numel():
        for pos, full in full_lists(pairs, direction, sets.queries[redo]):
            sub = redo[pos]
            parts.append(_relabel(positive_stats(full.values, full.indices, sets.select(sub), full.n_candidates), sub))
    return PositiveStats.cat(parts)


def _relabel(stats: PositiveStats, positions: torch.Tensor) -> PositiveStats:
    """Stats of a subset of queries, owners mapped back to positions in the whole set."""
    return PositiveStats(positions[stats.owner], stats.greater, stats.equal, stats.tied_pos, stats.pos_above,
                         stats.index_in_tie)


def _summary(per_query: dict[str, torch.Tensor], wanted: Sequence[str], direction: str, prefix: str
             ) -> dict[str, float]:
    return {f"{prefix}{direction}_{name.replace('@', '')}": float(100.0 * per_query[name].mean()) for name in wanted}


def evaluate_sets(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  sets: dict[str, tuple[PositiveSets, PositiveSets]], wanted: dict[str, Sequence[str]],
                  tie_rule: str, chunk_size: int = 1024) -> dict[str, Any]:
    """Score several annotation sets from one pass over the similarities.

    Args:
        pairs: one (img (N, E_m), cap (C, E_m)) pair per model (an ensemble sums their similarities).
        sets: annotation name → (i2t sets, t2i sets) on the split's indices.
        wanted: annotation name → metrics of `query_metrics` to report ("r@1", "r_precision", ...).
        tie_rule: one of ``TIE_RULES``.

    Returns:
        {"metrics": {"<name>_<dir>_<metric>": percent}, "n_queries": {"<name>_<dir>": Q}, "ties": {"<name>_<dir>":
        queries with a positive tied exactly with another candidate}}.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    ks = [int(m[2:]) for names in wanted.values() for m in names if m.startswith("r@")]
    depth = {}
    for d, direction in enumerate(DIRECTIONS):
        needs = [max(s[d].max_relevant(), *ks) for s in sets.values() if s[d].max_relevant() <= LIST_DEPTH_LIMIT]
        depth[direction] = max(needs, default=0)
    lists = dict(zip(DIRECTIONS, top_lists(pairs, max(1, depth["i2t"]), max(1, depth["t2i"]), chunk_size),
                     strict=True)) if any(depth.values()) else {}
    out: dict[str, Any] = {"metrics": {}, "n_queries": {}, "ties": {}}
    for name, both in sets.items():
        for d, direction in enumerate(DIRECTIONS):
            s = both[d]
            deep = s.max_relevant() > LIST_DEPTH_LIMIT
            stats = _stats(None if deep else lists[direction], pairs, direction, s, depth[direction])
            metric_ks = sorted({int(m[2:]) for m in wanted[name] if m.startswith("r@")})
            per_query = query_metrics(stats, s, metric_ks, tie_rule)
            out["metrics"].update(_summary(per_query, wanted[name], direction, f"{name}_"))
            out["n_queries"][f"{name}_{direction}"] = s.n_queries
            tied = stats.owner[stats.equal > stats.tied_pos]  # a positive tied with a non-positive
            out["ties"][f"{name}_{direction}"] = int(torch.unique(tied).numel())
    return out


def evaluate_coco_protocols(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], cap2img: np.ndarray, ids: CocoIds,
                            protocols: Sequence[str], tie_rule: str, pm_dir: Path | None = None,
                            chunk_size: int = 1024) -> dict[str, dict[str, Any]]:
    """ECCV Caption and/or CxC results (one similarity pass for all), each with the COCO 5K R@K beside it.

    Returns:
        protocol → {"protocol", "tie_rule", "metrics", "n_queries", "ties", "id_source"}; with `pm_dir`, every result
        also carries the plausible-match R-Precision ("pm_i2t_r_precision", "pm_t2i_r_precision").
    """
    unknown = [p for p in protocols if p not in PROTOCOL_METRICS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r}; use {', '.join(PROTOCOL_METRICS)}")
    folder = annotation_dir()
    wanted: dict[str, list[str]] = {}
    for p in protocols:
        for name, metrics in PROTOCOL_METRICS[p].items():
            wanted.setdefault(name, [])
            wanted[name] += [m for m in metrics if m not in wanted[name]]
    sets = {name: coco5k_sets(cap2img) if name == "coco5k" else load_annotation(name, ids, folder) for name in wanted}
    if pm_dir is not None:
        sets["pm"], wanted["pm"] = load_plausible(pm_dir, ids), list(PLAUSIBLE_METRICS)
    scored = evaluate_sets(pairs, sets, wanted, tie_rule, chunk_size)
    results = {}
    for p in protocols:
        names = [*PROTOCOL_METRICS[p], *(["pm"] if pm_dir is not None else [])]
        keep = {k: v for k, v in scored["metrics"].items() if k.split("_", 1)[0] in names}
        for name in names:
            if name in ("cxc", "coco5k"):
                keep[f"{name}_rsum"] = sum(keep[f"{name}_{d}_r{k}"] for d in DIRECTIONS for k in RECALL_KS)
        results[p] = {"protocol": p, "tie_rule": tie_rule, "metrics": keep, "id_source": ids.source,
                      "n_queries": {k: v for k, v in scored["n_queries"].items() if k.split("_", 1)[0] in names},
                      "ties": {k: v for k, v in scored["ties"].items() if k.split("_", 1)[0] in names}}
    return results
