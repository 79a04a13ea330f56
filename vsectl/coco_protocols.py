"""ECCV Caption and CxC on COCO 5K (and plausible-match R-Precision), with the original COCO 5K R@K beside them.

Every score comes from one pass over the similarities (`vsectl.top_lists`): each query keeps its best candidates as
deep as its largest R (or K) needs, and the positives of every annotation set are located in those lists
(`vsectl.multi_positive`). Metrics are percentages, like vsectl's R@K.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.coco_annotations import annotation_dir, load_annotation, load_plausible, split_ids
from vsectl.multi_positive import PositiveSets, PositiveStats, positive_stats, query_metrics, truncated_ties
from vsectl.positives import GroundTruth
from vsectl.tie_rules import TIE_RULES
from vsectl.top_lists import DIRECTIONS, TopLists, full_lists, list_length, top_lists

RECALL_KS = (1, 5, 10)
LIST_DEPTH_LIMIT = 1024  # sets needing deeper lists than this (plausible match) are ranked in full instead
BESIDE = {"coco5k": ("r@1", "r@5", "r@10"), "pcm": ("r_precision",)}  # reported with every annotated protocol


def coco5k_sets(cap2img: np.ndarray) -> tuple[PositiveSets, PositiveSets]:
    """The split's own ground truth: an image's captions (every image has one), a caption's image."""
    c2i = torch.as_tensor(np.asarray(cap2img, dtype=np.int64))
    n_img, n_cap = int(c2i.max()) + 1, c2i.numel()
    counts = torch.bincount(c2i, minlength=n_img)
    if bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} images have no caption")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    i2t = PositiveSets(torch.arange(n_img), offsets, torch.argsort(c2i, stable=True), counts)
    t2i = PositiveSets(torch.arange(n_cap), torch.arange(n_cap + 1), c2i.clone(), torch.ones(n_cap, dtype=torch.int64))
    return i2t, t2i


def _stats(lists: TopLists | None, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str,
           sets: PositiveSets, depth: int) -> PositiveStats:
    """Positive statistics of one set: from the top lists where they are deep enough, else from full rankings.

    The lists are cut to the set's own `depth` (plus the margin): a set that needs fewer places reads fewer.
    """
    if lists is not None:
        width = min(lists.values.shape[1], list_length(depth, lists.n_candidates))
        values, indices = lists.values[:, :width][sets.queries], lists.indices[:, :width][sets.queries]
        complete = width == lists.n_candidates
        redo = truncated_ties(values, depth, complete).nonzero().squeeze(1)
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
            parts.append(_relabel(positive_stats(full.values, full.indices, sets.select(sub), full.n_candidates), sub))
    return PositiveStats.cat(parts)


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
            stats = _stats(None if deep else lists[direction], pairs, direction, s, max(s.max_relevant(), *ks, 1))
            per_query = query_metrics(stats, s, ks, tie_rule)
            out["metrics"][name].update({f"{direction}_{m.replace('@', '')}": float(100.0 * per_query[m].mean())
                                         for m in wanted[name]})
            out["n_queries"][name][direction] = s.n_queries
            tied = stats.owner[stats.equal > stats.tied_pos]
            out["ties"][name][direction] = int(torch.unique(tied).numel())
    return out


@dataclass(frozen=True)
class AnnotatedTruth(GroundTruth):
    """A split's own ground truth plus annotation sets with several positives per query.

    Attributes:
        sets: annotation name → (image queries' positives, caption queries' positives), with each query's R.
        id_source: how the split's COCO ids were found.
    """

    sets: dict[str, tuple[PositiveSets, PositiveSets]] = field(default_factory=dict)
    id_source: str = ""


def annotated_truth(split: Any, annotation: str, caption_ids: Path | None = None, image_ids: Path | None = None,
                    pm_dir: Path | None = None) -> AnnotatedTruth:
    """The truth of an annotated protocol on `split`: `annotation`'s sets, the split's own ("coco5k") and, with
    `pm_dir`, the plausible matches ("pcm"). Raises ConfigError when the split is not COCO 5K or the extra is missing.
    """
    folder = annotation_dir()
    ids = split_ids(split.n_images, split.cap2img, split.image_ids, caption_ids, image_ids, folder)
    sets = {annotation: load_annotation(annotation, ids, folder), "coco5k": coco5k_sets(split.cap2img)}
    if pm_dir is not None:
        sets["pcm"] = load_plausible(pm_dir, ids)
    base = GroundTruth.from_cap2img(split.cap2img)
    return AnnotatedTruth(**{f.name: getattr(base, f.name) for f in fields(GroundTruth)}, sets=sets,
                          id_source=ids.source)


_LAST_PASS: dict[str, Any] = {}  # the last top lists: eccv and cxc on the same embeddings share one pass


def shared_pass(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], depth: dict[str, int], chunk_size: int
                ) -> dict[str, Any]:
    """Top lists at least `depth` deep ({"lists", "scored": scores already computed from them}); the last pass is
    reused when it was made from these very tensors, unchanged (weak references and version counters, so a freed
    tensor's memory never passes for it) and deep enough."""
    tensors = [t for p in pairs for t in p]
    last = _LAST_PASS.get("pass")
    if last is not None and len(last["refs"]) == len(tensors) and last["chunk"] == chunk_size \
            and all(r() is t and t._version == v for r, t, v in zip(last["refs"], tensors, last["versions"],
                                                                     strict=True)) \
            and all(last["depth"][d] >= depth[d] for d in DIRECTIONS):
        return last
    lists = dict(zip(DIRECTIONS, top_lists(pairs, max(1, depth["i2t"]), max(1, depth["t2i"]), chunk_size),
                     strict=True))
    _LAST_PASS["pass"] = {"refs": [weakref.ref(t) for t in tensors], "versions": [t._version for t in tensors],
                          "chunk": chunk_size, "depth": dict(depth), "lists": lists, "scored": {}}
    return _LAST_PASS["pass"]


def _set_key(name: str, both: tuple[PositiveSets, PositiveSets], measures: Sequence[str], tie_rule: str) -> tuple:
    """Identifies a set's scores: its name, content, measures and tie rule (the split's own set recurs per protocol)."""
    digest = hashlib.sha256()
    for s in both:
        for t in (s.queries, s.offsets, s.targets, s.n_relevant):
            digest.update(t.numpy().tobytes())
    return name, digest.hexdigest(), tuple(measures), tie_rule


def evaluate_annotated(img_embs: Sequence[torch.Tensor], cap_embs: Sequence[torch.Tensor], gt: AnnotatedTruth,
                       annotation: str, measures: Sequence[str], chunk_size: int, tie_rule: str) -> dict[str, Any]:
    """An annotated protocol's result: its measures per direction ("i2t_map_at_r", ...; "rsum" when they are R@1/5/10),
    the COCO 5K R@K beside them ("i2t_coco5k_r1", ..., "coco5k_rsum") and, with plausible matches, their R-Precision
    ("i2t_pcm_r_precision")."""
    if not isinstance(gt, AnnotatedTruth):
        raise ValueError("an annotated protocol needs the ground truth its own `ground_truth` builds")
    pairs = list(zip(img_embs, cap_embs, strict=True))
    wanted = {annotation: list(measures), **{k: list(v) for k, v in BESIDE.items() if k in gt.sets}}
    sets = {k: gt.sets[k] for k in wanted}
    shared = shared_pass(pairs, needed_depths(sets, wanted), chunk_size)
    keys = {name: _set_key(name, sets[name], wanted[name], tie_rule) for name in sets}
    todo = [name for name in sets if keys[name] not in shared["scored"]]
    fresh = evaluate_sets(pairs, {n: sets[n] for n in todo}, {n: wanted[n] for n in todo}, tie_rule, chunk_size,
                          shared["lists"])
    for name in todo:
        shared["scored"][keys[name]] = {part: fresh[part][name] for part in fresh}
    scored = {part: {name: shared["scored"][keys[name]][part] for name in sets} for part in fresh}
    metrics = dict(scored["metrics"][annotation])
    for name in wanted:
        if name != annotation:
            metrics.update({f"{k[:3]}_{name}{k[3:]}": v for k, v in scored["metrics"][name].items()})
    for prefix, src in (("", scored["metrics"][annotation]), ("coco5k_", scored["metrics"]["coco5k"])):
        if all(f"{d}_r{k}" in src for d in DIRECTIONS for k in RECALL_KS):
            metrics[f"{prefix}rsum"] = sum(src[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_KS)
    ties = {f"{d}_queries_with_ties": scored["ties"][annotation][d] for d in DIRECTIONS}
    ties.update({f"{name}_{d}_queries_with_ties": scored["ties"][name][d] for name in wanted if name != annotation
                 for d in DIRECTIONS})
    return {"n_images": gt.n_images, "n_captions": gt.n_captions, "metrics": metrics, "ties": ties,
            "n_queries": {d: scored["n_queries"][annotation][d] for d in DIRECTIONS}, "id_source": gt.id_source}
