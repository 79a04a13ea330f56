"""The protocol seam: the `Protocol` class, its registry and groups, and how a protocol is registered.

A protocol says which split it is defined on, how many images that split must have, how its ground truth is formed from
the split (one correct image per caption, or several correct candidates per query in either direction), and how its
metrics are computed from the embeddings. The catalogue `vsectl eval` offers is `vsectl.scoring.protocols` (the
published protocols, then ECCV Caption and CxC from `vsectl.scoring.annotated_protocols`). This module imports no torch
(the CLI builds its help from it); the computing imports it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl.errors import ConfigError
from vsectl.registry import Registry

if TYPE_CHECKING:
    import torch

    from vsectl.scoring.positives import GroundTruth

RECALL_COLUMNS = ("r1", "r5", "r10", "medr", "meanr")  # per direction, in eval's table
COCO_5K_IMAGES = 5000  # images in COCO Karpathy `testall`
COCO_FOLD_SIZE = 1000  # COCO 1K folds are contiguous blocks of this many images
DEV_IMAGES = 1000  # model selection ranks the first 1,000 dev images


class Protocol:
    """One evaluation protocol. Subclasses override what differs; the defaults rank the whole split.

    Args:
        name: what `--protocol` takes.
        help: one line for `vsectl eval --help`.
        default_split: the split the protocol is defined on.
        images: the number of images that split must have (None: any).
        columns: the per-direction metrics of eval's table (keys `i2t_<col>` / `t2i_<col>` of the result).
        block: images per ranked block, for protocols that rank part of the split (the first images, or folds).
    """

    def __init__(self, name: str, help: str, default_split: str = "test", images: int | None = None,
                 columns: tuple[str, ...] = RECALL_COLUMNS, block: int = 0) -> None:
        self.name, self.help, self.default_split, self.images, self.columns = name, help, default_split, images, \
            columns
        self.block = block

    annotation_options: tuple[str, ...] = ()  # extra annotation files the protocol reads (see `with_annotations`)

    def with_annotations(self, **paths: Path | None) -> Protocol:
        """This protocol reading extra annotation files (`vsectl eval --caption-ids …`); the base takes none."""
        given = sorted(k for k, v in paths.items() if v is not None)
        if given:
            raise ConfigError(f"protocol {self.name} reads no extra annotation files ({', '.join(given)}); they are "
                              f"for {', '.join(n for n, p in PROTOCOLS.items() if p.annotation_options)}")
        return self

    def ground_truth(self, split: Any, root: Path) -> GroundTruth:
        """The correct candidates of every query of `split` (a `vsectl.data.sources.Split`; its `root` folder holds
        any extra annotations). Default: a caption's image, and an image's own captions."""
        from vsectl.scoring.positives import GroundTruth

        return GroundTruth.from_cap2img(split.cap2img)

    def evaluate(self, img_embs: list[torch.Tensor], cap_embs: list[torch.Tensor], gt: GroundTruth,
                 chunk_size: int, tie_rule: str) -> dict[str, Any]:
        """{"n_images", "n_captions" (the counts ranked), "metrics", "ties"} (and anything the protocol adds)."""
        from vsectl.scoring.metrics import evaluate_images

        return evaluate_images(img_embs, cap_embs, gt, None, chunk_size, tie_rule)


class FirstImages(Protocol):
    """The first `block` images of the split (all if fewer) and their captions."""

    def evaluate(self, img_embs: list[torch.Tensor], cap_embs: list[torch.Tensor], gt: GroundTruth,
                 chunk_size: int, tie_rule: str) -> dict[str, Any]:
        import torch

        from vsectl.scoring.metrics import evaluate_images

        images = torch.arange(min(self.block, gt.n_images), device=img_embs[0].device)
        return evaluate_images(img_embs, cap_embs, gt, images, chunk_size, tie_rule)


class Folds(Protocol):
    """Contiguous folds of `block` images with their captions; every metric is the mean over the folds."""

    def evaluate(self, img_embs: list[torch.Tensor], cap_embs: list[torch.Tensor], gt: GroundTruth,
                 chunk_size: int, tie_rule: str) -> dict[str, Any]:
        import numpy as np
        import torch

        from vsectl.scoring.metrics import evaluate_images

        runs = [evaluate_images(img_embs, cap_embs, gt, torch.arange(a, a + self.block, device=img_embs[0].device),
                                chunk_size, tie_rule) for a in range(0, gt.n_images - self.block + 1, self.block)]
        folds, fold_ties = [r["metrics"] for r in runs], [r["ties"] for r in runs]
        return {"n_images": gt.n_images, "n_captions": gt.n_captions,
                "metrics": {key: float(np.mean([f[key] for f in folds])) for key in folds[0]},
                "ties": {key: sum(t[key] for t in fold_ties) for key in fold_ties[0]}, "folds": folds,
                "fold_ties": fold_ties}


PROTOCOLS: Registry[Protocol] = Registry("protocol")
GROUPS = {"all": ("coco1k", "coco5k")}  # names that stand for several protocols


def register_protocol(protocol: Protocol) -> Protocol:
    """Add a protocol to `vsectl eval` (its table, JSON, help and the library's `evaluate_runs`)."""
    if protocol.name in GROUPS:
        raise ValueError(f"protocol name '{protocol.name}' is taken by a group of protocols")
    return PROTOCOLS.register(protocol.name)(protocol)


def register_group(name: str, members: tuple[str, ...]) -> None:
    """A `--protocol` name that stands for several registered protocols."""
    if name in PROTOCOLS or name in GROUPS:
        raise ValueError(f"'{name}' is already a protocol or a group")
    GROUPS[name] = members
