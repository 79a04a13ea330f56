"""The two on-disk feature formats behind a split: SCAN precomp `.npy` files (read with one `pread` per image) and
the vsectl HDF5 store (flat rows + offsets), plus a subset view. Each source keeps only paths when pickled and opens its
files lazily in each process, so DataLoader workers read per item and never hold a whole array.
"""


import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vsectl.data.store import open_store
from vsectl.errors import DataError

log = logging.getLogger(__name__)


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

    def block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Images a..b-1: their (R, D) rows (each image's K rows in turn, in the stored dtype) and (b − a,) set sizes.

        One positioned read for C-ordered files with one row per image; the caller's block size bounds it.
        """
        if not 0 <= a < b <= len(self):
            raise IndexError(f"image block {a}..{b} out of range for {len(self)} images")
        offset, dtype, c_order = self._open()
        _, k, d = self.shape
        if self.row_stride != 1 or not c_order or not hasattr(os, "preadv"):
            rows = np.concatenate([self.get(i) for i in range(a, b)]).astype(dtype)
        else:
            nbytes = (b - a) * k * d * dtype.itemsize
            buf = bytearray(nbytes)  # writable, so torch can take the rows without a copy
            if os.preadv(self._fd, [buf], offset + a * k * d * dtype.itemsize) != nbytes:
                raise DataError(f"{self.path} ends inside images {a}..{b - 1}; the file is truncated, re-create it")
            rows = np.frombuffer(buf, dtype=dtype).reshape((b - a) * k, d)
        return rows, np.full(b - a, k, dtype=np.int64)

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

    def _dataset(self) -> h5py.Dataset:
        if self._rows is None or self._pid != os.getpid():  # first use, or a forked worker inherited the handle
            self._file = open_store(self.path)
            self._rows = self._file["features/rows"]
            self._pid = os.getpid()
        return self._rows

    def get(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self._dataset()[start:stop].astype(np.float32, copy=False)  # h5py returns a fresh array

    def block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Images a..b-1 in one read: their (R, D) rows in the stored dtype and (b − a,) set sizes.

        One contiguous read instead of one per image; bounded by the caller's block size, never the whole array.
        """
        if not 0 <= a < b <= len(self):
            raise IndexError(f"image block {a}..{b} out of range for {len(self)} images")
        return self._dataset()[self.offsets[a]: self.offsets[b]], np.diff(self.offsets[a: b + 1])

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
