"""ECCV Caption and CxC on COCO 5K (and plausible-match R-Precision), with the original COCO 5K R@K beside them.

Every score comes from one pass over the similarities (`vsectl.scoring.top_lists`): each query keeps its best candidates
as deep as its largest R (or K) needs, and the positives of every annotation set are located in those lists
(`vsectl.scoring.positives.evaluate_sets`). Metrics are percentages, like vsectl's R@K.
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

from vsectl.scoring.coco_annotations import annotation_dir, load_annotation, load_plausible, split_ids
from vsectl.scoring.multi_positive import PositiveSets
from vsectl.scoring.positives import GroundTruth, evaluate_sets, needed_depths
from vsectl.scoring.top_lists import DIRECTIONS, top_lists

RECALL_KS = (1, 5, 10)
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
