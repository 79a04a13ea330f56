"""The HDF5 feature store: variable-length feature sets plus captions, one file per split (spec §9, DATA-7).

Layout of `<root>/<split>.h5`: `features/rows` (R, D), `features/offsets` (N+1,) int64, `images/ids` (N,),
`captions/text` (C,), `captions/image_index` (C,) int64, and file attrs `format`, `version`, `feat_dim`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from vsectl.errors import DataError
from vsectl.io import publish

log = logging.getLogger(__name__)

STORE_FORMAT = "vsectl-store"
STORE_VERSION = 1
RESERVED_ATTRS = ("format", "version", "feat_dim")
CHUNK_BYTES = 1 << 18  # 256 KiB chunks: one BUTD image (36×2048 fp32) spans 2-3 chunks, small sets share one
FLUSH_CHUNKS = 64  # rows are buffered up to 64 chunks (16 MiB) before one resize-and-write
DTYPES = {"float32": np.float32, "float16": np.float16}


def chunk_rows(feat_dim: int, dtype: str | np.dtype) -> int:
    """Number of rows per HDF5 chunk so that a chunk holds about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (feat_dim * np.dtype(dtype).itemsize))


def _encode_attr(value: Any) -> Any:
    # HDF5 attrs hold scalars natively; anything else (lists, dicts, None) is stored as its JSON text.
    if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    return json.dumps(value)


class StoreWriter:
    """Write a split's feature sets and captions to `path`, atomically.

    Rows go to `<path>.partial` in buffered, resizable chunks, so features never sit in RAM all at once. A clean exit
    from the `with` block (or `close()`) writes the index datasets and renames the partial file to `path`; an exception
    (or `abort()`) deletes it, so a crash never leaves a half-written store under the final name.

    Args:
        path: target file, usually `<root>/<split>.h5`.
        feat_dim: D, the width of every feature row.
        dtype: on-disk dtype of the rows, "float32" or "float16". Reads always return float32.
        attrs: provenance stored as file attrs (non-scalar values are JSON-encoded).
    """

    def __init__(
        self, path: str | Path, feat_dim: int, dtype: str = "float32", attrs: dict[str, Any] | None = None
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if feat_dim <= 0:
            raise ValueError(f"feat_dim must be positive, got {feat_dim}")
        clash = sorted(set(attrs or {}) & set(RESERVED_ATTRS))
        if clash:
            raise ValueError(f"attrs {clash} are reserved by the store format")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.feat_dim = feat_dim
        self.dtype = np.dtype(DTYPES[dtype])
        self.attrs = dict(attrs or {})
        self._chunk = chunk_rows(feat_dim, self.dtype)
        self._offsets: list[int] = [0]
        self._ids: list[str] = []
        self._captions: list[str] = []
        self._cap2img: list[int] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: h5py.File | None = h5py.File(self.partial, "w")
        self._rows = self._file.create_dataset(
            "features/rows",
            shape=(0, feat_dim),
            maxshape=(None, feat_dim),
            dtype=self.dtype,
            chunks=(self._chunk, feat_dim),
        )

    @property
    def n_images(self) -> int:
        """Images added so far."""
        return len(self._ids)

    def add_image(self, image_id: str, feats: np.ndarray) -> int:
        """Append one image's feature set.

        Args:
            image_id: the dataset's id for this image (stored as a string).
            feats: (n, D) features, n ≥ 1, all finite.

        Returns:
            The image index n used by `add_caption` and by readers.
        """
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise DataError(
                f"image {image_id!r}: features have shape {feats.shape}, expected (n, {self.feat_dim}); "
                "check the extractor's output dimension"
            )
        if feats.shape[0] == 0:
            raise DataError(f"image {image_id!r}: empty feature set (0 rows); every image needs at least one row")
        with np.errstate(over="ignore"):  # float16 overflow becomes inf and is reported below
            rows = feats.astype(self.dtype, copy=False)
        if not np.isfinite(rows).all():
            hint = " (values overflow float16: store as float32)" if np.isfinite(feats).all() else ""
            raise DataError(f"image {image_id!r}: features contain NaN or inf{hint}; fix the extraction first")
        self._buffer.append(np.array(rows, copy=True))  # the caller may reuse its array
        self._buffered += rows.shape[0]
        self._offsets.append(self._offsets[-1] + rows.shape[0])
        self._ids.append(str(image_id))
        if self._buffered >= FLUSH_CHUNKS * self._chunk:
            self._flush()
        return len(self._ids) - 1

    def add_caption(self, text: str, image_index: int) -> None:
        """Append one caption of image `image_index` (an index returned by `add_image`)."""
        if not 0 <= image_index < len(self._ids):
            raise DataError(f"caption {text!r} refers to image {image_index}, but only {len(self._ids)} images exist")
        if not text.strip():
            raise DataError(f"caption {len(self._captions)} of image {image_index} is empty")
        self._captions.append(text)
        self._cap2img.append(int(image_index))

    def _flush(self) -> None:
        if not self._buffered:
            return
        block = np.concatenate(self._buffer, axis=0)  # (buffered, D)
        self._rows.resize(self._written + block.shape[0], axis=0)
        self._rows[self._written :] = block
        self._written += block.shape[0]
        self._buffer, self._buffered = [], 0

    def close(self) -> Path:
        """Finish the file and move it to `path`. Returns `path`."""
        if self._file is None:
            return self.path
        self._flush()
        f = self._file
        f.create_dataset("features/offsets", data=np.asarray(self._offsets, dtype=np.int64))
        str_dt = h5py.string_dtype("utf-8")
        f.create_dataset("images/ids", data=np.array(self._ids, dtype=object), dtype=str_dt)
        f.create_dataset("captions/text", data=np.array(self._captions, dtype=object), dtype=str_dt)
        f.create_dataset("captions/image_index", data=np.asarray(self._cap2img, dtype=np.int64))
        f.attrs["format"] = STORE_FORMAT
        f.attrs["version"] = STORE_VERSION
        f.attrs["feat_dim"] = self.feat_dim
        for key, value in self.attrs.items():
            f.attrs[key] = _encode_attr(value)
        f.close()
        self._file = None
        publish(self.partial, self.path)
        if self._captions:
            log.info("wrote %s: %d images (%d feature rows), %d captions", self.path, len(self._ids), self._written,
                     len(self._captions))
        else:  # a set store without captions, e.g. the token-state cache (one set per caption)
            log.info("wrote %s: %d sets, %d rows", self.path, len(self._ids), self._written)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far; `path` is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_store(
    path: str | Path,
    sets: Iterable[tuple[str, np.ndarray]],
    captions: Sequence[str],
    cap2img: Sequence[int],
    feat_dim: int,
    dtype: str = "float32",
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a whole split in one call.

    Args:
        path: target `.h5` file.
        sets: (image_id, (n_i, D) features) pairs in image-index order; consumed lazily.
        captions: the C captions.
        cap2img: (C,) image index of each caption.
        feat_dim: D.
        dtype: on-disk dtype, "float32" or "float16".
        attrs: provenance attrs.

    Returns:
        `path`.
    """
    if len(captions) != len(cap2img):
        raise DataError(f"{len(captions)} captions but {len(cap2img)} caption→image indices; they must match")
    with StoreWriter(path, feat_dim, dtype=dtype, attrs=attrs) as writer:
        for image_id, feats in sets:
            writer.add_image(image_id, feats)
        for text, index in zip(captions, cap2img, strict=True):
            writer.add_caption(text, int(index))
    return Path(path)


def open_store(path: str | Path) -> h5py.File:
    """Open a store read-only, checking that it is one. The caller closes it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature store {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({e}); re-create it with the import step") from e
    if f.attrs.get("format") != STORE_FORMAT:
        f.close()
        raise DataError(f"{path} is not a vsectl feature store (attr format != {STORE_FORMAT!r})")
    if int(f.attrs.get("version", -1)) > STORE_VERSION:
        version = f.attrs["version"]
        f.close()
        raise DataError(f"{path} has store version {version}; this vsectl reads up to {STORE_VERSION}, upgrade it")
    return f


def read_store_attrs(path: str | Path) -> dict[str, Any]:
    """Return the file attrs of a store (JSON-encoded values are left as text)."""
    with open_store(path) as f:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def read_store_captions(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Read the caption table and image ids of a store.

    Returns:
        (captions (C strings), cap2img (C,) int64, image_ids (N strings)).
    """
    with open_store(path) as f:
        captions = list(f["captions/text"].asstr()[()])
        cap2img = np.asarray(f["captions/image_index"][()], dtype=np.int64)
        image_ids = list(f["images/ids"].asstr()[()])
    return captions, cap2img, image_ids
