"""The data door: (data root, split, what the image encoder reads) → the split, its training pairs and its images.

Training and evaluation open their data here and nowhere else. Each image source says what it provides (stored
feature sets or pixels), which folders it recognises, and which datasets serve its splits; a new source (tar shards,
video files) is one reader plus one `register_image_source` call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vsectl.data.datasets import ImageSetDataset, PairDataset, collate_images, collate_pairs
from vsectl.data.raw import is_raw_dataset
from vsectl.data.raw_images import (
    RawImageDataset,
    RawPairDataset,
    collate_raw_images,
    collate_raw_pairs,
    load_raw_split,
    subset_raw,
)
from vsectl.data.sources import Split, load_split, search_collection_message
from vsectl.data.splits import canonical_split, split_file_names
from vsectl.errors import DataError
from vsectl.kinds import ImageInput, TextInput
from vsectl.registry import Registry

log = logging.getLogger(__name__)


class FeatureWidthError(DataError):
    """Feature sets of another width than the model's (`found` and `expected` dimensions, at `where`)."""

    def __init__(self, where: str, found: int, expected: int) -> None:
        self.where, self.found, self.expected = where, found, expected
        super().__init__(f"{where}: features are {found}-d but model.image.feat_dim is {expected}; set --set "
                         f"model.image.feat_dim={found}")


class ImageSource:
    """One way of reading a split's images. Subclasses set `name` and `provides` and override what differs.

    The defaults serve feature sets: `split.features.get(i)` gives an image's (n_i, D) set.
    """

    name = "features"
    provides = ImageInput.FEATURES

    def claims(self, root: Path, split: str) -> bool:
        """True when `root` holds `split` in this source's format."""
        raise NotImplementedError

    def load(self, root: Path, split: str) -> Split:
        """Read the split (counts and captions; no image is read whole). Its `source` must be this source's name."""
        raise NotImplementedError

    def subset(self, split: Split, n: int) -> Split:
        """The first `n` images and their captions."""
        return split.subset_images(n)

    def check(self, split: Split, feat_dim: int, where: str) -> None:
        """Refuse a split the model cannot take (feature sets of another size: FeatureWidthError)."""
        if split.features.feat_dim != feat_dim:
            raise FeatureWidthError(where, split.features.feat_dim, feat_dim)

    def pairs(self, split: Split, text: Any, seed: int, text_input: TextInput, drop: float,
              image_size: int | None) -> tuple[Dataset, Callable[..., dict]]:
        """Training pairs (caption-indexed) and their collate function (`pad_id`, `text_input` keywords)."""
        return PairDataset(split, text, drop, seed, text_input=text_input), collate_pairs

    def images(self, split: Split, image_size: int | None) -> tuple[Dataset, Callable[..., dict]]:
        """Each unique image once, with eval processing, and their collate function."""
        return ImageSetDataset(split), collate_images


class FeatureStore(ImageSource):
    """Feature sets in a store (`<split>.h5`) or SCAN precomp (`<split>_ims.npy` + `_caps.txt`)."""

    def claims(self, root: Path, split: str) -> bool:
        return any(path.is_file() for name in split_file_names(canonical_split(split))
                   for path in (root / f"{name}.h5", root / f"{name}_ims.npy", root / "precomp" / f"{name}_ims.npy"))

    def load(self, root: Path, split: str) -> Split:
        return load_split(root, split)


class RawImageFolder(ImageSource):
    """Image files of a raw dataset folder (dataset.json + manifest.json), decoded and augmented in the workers."""

    name = "pixels"
    provides = ImageInput.PIXELS

    def claims(self, root: Path, split: str) -> bool:
        return is_raw_dataset(root)

    def load(self, root: Path, split: str) -> Split:
        return load_raw_split(root, split)

    def subset(self, split: Split, n: int) -> Split:
        return subset_raw(split, n)

    def check(self, split: Split, feat_dim: int, where: str) -> None:
        pass  # the encoder's own backbone makes the features

    def pairs(self, split: Split, text: Any, seed: int, text_input: TextInput, drop: float,
              image_size: int | None) -> tuple[Dataset, Callable[..., dict]]:
        return RawPairDataset(split, text, image_size, seed, text_input=text_input), collate_raw_pairs

    def images(self, split: Split, image_size: int | None) -> tuple[Dataset, Callable[..., dict]]:
        return RawImageDataset(split, image_size), collate_raw_images


class TarShards(RawImageFolder):
    """Webdataset tar shards, one folder (or `<split>-*.tar` prefix) per split; images read by their offset."""

    name = "tar-shards"

    def claims(self, root: Path, split: str) -> bool:
        from vsectl.data.tar_images import split_shards

        return bool(split_shards(root, split))

    def load(self, root: Path, split: str) -> Split:
        from vsectl.data.tar_images import load_tar_split

        return load_tar_split(root, split)

    def subset(self, split: Split, n: int) -> Split:
        from vsectl.data.tar_images import subset_tar

        return subset_tar(split, n)


IMAGE_SOURCES: Registry[ImageSource] = Registry("image source")


def register_image_source(source: ImageSource) -> ImageSource:
    """Add a source; among the sources that provide the same input, the first registered is the default."""
    return IMAGE_SOURCES.register(source.name)(source)


register_image_source(FeatureStore())
register_image_source(RawImageFolder())
register_image_source(TarShards())


def source_of(split: Split) -> ImageSource:
    return IMAGE_SOURCES.get(split.source)


def open_split(root: str | Path, split: str, reads: ImageInput) -> Split:
    """The split `split` of `root` for an encoder that reads `reads`, from the first source that recognises it.

    When none does, the default source of that input reads it, and its one-line error says what is missing.
    """
    root = Path(root)
    offered = [source for _, source in IMAGE_SOURCES.items() if source.provides is reads]
    if not offered:
        raise DataError(f"no image source provides {reads.value}")
    source = next((s for s in offered if root.is_dir() and s.claims(root, split)), offered[0])
    return source.load(root, split)


def open_checked(root: str | Path, split: str, reads: ImageInput, feat_dim: int) -> Split:
    """`open_split`, refusing a split without captions or with features the model cannot take."""
    data = open_split(root, split, reads)
    where = f"{root}/{data.name}"
    if data.n_captions == 0:
        raise DataError(search_collection_message(where, data.n_images))
    source_of(data).check(data, feat_dim, where)
    return data


def subset(split: Split, n: int) -> Split:
    """The first `n` images of `split` and their captions."""
    return source_of(split).subset(split, n)


def pair_dataset(split: Split, text: Any, seed: int, text_input: TextInput, drop: float = 0.0,
                 image_size: int | None = None) -> tuple[Dataset, Callable[..., dict]]:
    """The training pairs of `split` and their collate function (see `ImageSource.pairs`)."""
    return source_of(split).pairs(split, text, seed, text_input, drop, image_size)


def image_dataset(split: Split, image_size: int | None = None) -> tuple[Dataset, Callable[..., dict]]:
    """The unique images of `split` (eval processing) and their collate function."""
    return source_of(split).images(split, image_size)
