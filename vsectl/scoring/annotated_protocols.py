"""ECCV Caption and CxC as registered protocols: COCO 5K `testall` with extended annotations (several positives per
query), the original COCO 5K R@K beside them, and plausible-match R-Precision when its files are given.

This module imports no torch (the CLI builds its help from the registry); the ground truth comes from
`vsectl.scoring.coco_annotations` and the scores from `vsectl.scoring.coco_protocols` when a protocol is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl.scoring.protocol_base import COCO_5K_IMAGES, Protocol, register_group, register_protocol

if TYPE_CHECKING:
    import torch

    from vsectl.scoring.positives import GroundTruth

ANNOTATION_OPTIONS = ("caption_ids", "image_ids", "pm_dir")  # what `vsectl eval --caption-ids/--image-ids/--pcm` give
BESIDE = ("coco5k_r1", "coco5k_r5", "coco5k_r10")  # the original COCO 5K R@K, shown beside every extended protocol


@dataclass(frozen=True)
class AnnotationFiles:
    """Extra inputs of an annotated protocol (all optional)."""

    caption_ids: Path | None = None  # one COCO caption id per caption of the split, in its order
    image_ids: Path | None = None  # one COCO image id per image of the split, in its order
    pm_dir: Path | None = None  # folder with pm_image_to_caption.json and pm_caption_to_image.json


class AnnotatedProtocol(Protocol):
    """One annotation set of the `eccv-caption` package scored on COCO 5K `testall`.

    Args:
        annotation: the set's name in the package ("eccv" or "cxc").
        measures: what is reported per direction ("map_at_r", "r_precision", "r@K").
        files: extra inputs (`with_annotations`).
    """

    annotation_options = ANNOTATION_OPTIONS

    def __init__(self, name: str, help: str, annotation: str, measures: tuple[str, ...],
                 files: AnnotationFiles | None = None) -> None:
        columns = tuple(m.replace("@", "") for m in measures) + BESIDE
        super().__init__(name, help, default_split="testall", images=COCO_5K_IMAGES, columns=columns)
        self.annotation, self.measures, self.files = annotation, measures, files or AnnotationFiles()
        if self.files.pm_dir is not None:
            self.columns += ("pcm_r_precision",)

    def with_annotations(self, **paths: Path | None) -> AnnotatedProtocol:
        """This protocol reading the given extra files (keys of ``ANNOTATION_OPTIONS``)."""
        given = {k: Path(v) for k, v in paths.items() if v is not None}
        return AnnotatedProtocol(self.name, self.help, self.annotation, self.measures, AnnotationFiles(**given))

    def ground_truth(self, split: Any, root: Path) -> GroundTruth:
        """The split's own truth plus the annotation sets, on the split's indices (COCO ids from the package)."""
        from vsectl.scoring.coco_protocols import annotated_truth

        return annotated_truth(split, self.annotation, self.files.caption_ids, self.files.image_ids,
                               self.files.pm_dir)

    def evaluate(self, img_embs: list[torch.Tensor], cap_embs: list[torch.Tensor], gt: GroundTruth,
                 chunk_size: int, tie_rule: str) -> dict[str, Any]:
        from vsectl.scoring.coco_protocols import evaluate_annotated

        return evaluate_annotated(img_embs, cap_embs, gt, self.annotation, self.measures, chunk_size, tie_rule)


ECCV = register_protocol(AnnotatedProtocol(
    "eccv", "ECCV Caption on COCO 5K testall: mAP@R, R-Precision, R@1 (needs the 'eccv' extra)", "eccv",
    ("map_at_r", "r_precision", "r@1")))
CXC = register_protocol(AnnotatedProtocol(
    "cxc", "CxC on COCO 5K testall: R@1/5/10 (needs the 'eccv' extra)", "cxc", ("r@1", "r@5", "r@10")))
register_group("extended", ("eccv", "cxc"))  # one similarity pass serves both
