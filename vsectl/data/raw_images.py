"""Raw images for end-to-end training: splits of a raw dataset folder, the training-time and eval-time processing.

Train (spec §5.3): one crop ratio r ~ U(0.6, 1) for both sides at a random position, resize to exactly size×size
(bilinear, aspect ratio not kept), horizontal flip with p = 0.5. Eval: the whole image resized to size×size. Decoding
happens in DataLoader workers, one image per item, so a collection of any size streams from disk; the batch crosses to
the device as uint8 and the backbone normalises it there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vsectl.data.captions import TextProcessor
from vsectl.data.datasets import PairDataset, collate_tokens
from vsectl.data.images import UnreadableImage, _pil, load_rgb, resize_square, to_uint8_tensor
from vsectl.data.raw import is_raw_dataset, load_raw_dataset
from vsectl.data.sources import Split
from vsectl.errors import DataError
from vsectl.kinds import TextInput

log = logging.getLogger(__name__)

CROP_MIN = 0.6   # random crop ratio r ~ U(0.6, 1.0), the same for both sides (spec §5.3)
FLIP_P = 0.5
RAW_SPLIT_ALIASES = {"testall": "test"}


class RawImages:
    """The image files of a split, read one at a time (stands where a feature source stands in a `Split`).

    Args:
        paths: one file per unique image, in split order.
        root: the dataset folder (for messages).
    """

    def __init__(self, paths: Sequence[str | Path], root: str | Path) -> None:
        self.paths = [str(p) for p in paths]
        self.root = str(root)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int, size: int, rng: np.random.Generator | None) -> torch.Tensor:
        """Image i as (3, size, size) uint8: training processing when `rng` is given, eval processing otherwise.

        Raises:
            DataError: the file is missing or unreadable (training cannot skip an image without changing the epoch).
        """
        try:
            im = load_rgb(self.paths[i], draft_size=size)
        except UnreadableImage as e:
            raise DataError(f"cannot read training image {i} of {self.root}: {e}; fix or remove it and re-run "
                            "`vsectl data prepare`") from None
        return to_uint8_tensor(train_view(im, size, rng) if rng is not None else resize_square(im, size))

    def __repr__(self) -> str:
        return f"RawImages({self.root!r}, {len(self)} images)"


def train_view(im: Any, size: int, rng: np.random.Generator) -> Any:
    """Random crop of ratio r ~ U(0.6, 1) on both sides, resize to size×size (bilinear), flip with p = 0.5."""
    Image = _pil()
    w, h = im.size
    r = rng.uniform(CROP_MIN, 1.0)
    cw, ch = max(1, round(r * w)), max(1, round(r * h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    flip = rng.random() < FLIP_P
    im = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))  # crop and resize in one pass
    return im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im


def load_raw_split(root: str | Path, split: str) -> Split:
    """One split of a raw dataset folder (dataset.json + manifest.json) as a `Split` whose features are `RawImages`.

    Images without captions are left out (they cannot be paired); every image file must exist.
    """
    if not is_raw_dataset(root):
        raise DataError(f"{root} is not a raw dataset folder (dataset.json + manifest.json); an image backbone trains "
                        "from images: make one with `vsectl data prepare`, then set data.root to it")
    dataset = load_raw_dataset(root)
    # The COCO protocols read "testall" (5,000 images): in a raw Karpathy folder that is the test split.
    images = [im for im in dataset.split(RAW_SPLIT_ALIASES.get(split, split)) if im["captions"]]
    if not images:
        raise DataError(f"split {split!r} of {root} has no images with captions")
    missing = [str(im["path"]) for im in images if not im["path"].is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(images)} {split} images are missing under {dataset.image_root}; "
                        f"first: {missing[0]}")
    captions = [c for im in images for c in im["captions"]]
    cap2img = np.repeat(np.arange(len(images), dtype=np.int64), [len(im["captions"]) for im in images])
    log.info("split %s from %s: %d images, %d captions (raw images)", split, root, len(images), len(captions))
    return Split(split, RawImages([im["path"] for im in images], root), captions, cap2img,
                 [im["id"] for im in images], source="pixels")


def subset_raw(split: Split, n: int) -> Split:
    """The first `n` images of a raw split and their captions."""
    sub = split.subset_images(n)
    sub.features = RawImages(split.features.paths[:n], split.features.root)
    return sub


class RawPairDataset(PairDataset):
    """Training pairs over raw images, indexed per caption: item i = (image cap2img[i], caption i).

    The same per-item generators, epochs and caption side as `PairDataset`; the image side is a decoded image with the
    training-time crop and flip (drawn from the same generator) instead of a feature set.

    Args:
        split: a split from `load_raw_split`.
        text: encodes captions, or with `text_input` STATES gives cached token states (`get(i, rng)`).
        size: the backbone's input side.
        seed: base seed.
        text_input: what `text` gives: token ids or cached states.
    """

    def __init__(self, split: Split, text: TextProcessor, size: int, seed: int,
                 text_input: TextInput = TextInput.IDS) -> None:
        if not isinstance(split.features, RawImages):
            raise TypeError("RawPairDataset needs a split of raw images (load_raw_split)")
        super().__init__(split, text, region_drop=0.0, seed=seed, text_input=text_input)
        self.size = size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return (image (3, size, size) uint8, token ids (T,) int64 or cached states (T, H) float32, i)."""
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = self.split.features.read(int(self.split.cap2img[i]), self.size, rng)
        return image, self.caption(i, rng), i


class RawImageDataset(Dataset):
    """The unique images of a raw split with eval-time processing (each image once)."""

    def __init__(self, split: Split, size: int) -> None:
        self.split = split
        self.size = size

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.split.features.read(i, self.size, None), i


def collate_raw_pairs(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]], pad_id: int = 0,
                      text_input: TextInput = TextInput.IDS) -> dict[str, torch.Tensor]:
    """Stack raw-image pairs: images (B, 3, S, S) uint8; tokens padded as `collate_pairs` pads them (DATA-2)."""
    images, ids, index = zip(*batch, strict=True)
    tokens = collate_tokens(list(zip(ids, index, strict=True)), pad_id=pad_id, text_input=text_input)
    return {"images": torch.stack(images), **tokens}


def collate_raw_images(batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Stack eval images: images (B, 3, S, S) uint8, index (B,) int64."""
    images, index = zip(*batch, strict=True)
    return {"images": torch.stack(images), "index": torch.tensor(index, dtype=torch.int64)}
