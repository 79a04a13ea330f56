"""The embeddings folder written by `vsectl embed` and read (memory-mapped) by `index`, `search` and `serve`.

Layout of EMB/ (every file written before the folder is renamed into place, so a folder that exists is complete):

    meta.json             format, version, run + checkpoint + fingerprint, embed_dim, counts, source, backbone
                          provenance, images_sha256 / captions_sha256 (of the two .npy files), skipped images
    images.npy            (N, E) float32 L2-normalised image embeddings, row i = image i
    captions.npy          (C, E) float32 caption embeddings (C = 0 for a plain image folder)
    cap2img.npy           (C,) int64: image index of each caption
    images.jsonl          one JSON object per image: {"id", "path" (absolute, or null), "caption" (first, or null)}
    captions.jsonl        one JSON object per caption: {"text", "image"}
    images.offsets.npy    (N + 1,) int64 byte offsets of the lines of images.jsonl (random access, no full read)
    captions.offsets.npy  (C + 1,) int64 likewise for captions.jsonl

Only numpy is imported here (no torch): a server or a script can open and search embeddings cheaply.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import DataError

EMBEDDINGS_FORMAT = "vsectl-embeddings"
EMBEDDINGS_VERSION = 1
META = "meta.json"
SIDES = ("images", "captions")
HASH_BLOCK = 1 << 24  # 16 MiB per read while hashing


def _map(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing; the embeddings folder is incomplete: run `vsectl embed` again")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy file ({e}); run `vsectl embed` again") from None


class JsonLines:
    """Random access to the lines of a JSONL file through its offsets array (nothing read until asked)."""

    def __init__(self, path: Path, offsets: Path) -> None:
        self.path = path
        self.offsets = _map(offsets)  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records in {self.path}")
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        with open(self.path, "rb") as f:
            f.seek(start)
            return json.loads(f.read(stop - start))


@dataclass
class Embeddings:
    """An opened embeddings folder; arrays are read-only memory maps, records are read line by line on demand.

    Attributes:
        path: the folder.
        meta: the parsed meta.json (see the module docstring).
        images: (N, E) float32 memmap of image embeddings.
        captions: (C, E) float32 memmap of caption embeddings.
        cap2img: (C,) int64 memmap, image index of each caption.
    """

    path: Path
    meta: dict[str, Any]
    images: np.ndarray
    captions: np.ndarray
    cap2img: np.ndarray
    _records: dict[str, JsonLines] = field(default_factory=dict, repr=False)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the run checkpoint that made these embeddings (see `vsectl.retrieval.run_fingerprint`)."""
        return str(self.meta["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.images.shape[1])

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.captions.shape[0])

    def side(self, name: str) -> np.ndarray:
        """The (n, E) matrix of one side: "images" or "captions"."""
        if name not in SIDES:
            raise ValueError(f"unknown side {name!r}; use images or captions")
        return self.images if name == "images" else self.captions

    def size(self, name: str) -> int:
        return int(self.side(name).shape[0])

    def image(self, i: int) -> dict[str, Any]:
        """Image i's record: {"id": str, "path": absolute str or None, "caption": its first caption or None}."""
        return self._lines("images")[int(i)]

    def caption(self, j: int) -> dict[str, Any]:
        """Caption j's record: {"text": str, "image": int}."""
        return self._lines("captions")[int(j)]

    def image_path(self, i: int) -> Path | None:
        """The file of image i as recorded at embed time (absolute), or None when unknown (a store without paths)."""
        path = self.image(i).get("path")
        return Path(path) if path else None

    def _lines(self, side: str) -> JsonLines:
        if side not in self._records:
            self._records[side] = JsonLines(self.path / f"{side}.jsonl", self.path / f"{side}.offsets.npy")
        return self._records[side]


def open_embeddings(path: str | Path) -> Embeddings:
    """Open an embeddings folder written by `vsectl embed` (memory-mapped, nothing loaded).

    Raises:
        DataError: the folder is missing, incomplete, of another format or inconsistent.
    """
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise DataError(f"embeddings folder {path} does not exist; make it with `vsectl embed RUN ... --out {path}`")
    if not meta_path.is_file():
        hint = " (an interrupted embed: run it again to resume)" if path.with_name(path.name + ".partial").exists() \
            else ""
        raise DataError(f"{path} is not an embeddings folder (no {META}){hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path} is not valid JSON ({e}); run `vsectl embed` again") from None
    if not isinstance(meta, dict) or meta.get("format") != EMBEDDINGS_FORMAT:
        raise DataError(f"{path} is not a vsectl embeddings folder ({META} format is not {EMBEDDINGS_FORMAT!r})")
    if int(meta.get("version", -1)) > EMBEDDINGS_VERSION:
        raise DataError(f"{path} has embeddings version {meta['version']}; this vsectl reads up to "
                        f"{EMBEDDINGS_VERSION}, upgrade it")
    images, captions, cap2img = _map(path / "images.npy"), _map(path / "captions.npy"), _map(path / "cap2img.npy")
    n, c = int(meta["n_images"]), int(meta["n_captions"])
    if images.shape != (n, meta["embed_dim"]) or captions.shape != (c, meta["embed_dim"]) or cap2img.shape != (c,):
        raise DataError(f"{path}: array shapes {images.shape}, {captions.shape}, {cap2img.shape} do not match "
                        f"{META} ({n} images, {c} captions, {meta['embed_dim']}-d); run `vsectl embed` again")
    if images.dtype != np.float32 or captions.dtype != np.float32:
        raise DataError(f"{path}: embeddings must be float32, found {images.dtype} / {captions.dtype}")
    return Embeddings(path=path, meta=meta, images=images, captions=captions, cap2img=cap2img)


# ------------------------------------------------------------------------------------------------ writing


class NpyAppender:
    """Write a .npy file of a known shape block by block (streaming), hashing the bytes as they go.

    Args:
        path: the file.
        shape: the final shape, (rows, dim) or (rows,); `close` checks that exactly `rows` rows were appended.
        dtype: element type.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                   "fortran_order": False, "shape": self.shape})
        self._write(buf.getvalue())

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block of shape {block.shape} does not fit rows of shape {self.shape[1:]}")
        self._write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> str:
        """Flush and fsync; returns the sha256 of the whole file."""
        if self.rows != self.shape[0]:
            self._file.close()
            raise RuntimeError(f"{self.path}: {self.rows} rows appended, {self.shape[0]} announced")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()


class JsonLinesWriter:
    """Append JSON records one per line and remember each line's byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self.offsets = [0]

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(line)
        self.offsets.append(self.offsets[-1] + len(line))

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        offsets = self.path.with_name(self.path.name.replace(".jsonl", ".offsets.npy"))
        np.save(offsets, np.asarray(self.offsets, dtype=np.int64))
