"""Splits: a split's feature source, captions and caption→image index, loaded lazily from a feature folder (the
feature formats themselves are in `features.py`), its fingerprint, and the one-line messages for missing data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsectl.data.captions import karpathy_captions_for_ids
from vsectl.data.features import (
    FeatureSource,
    H5Features,
    NpyFeatures,
    SubsetFeatures,
    _npy_shape,
)
from vsectl.data.raw import is_raw_dataset
from vsectl.data.splits import canonical_split, split_file_names
from vsectl.data.store import read_store_captions
from vsectl.errors import DataError

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5  # SCAN precomp groups 5 consecutive captions per image
FINITE_CHECK_IMAGES = 2  # images checked for NaN/inf at each end of a split on load


@dataclass
class Split:
    """One split: unique images, their captions, and the caption → image index.

    Attributes:
        name: split name ("train", "dev", "test", "testall").
        features: the N unique images' feature sets.
        captions: the C captions.
        cap2img: (C,) int64 image index of each caption.
        image_ids: the N image ids, as strings.
        source: the image source that read it (`vsectl.data.door.IMAGE_SOURCES`), which serves its datasets.
    """

    name: str
    features: FeatureSource
    captions: list[str]
    cap2img: np.ndarray
    image_ids: list[str]
    source: str = "features"

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def subset_images(self, n: int) -> Split:
        """The first `n` images and their captions (same order); features are not read."""
        if not 0 < n <= self.n_images:
            raise DataError(f"cannot take the first {n} images of split {self.name!r}, which has {self.n_images}")
        keep = np.flatnonzero(self.cap2img < n)
        return Split(
            name=self.name,
            features=SubsetFeatures(self.features, n),
            captions=[self.captions[k] for k in keep],
            cap2img=self.cap2img[keep].copy(),
            image_ids=self.image_ids[:n],
            source=self.source,
        )


FINGERPRINT_BYTES = 1 << 20  # the fingerprint hashes this much at each end of a feature file, and its size


def _feature_files(source: FeatureSource) -> list[Path]:
    while isinstance(source, SubsetFeatures):
        source = source.source
    return [source.path] if isinstance(source, (NpyFeatures, H5Features)) else []


def split_fingerprint(split: Split) -> str:
    """A sha256 (hex) that changes when the split's data does, without reading whole feature files.

    It covers the split name, every caption, the caption → image index, the image ids, the feature sets' sizes and
    width, and each feature file's size and first and last MiB (for raw images: each image file's name and size).
    """
    h = hashlib.sha256()
    h.update(f"{split.name}\n{split.n_images}\n{split.n_captions}\n".encode())
    for text in split.captions:
        h.update(text.encode("utf-8") + b"\n")
    h.update(np.ascontiguousarray(split.cap2img, dtype=np.int64).tobytes())
    h.update("\n".join(split.image_ids).encode("utf-8"))
    if not isinstance(split.features, FeatureSource):  # raw images: each file's name and size
        for path in map(Path, getattr(split.features, "paths", [])):
            h.update(f"{path.name}:{path.stat().st_size}\n".encode())
        return h.hexdigest()
    h.update(f"{split.features.feat_dim}\n".encode())
    h.update(np.ascontiguousarray(split.features.lengths(), dtype=np.int64).tobytes())
    for path in _feature_files(split.features):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            fh.seek(max(0, size - FINGERPRINT_BYTES))
            h.update(fh.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def check_finite(source: FeatureSource, indices: Iterable[int]) -> None:
    """Raise DataError naming the first image among `indices` whose features contain NaN or inf."""
    for i in indices:
        if not np.isfinite(source.get(int(i))).all():
            raise DataError(f"image {int(i)} of {source!r} has NaN or inf features; re-extract or re-import them")


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}: line {n} is an empty {what}; every line must hold one")
    return [line.strip() for line in lines]


def _available_splits(root: Path) -> list[str]:
    found: set[str] = set()
    for folder in (root, root / "precomp"):
        if folder.is_dir():
            found.update(p.name[: -len(".h5")] for p in folder.glob("*.h5"))
            found.update(p.name[: -len("_ims.npy")] for p in folder.glob("*_ims.npy"))
    return sorted({canonical_split(name) for name in found})


def search_collection_message(where: str, n_images: int) -> str:
    """Why a split of images without captions cannot be trained or evaluated, and what it is for."""
    return (f"{where} has {n_images} images and no captions: it is a search collection, not a training or evaluation "
            "set; train and eval need captions (embed it for search with `vsectl embed`)")


EXTRACT_HINT = "vsectl extract --backbone efficientnet-lite0 --data {raw} --split all --out {out}"


def missing_root_message(root: Path) -> str:
    """What to do when `data.root` does not exist: the toy data's command, or where feature folders come from."""
    if "toy" in root.name:
        return f"data folder {root} does not exist; create the toy data with: vsectl data toy --out {root}"
    return (f"data folder {root} does not exist; set data.root (--set data.root=FOLDER) to a feature folder made by "
            "`vsectl extract` or `vsectl data import-precomp` (or `vsectl data toy --out data/toy` for the toy data)")


def missing_split_message(root: Path, split: str) -> str:
    """What to do when `root` has no files for `split`: extract a raw dataset first, else list what is there."""
    if is_raw_dataset(root):
        out = root.parent / f"{root.name}_feats"
        return (f"{root} is a raw image dataset (dataset.json), not features; run vsectl extract first, e.g. "
                f"{EXTRACT_HINT.format(raw=root, out=out)}, then use --set data.root={out}")
    available = _available_splits(root)
    if not available:
        return (f"{root} holds no feature files (<split>.h5 or <split>_ims.npy); make them with `vsectl extract` or "
                "`vsectl data import-precomp`, or point data.root at the folder that has them")
    return (f"split {split!r} not found in {root} (no {split}.h5 or {split}_ims.npy); splits there: "
            f"{', '.join(available)}")


def _stride_from_ids(ids: list[str]) -> int:
    # Without a caption file, rows stored once per caption show up as runs of 5 identical ids.
    k = CAPTIONS_PER_IMAGE
    if ids and len(ids) % k == 0 and all(ids[j] == ids[j - j % k] for j in range(len(ids))):
        return k
    return 1


def _load_store_split(path: Path, split: str, captions_json: str | Path | None) -> Split:
    features = H5Features(path)
    captions, cap2img, image_ids = read_store_captions(path)
    n = len(features)
    if len(image_ids) != n:
        raise DataError(f"{path}: {len(image_ids)} image ids but {n} feature sets; re-create the store")
    lengths = features.lengths()
    if n and (lengths.min() <= 0 or features.offsets[0] != 0 or features.offsets[-1] != features.n_rows):
        raise DataError(f"{path}: feature offsets are inconsistent with the {features.n_rows} rows; re-create it")
    if captions_json is not None:
        captions, cap2img = karpathy_captions_for_ids(captions_json, split, image_ids)
    for k, text in enumerate(captions):
        if not text.strip():
            raise DataError(f"{path}: caption {k} is empty")
    if len(cap2img) and (cap2img.min() < 0 or cap2img.max() >= n):
        raise DataError(f"{path}: caption image indices fall outside [0, {n}); re-create the store")
    return Split(split, features, captions, cap2img, image_ids)


def _load_precomp_split(ims: Path, split: str, captions_json: str | Path | None) -> Split:
    folder = ims.parent
    stem = ims.name[: -len("_ims.npy")]  # the name on disk: `val_ims.npy` holds split `dev`
    caps_path = folder / f"{stem}_caps.txt"
    ids_path = folder / f"{stem}_ids.txt"
    rows = _npy_shape(ims)[0]
    row_ids = _read_lines(ids_path, "id") if ids_path.is_file() else None
    if row_ids is not None and len(row_ids) != rows:
        raise DataError(f"{ids_path} has {len(row_ids)} ids but {ims.name} has {rows} rows; they must match "
                        "(one id per feature row)")
    if captions_json is not None:
        if row_ids is None:
            raise DataError(f"matching captions from {captions_json} needs the ids file {ids_path}")
        stride = _stride_from_ids(row_ids)
    elif not caps_path.is_file():
        raise DataError(f"{caps_path} does not exist; precomp features need their captions (or pass captions_json)")
    else:
        captions = _read_lines(caps_path, "caption")
        n_caps = len(captions)
        stride = CAPTIONS_PER_IMAGE if rows == n_caps else 1  # DATA-5: one row per caption → 5 rows per image
        if rows % stride or n_caps != CAPTIONS_PER_IMAGE * (rows // stride):
            raise DataError(
                f"{caps_path.name} has {n_caps} captions but {ims.name} has {rows} rows; precomp data needs "
                f"{CAPTIONS_PER_IMAGE} consecutive captions per image, i.e. {CAPTIONS_PER_IMAGE * rows} captions "
                f"(one row per image) or {rows} captions (one row per caption)"
            )
    features = NpyFeatures(ims, row_stride=stride)
    n = rows // stride
    image_ids = row_ids[::stride] if row_ids is not None else [str(i) for i in range(n)]
    if captions_json is not None:
        captions, cap2img = karpathy_captions_for_ids(captions_json, split, image_ids)
    else:
        cap2img = np.arange(len(captions), dtype=np.int64) // CAPTIONS_PER_IMAGE
    return Split(split, features, captions, cap2img, image_ids)


def load_split(
    root: str | Path, split: str, captions_json: str | Path | None = None, *, feat_dim: int | None = None
) -> Split:
    """Load one split, validating counts cheaply (no feature array is read whole).

    Looks for, in order, `<root>/<split>.h5` (the store), `<root>/<split>_ims.npy` and `<root>/precomp/<split>_ims.npy`
    (SCAN precomp with `<split>_caps.txt` and optional `<split>_ids.txt`).

    Args:
        root: dataset folder.
        split: "train", "dev", "test", "testall", ...
        captions_json: optional Karpathy JSON; captions then come from it, matched to the features by image id, with
            any number of captions per image.
        feat_dim: expected D; a mismatch raises DataError.

    Returns:
        The split, with features opened lazily.
    """
    root = Path(root)
    split = canonical_split(split)
    if not root.is_dir():
        raise DataError(missing_root_message(root))
    candidates = [path for name in split_file_names(split)
                  for path in (root / f"{name}.h5", root / f"{name}_ims.npy", root / "precomp" / f"{name}_ims.npy")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DataError(missing_split_message(root, split))
    if found.suffix == ".h5":
        result = _load_store_split(found, split, captions_json)
    else:
        result = _load_precomp_split(found, split, captions_json)
    if feat_dim is not None and result.features.feat_dim != feat_dim:
        raise DataError(
            f"{found} holds {result.features.feat_dim}-d features but the model expects {feat_dim}; "
            "set the image feature dimension to match the data"
        )
    n = result.n_images
    ends = {*range(min(FINITE_CHECK_IMAGES, n)), *range(max(0, n - FINITE_CHECK_IMAGES), n)}
    check_finite(result.features, sorted(ends))
    log.info(
        "split %s from %s: %d images, %d captions, %d-d features",
        split,
        found,
        n,
        result.n_captions,
        result.features.feat_dim,
    )
    return result
