"""Videos as folders of frame images: which frames are sampled, and how their features become one set."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError

FRAME_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"})  # frame images in a video folder
FRAME_POOLS = ("mean", "max", "none")


@dataclass(frozen=True)
class VideoSampling:
    """How a video's frame folder becomes a feature set (`extract --video`).

    Attributes:
        stride: keep every `stride`-th frame image (frames dumped at F fps, kept at F / stride fps).
        max_frames: at most this many frames per video, picked uniformly over the kept ones (first and last kept).
        frame_pool: "mean" or "max" pools each frame's tokens to one vector (the video's set is its frames);
            "none" keeps every token of every frame.
    """

    stride: int = 1
    max_frames: int | None = None
    frame_pool: str = "mean"

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ConfigError(f"frame stride must be at least 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max frames must be at least 1, got {self.max_frames}")
        if self.frame_pool not in FRAME_POOLS:
            raise ConfigError(f"unknown frame pooling '{self.frame_pool}'; use {', '.join(FRAME_POOLS)}")


def _natural_key(path: Path) -> list[Any]:
    """frame_2.jpg before frame_10.jpg."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def list_frames(folder: Path, sampling: VideoSampling) -> list[Path]:
    """The sampled frame images of one video folder, in natural name order (empty when there are none)."""
    if not folder.is_dir():
        return []
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()),
                    key=_natural_key)[:: sampling.stride]
    if sampling.max_frames is not None and len(frames) > sampling.max_frames:
        keep = np.linspace(0, len(frames) - 1, sampling.max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def _item_files(images: list[dict[str, Any]], a: int, b: int, video: VideoSampling | None) -> list[list[Path]]:
    """The files of items a..b-1: the image itself, or a video's sampled frames."""
    if video is None:
        return [[Path(images[i]["path"])] for i in range(a, b)]
    return [list_frames(Path(images[i]["path"]), video) for i in range(a, b)]


def _pool_frames(feats: list[np.ndarray], video: VideoSampling | None) -> np.ndarray:
    """One item's feature set from its files' (N, C) sets: an image's own set, or a video's frame set."""
    if video is None:
        return feats[0]
    if video.frame_pool == "none":
        return np.concatenate(feats, axis=0)
    reduce = np.mean if video.frame_pool == "mean" else np.max
    return np.stack([reduce(f, axis=0) for f in feats])  # (frames, C)
