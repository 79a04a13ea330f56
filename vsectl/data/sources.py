"""Feature sources (SCAN precomp `.npy` memmaps, the HDF5 store) and split loading (spec §9, DATA-5/6/7).

Sources keep only paths when pickled and open their files lazily in each process, so DataLoader workers read per item
and never hold whole arrays. The file runs past 400 lines because the two on-disk formats and the loader that picks
between them share these rules; each class is one format.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vsectl.data.captions import karpathy_captions_for_ids
from vsectl.data.raw import is_raw_dataset
from vsectl.data.splits import canonical_split, split_file_names
from vsectl.data.store import open_store, read_store_captions
from vsectl.errors import DataError

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5  # SCAN precomp groups 5 consecutive captions per image (DATA-6)
FINITE_CHECK_IMAGES = 2  # images checked for NaN/inf at each end of a split on load


class FeatureSource(ABC):
    """Random access to the feature sets of N unique images."""

    @property
    @abstractmethod
    def feat_dim(self) -> int:
        """D, the width of every feature row."""

    @abstractmethod
    def __len__(self) -> int:
        """N, the number of unique images."""

    @abstractmethod
    def lengths(self) -> np.ndarray:
        """(N,) int64 set sizes."""

    @abstractmethod
    def get(self, i: int) -> np.ndarray:
        """Return a fresh (n_i, D) float32 array with image i's features."""

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i % n


def _npy_shape(path: Path) -> tuple[int, ...]:
    # Mapping reads only the header; the map is dropped at once, so nothing of the data is loaded or kept open.
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        if "greater than file size" in str(e):
            raise DataError(f"{path} is truncated: shorter than its header says; re-create or re-copy it") from e
        raise DataError(f"{path} is not a readable .npy file ({e})") from e


class NpyFeatures(FeatureSource):
    """SCAN precomp features: a (rows, K, D) `.npy`, each image read with one `os.pread` into a fresh array.

    A memmap would leave every page a DataLoader worker touched mapped into that worker, so over an epoch its resident
    memory grows toward the file size (33 GB for COCO; measured in benchmarks/bench_data.py: 12.7 GB after 400 batches
    of a 10 GB file, against 1.1 GB with pread). pread copies the bytes and maps nothing. Fortran-ordered files (rare)
    fall back to the memmap.

    Args:
        path: the `<split>_ims.npy` file.
        row_stride: array rows per unique image; 5 when images are stored once per caption (DATA-5).
    """

    def __init__(self, path: str | Path, row_stride: int = 1) -> None:
        self.path = Path(path)
        self.row_stride = row_stride
        self._shape: tuple[int, ...] | None = None
        self._array: np.ndarray | None = None
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._layout: tuple[int, np.dtype, bool] | None = None  # (data offset, dtype, C order)

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, K, D) of the array on disk."""
        if self._shape is None:
            shape = _npy_shape(self.path)
            if len(shape) != 3:
                raise DataError(f"{self.path} has shape {shape}; precomp features must be (rows, K, D)")
            self._shape = shape
        return self._shape

    @property
    def feat_dim(self) -> int:
        return self.shape[2]

    def __len__(self) -> int:
        return self.shape[0] // self.row_stride

    def lengths(self) -> np.ndarray:
        return np.full(len(self), self.shape[1], dtype=np.int64)

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped (rows, K, D) array, opened on first use in this process (for bulk reads)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def _open(self) -> tuple[int, np.dtype, bool]:
        if self._fd_pid != os.getpid():  # first use in this process: a descriptor is not shared across fork
            if self._layout is None:
                view = np.load(self.path, mmap_mode="r")  # reads the header; the map is dropped at once
                self._layout = (int(view.offset), view.dtype, not np.isfortran(view))
                del view
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._layout

    def get(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        offset, dtype, c_order = self._open()
        if not c_order or not hasattr(os, "pread"):
            return np.array(self.array[i * self.row_stride], dtype=np.float32)  # (K, D), copied out of the map
        _, k, d = self.shape
        nbytes = k * d * dtype.itemsize
        buf = os.pread(self._fd, nbytes, offset + i * self.row_stride * nbytes)
        if len(buf) != nbytes:
            raise DataError(f"{self.path} ends inside image {i}; the file is truncated, re-create it")
        return np.frombuffer(buf, dtype=dtype).reshape(k, d).astype(np.float32)  # a fresh, writable copy

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_fd": None, "_fd_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"NpyFeatures({str(self.path)!r}, row_stride={self.row_stride})"


class H5Features(FeatureSource):
    """Variable-length feature sets from the HDF5 store (see `store.py`).

    The file handle is opened on the first `get` in each process and dropped when pickled (h5py handles are neither
    picklable nor fork-safe). The (N+1,) offsets are read once.

    Args:
        path: the `<split>.h5` store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offsets: np.ndarray | None = None
        self._feat_dim: int | None = None
        self._n_rows: int | None = None
        self._file: h5py.File | None = None
        self._rows: h5py.Dataset | None = None
        self._pid: int | None = None

    def _load_meta(self) -> None:
        with open_store(self.path) as f:
            self._offsets = np.asarray(f["features/offsets"][()], dtype=np.int64)
            self._feat_dim = int(f.attrs["feat_dim"])
            self._n_rows = int(f["features/rows"].shape[0])

    @property
    def offsets(self) -> np.ndarray:
        """(N+1,) int64; image n's rows are rows[offsets[n]:offsets[n+1]]."""
        if self._offsets is None:
            self._load_meta()
        return self._offsets

    @property
    def n_rows(self) -> int:
        """R, the total number of feature rows."""
        if self._n_rows is None:
            self._load_meta()
        return self._n_rows

    @property
    def feat_dim(self) -> int:
        if self._feat_dim is None:
            self._load_meta()
        return self._feat_dim

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        if self._rows is None or self._pid != os.getpid():  # first use, or a forked worker inherited the handle
            self._file = open_store(self.path)
            self._rows = self._file["features/rows"]
            self._pid = os.getpid()
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self._rows[start:stop].astype(np.float32, copy=False)  # h5py returns a fresh array

    def close(self) -> None:
        """Close this process's handle (reopened on the next `get`)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._rows = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_rows": None, "_pid": None}

    def __repr__(self) -> str:
        return f"H5Features({str(self.path)!r})"


class SubsetFeatures(FeatureSource):
    """The first `n` images of another source (used for dev-1k selection)."""

    def __init__(self, source: FeatureSource, n: int) -> None:
        self.source = source
        self.n = n

    @property
    def feat_dim(self) -> int:
        return self.source.feat_dim

    def __len__(self) -> int:
        return self.n

    def lengths(self) -> np.ndarray:
        return self.source.lengths()[: self.n]

    def get(self, i: int) -> np.ndarray:
        return self.source.get(self._check_index(i))

    def __repr__(self) -> str:
        return f"SubsetFeatures({self.source!r}, n={self.n})"


@dataclass
class Split:
    """One split: unique images, their captions, and the caption → image index.

    Attributes:
        name: split name ("train", "dev", "test", "testall").
        features: the N unique images' feature sets.
        captions: the C captions.
        cap2img: (C,) int64 image index of each caption.
        image_ids: the N image ids, as strings.
    """

    name: str
    features: FeatureSource
    captions: list[str]
    cap2img: np.ndarray
    image_ids: list[str]

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
