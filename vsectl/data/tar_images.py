"""Training and evaluation from webdataset tar shards: the `tar-shards` image source of the data door.

Layout: `data.root` holds one folder of shards per split (`train/`, `dev/` or `val/`, `test/`, each with `*.tar`), or
shards named `<split>-*.tar` beside each other. A sample with an image and a caption (its `.txt`, or the json's
"caption") is one image with one caption; samples missing either are left out, as a raw dataset leaves out images
without captions. The shards are indexed once when the split is opened (member headers only; captions are read,
images are not), and each image is read by its offset in the DataLoader worker that decodes it, so training's seeded
sampler, per-image augmentation and DDP's equal per-rank batch counts work exactly as for an image folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.data.images import UnreadableImage, load_rgb, resize_square, to_uint8_tensor
from vsectl.data.raw_images import RawImages, train_view
from vsectl.data.sources import Split
from vsectl.data.splits import canonical_split, split_file_names
from vsectl.data.tar_shards import Sample, image_file, read_member, read_shard
from vsectl.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"testall": "test"}


def split_shards(root: Path, split: str) -> list[Path]:
    """The shards of `split` under `root` (its folder, or `<split>-*.tar`), sorted; [] when there are none."""
    for name in split_file_names(canonical_split(SPLIT_ALIASES.get(split, split))):
        found = sorted((root / name).glob("*.tar")) if (root / name).is_dir() else sorted(root.glob(f"{name}-*.tar"))
        if found:
            return found
    return []


def index_shard(path: Path) -> list[tuple[str, int, int, str, str | None]]:
    """(key, image offset, image size, image member name, caption) per sample with an image; images are not read."""
    return [(s.key, s.offset, s.size, s.image_name, s.caption) for s in read_shard(path, images=False)
            if s.image_name is not None]


class TarImages(RawImages):
    """The images of a split that live inside tar shards, each read by its offset (stands where `RawImages` does).

    Args:
        members: (tar file, offset, size, member name) per image, in split order.
        root: the data folder (for messages).
    """

    def __init__(self, members: list[tuple[str, int, int, str]], root: str | Path) -> None:
        super().__init__([m[0] for m in members], root)  # `paths`: each image's shard (the fingerprint sizes them)
        self.members = members

    def read(self, i: int, size: int, rng: np.random.Generator | None) -> torch.Tensor:
        tar, offset, length, name = self.members[i]
        try:
            im = load_rgb(image_file(read_member(tar, offset, length)), draft_size=size)
        except UnreadableImage:
            raise DataError(f"cannot read training image {name} in {tar}: not a readable image; fix or remove the "
                            "sample and re-create the shard") from None
        return to_uint8_tensor(train_view(im, size, rng) if rng is not None else resize_square(im, size))

    def __repr__(self) -> str:
        return f"TarImages({self.root!r}, {len(self)} images)"


def load_tar_split(root: str | Path, split: str) -> Split:
    """One split of a folder of tar shards as a `Split` whose features are `TarImages` (source "tar-shards")."""
    root = Path(root)
    shards = split_shards(root, split)
    if not shards:
        raise DataError(f"{root} has no tar shards for split {split!r} (a {split}/ folder of .tar files, or "
                        f"{split}-*.tar)")
    members, captions, ids = [], [], []
    for shard in shards:
        for key, offset, size, name, caption in index_shard(shard):
            if caption:
                members.append((str(shard), offset, size, name))
                captions.append(caption)
                ids.append(key)
    if not members:
        raise DataError(f"the {len(shards)} tar shards of split {split!r} in {root} hold no sample with both an "
                        "image and a caption")
    log.info("split %s from %s: %d images with captions in %d tar shards", split, root, len(members), len(shards))
    return Split(split, TarImages(members, root), captions, np.arange(len(members), dtype=np.int64), ids,
                 source="tar-shards")


def subset_tar(split: Split, n: int) -> Split:
    """The first `n` images of a tar split and their captions."""
    sub = split.subset_images(n)
    sub.features = TarImages(split.features.members[:n], split.features.root)
    return sub


def decode_sample(sample: Sample, size: int) -> tuple[Any, str]:
    """Worker side: the sample's image as (3, size, size) uint8, or None and why."""
    from vsectl.data.images import preprocess

    if sample.image is None:
        return None, f"{sample.key}: no image member"
    data = image_file(sample.image)
    try:
        return preprocess(data, size), ""
    except UnreadableImage as e:
        said = str(e).removeprefix(f"{data}: ").replace(str(data), repr(sample.image_name))  # no object repr
        return None, f"{sample.image_name}: {said}"
