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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import DataError
from vsectl.io import json_text, sha256_file
from vsectl.retrieval.finite import AGAIN, check_finite, spread_rows

EMBEDDINGS_FORMAT = "vsectl-embeddings"
EMBEDDINGS_VERSION = 1
META = "meta.json"
SIDES = ("images", "captions")
HASH_BLOCK = 1 << 24  # 16 MiB per read while hashing
MAX_RECORD_BYTES = 1 << 20  # one line of images.jsonl / captions.jsonl; longer means a damaged offsets file
META_FIELDS = {"n_images": int, "n_captions": int, "embed_dim": int, "fingerprint": str, "images_sha256": str,
               "captions_sha256": str}


def _map(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing; the embeddings folder is incomplete: run `vsectl embed` again")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy file ({e}); run `vsectl embed` again") from None


_OPEN_LOCK = threading.Lock()


class JsonLines:
    """Random access to the lines of a JSONL file through its offsets array (nothing read until asked)."""

    def __init__(self, path: Path, offsets: Path, n: int | None = None) -> None:
        self.path = path
        self._fd: int | None = None  # opened at the first read, kept: positioned reads share it across threads
        self.offsets = _map(offsets)  # (n + 1,) int64
        size = path.stat().st_size if path.is_file() else -1
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or (n is not None and len(self.offsets) != n + 1) \
                or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != size:
            raise DataError(f"{offsets} does not index {path.name} ({len(self.offsets)} offsets ending at "
                            f"{int(self.offsets[-1]) if len(self.offsets) else '-'}, file of {size} bytes); {AGAIN}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records in {self.path}")
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if not 0 <= stop - start <= MAX_RECORD_BYTES:
            raise DataError(f"{self.path}: the offsets of record {i} are damaged ({start}..{stop}); {AGAIN}")
        raw = os.pread(self._open(), stop - start, start)
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            raise DataError(f"{self.path}: record {i} is not a JSON object; {AGAIN}")
        return record

    def _open(self) -> int:
        with _OPEN_LOCK:  # two first reads at once must not open (and leak) two descriptors
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._fd

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


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
        rec = self._lines("images")[int(i)]
        if not isinstance(rec.get("id"), str) or not all(isinstance(rec.get(k), (str, type(None)))
                                                         for k in ("path", "caption")):
            raise DataError(f"{self.path}/images.jsonl: record {i} lacks an id, or its path or caption is not text; "
                            f"{AGAIN}")
        return rec

    def caption(self, j: int) -> dict[str, Any]:
        """Caption j's record: {"text": str, "image": int}."""
        rec = self._lines("captions")[int(j)]
        image = rec.get("image")
        if not isinstance(rec.get("text"), str) or not isinstance(image, int) or not 0 <= image < self.n_images:
            raise DataError(f"{self.path}/captions.jsonl: record {j} lacks its text or a valid image index; {AGAIN}")
        return rec

    def image_file(self, i: int) -> str | io.BytesIO | None:
        """Image i to open: its file, or the bytes of its member for an image inside a tar shard; None when unknown
        or when the shard cannot be read."""
        rec = self.image(i)
        if rec.get("path"):
            return rec["path"]
        member = rec.get("tar")
        if not isinstance(member, dict):
            return None
        from vsectl.data.tar_shards import read_member

        try:
            return io.BytesIO(read_member(member["file"], int(member["offset"]), int(member["size"])))
        except (OSError, DataError, KeyError, TypeError, ValueError):
            return None

    def image_path(self, i: int) -> Path | None:
        """The file of image i as recorded at embed time (absolute), or None when unknown (a store without paths)."""
        path = self.image(i).get("path")
        return Path(path) if path else None

    def _lines(self, side: str) -> JsonLines:
        if side not in self._records:
            self._records[side] = JsonLines(self.path / f"{side}.jsonl", self.path / f"{side}.offsets.npy",
                                            self.size(side))
        return self._records[side]


def _check_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    for key, kind in META_FIELDS.items():
        value = meta.get(key)
        if key not in meta:
            raise DataError(f"{meta_path}: {key} is missing; {AGAIN}")
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise DataError(f"{meta_path}: {key} is {str(value)[:40]!r}, not a valid {kind.__name__}; {AGAIN}")
    if meta["embed_dim"] < 1:
        raise DataError(f"{meta_path}: embed_dim is {meta['embed_dim']}; {AGAIN}")
    for key in ("run", "checkpoint"):  # None: vectors made without a run (`write_vectors`)
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise DataError(f"{meta_path}: {key} is not text; {AGAIN}")
    if not isinstance(meta.get("source", {}), dict):
        raise DataError(f"{meta_path}: source is not an object; {AGAIN}")


def _check_size(path: Path, array: np.ndarray) -> None:
    """The file holds exactly the header and the rows it announces (a file cut short or grown is damaged)."""
    size = path.stat().st_size
    expected = int(getattr(array, "offset", 0)) + array.nbytes
    if size != expected:
        raise DataError(f"{path} is {size} bytes, its header announces {expected}; {AGAIN}")


def _verify(path: Path, meta: dict[str, Any], images: np.ndarray, captions: np.ndarray,
            cap2img: np.ndarray) -> None:
    """The whole check: both matrices hashed against meta.json and scanned for NaN/inf, every caption's image."""
    for side, matrix in (("images", images), ("captions", captions)):
        if sha256_file(path / f"{side}.npy") != meta[f"{side}_sha256"]:
            raise DataError(f"{path / side}.npy does not match the sha256 recorded in {META} (it changed since it "
                            f"was written); {AGAIN}")
        check_finite(f"{path / side}.npy", matrix)
    if len(cap2img) and not ((np.asarray(cap2img) >= 0) & (np.asarray(cap2img) < len(images))).all():
        raise DataError(f"{path}/cap2img.npy names images outside 0..{len(images) - 1}; {AGAIN}")


def open_embeddings(path: str | Path, verify: bool = False) -> Embeddings:
    """Open an embeddings folder written by `vsectl embed` (memory-mapped, nothing loaded).

    Every open checks meta.json's fields, the arrays' sizes against their headers and a sample of rows of each side
    for NaN/inf (cheap whatever the size); `verify` hashes both matrices against meta.json and checks every row.

    Raises:
        DataError: the folder is missing, incomplete, of another format, inconsistent or damaged.
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
    version = meta.get("version", -1)
    if not isinstance(version, int) or version > EMBEDDINGS_VERSION:
        raise DataError(f"{path} has embeddings version {str(version)[:20]}; this vsectl reads up to "
                        f"{EMBEDDINGS_VERSION}, upgrade it")
    _check_meta(meta_path, meta)
    images, captions, cap2img = _map(path / "images.npy"), _map(path / "captions.npy"), _map(path / "cap2img.npy")
    n, c = meta["n_images"], meta["n_captions"]
    if images.shape != (n, meta["embed_dim"]) or captions.shape != (c, meta["embed_dim"]) or cap2img.shape != (c,):
        raise DataError(f"{path}: array shapes {images.shape}, {captions.shape}, {cap2img.shape} do not match "
                        f"{META} ({n} images, {c} captions, {meta['embed_dim']}-d); run `vsectl embed` again")
    if images.dtype != np.float32 or captions.dtype != np.float32 or cap2img.dtype != np.int64:
        raise DataError(f"{path}: embeddings must be float32, found {images.dtype} / {captions.dtype}")
    for name, array in (("images", images), ("captions", captions), ("cap2img", cap2img)):
        _check_size(path / f"{name}.npy", array)
    check_finite(str(path / "images.npy"), images, spread_rows(n))
    check_finite(str(path / "captions.npy"), captions, spread_rows(c))
    if verify:
        _verify(path, meta, images, captions, cap2img)
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


def write_vectors(out: Path, images: Any, n_images: int, dim: int, *, captions: np.ndarray | None = None,
                  cap2img: np.ndarray | None = None, run_meta: dict[str, Any] | None = None,
                  ids: Any = None) -> Path:
    """An embeddings folder of given vectors (benchmarks, tests, vectors made elsewhere), streamed block by block.

    Args:
        out: the folder to create (it must not exist).
        images: an iterable of (b, dim) float32 blocks, n_images rows in all.
        n_images, dim: the image matrix's shape.
        captions, cap2img: optional (C, dim) caption vectors and their (C,) image indices.
        run_meta: run / checkpoint / fingerprint recorded in meta.json (a model's, for text queries).
        ids: optional callable row → id (default: the row number).
    """
    out.mkdir(parents=True)
    writer = NpyAppender(out / "images.npy", (n_images, dim))
    records = JsonLinesWriter(out / "images.jsonl")
    for block in images:
        for i in range(writer.rows, writer.rows + len(block)):
            records.write({"id": ids(i) if ids else str(i), "path": None, "caption": None})
        writer.append(block)
    images_sha = writer.close()
    records.close()
    captions = np.zeros((0, dim), np.float32) if captions is None else captions
    cap2img = np.zeros(0, np.int64) if cap2img is None else cap2img
    caps = NpyAppender(out / "captions.npy", (len(captions), dim))
    caps.append(captions)
    captions_sha = caps.close()
    index = NpyAppender(out / "cap2img.npy", (len(cap2img),), dtype=np.int64)
    index.append(cap2img)
    index.close()
    texts = JsonLinesWriter(out / "captions.jsonl")
    for j, i in enumerate(cap2img.tolist()):
        texts.write({"text": f"caption {j}", "image": int(i)})
    texts.close()
    meta = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "run": None, "checkpoint": None,
            "fingerprint": "vectors", **(run_meta or {}), "embed_dim": dim, "source": {"kind": "vectors"},
            "n_images": n_images, "n_captions": len(captions), "n_skipped": 0, "skipped": [],
            "images_sha256": images_sha, "captions_sha256": captions_sha, "image_root": None}
    (out / META).write_text(json_text(meta, indent=1) + "\n", encoding="utf-8")
    return out
