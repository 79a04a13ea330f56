"""Provenance of an extracted split: what made the features, and the fingerprint that decides reuse."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch

from vsectl.data.raw import RawDataset
from vsectl.extract.video import VideoSampling
from vsectl.io import sha256_file
from vsectl.models.backbones import Backbone

RESIZE = "full image resized to size×size, bilinear (PIL), aspect not preserved, no crop (official test transform)"
FINGERPRINT_KEYS = ("backbone", "weights", "weights_sha256", "input_size", "mean", "std", "precision", "channels_last",
                    "dtype", "split", "limit", "shard_size", "source_dataset_sha256", "source_manifest_sha256",
                    "video")  # "video" only for `--video`: image stores keep the fingerprint they were made with


def split_provenance(
    backbone: Backbone, raw: RawDataset, split: str, *, precision: str, channels_last: bool, dtype: str,
    limit: int | None, shard_size: int, video: VideoSampling | None = None,
) -> dict[str, Any]:
    """Provenance attrs of an extracted split; `fingerprint` holds the part that decides whether files can be reused."""
    import vsectl

    manifest = raw.root / "manifest.json"
    info = {k: v for k, v in backbone.provenance().items() if k != "feat_dim"}  # the store writes feat_dim itself
    info.update(
        normalisation="(x / 255 - mean) / std per RGB channel, x the uint8 pixel",
        resize=RESIZE,
        precision=precision,
        channels_last=channels_last,
        dtype=dtype,
        split=split,
        limit=limit,
        shard_size=shard_size,
        source_dataset=str(raw.root),
        image_root=str(raw.image_root),
        source_dataset_sha256=sha256_file(raw.root / "dataset.json"),
        source_manifest_sha256=sha256_file(manifest) if manifest.is_file() else None,
        vsectl_version=vsectl.__version__,
        torch_version=str(torch.__version__),  # a str subclass h5py cannot store
    )
    if video is not None:
        info["video"] = json.dumps(asdict(video), sort_keys=True)  # the frame sampling
    info["fingerprint"] = json.dumps({k: info[k] for k in FINGERPRINT_KEYS if k in info}, sort_keys=True)
    return info
