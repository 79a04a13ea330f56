"""The parts of an IVF index build: each part's rows assigned to lists and encoded, kept as one flat file; and the
merge of every part into the trained index, list by list, each list written once in its final layout.

A part is not a faiss index: it is the part's codes and ids sorted by list, so the merge reads the byte range of a
run of lists from each part with positioned reads (nothing mapped, nothing read twice) and hands each finished list
to faiss once. The merged index is the only large thing in memory; a fast-scan index's codes are packed into its
32-vector blocks here, list by list, so no flat copy of the whole index ever exists.

Part file (little-endian): the 8-byte magic, int64 nlist, code_size, rows; int64 sizes[nlist]; int64 ids[rows]
(global row numbers, grouped by list in list order, ascending within a list); uint8 codes[rows, code_size] in the
same order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import DataError
from vsectl.io import atomic_path
from vsectl.retrieval.index_memory import trim_heap

MAGIC = b"VSXIVF01"
HEADER = len(MAGIC) + 3 * 8
MERGE_CHUNK_BYTES = 64 << 20  # codes and ids read from all parts at once during the merge, at most (one list more)


def ivf_of(index: Any) -> Any:
    import faiss  # the callers checked it is installed (index_build.faiss_module)

    return faiss.downcast_index(faiss.extract_index_ivf(index))  # its own class, not the IndexIVF base


def is_fast_scan(ivf: Any) -> bool:
    """Whether the lists hold 4-bit codes packed in blocks (faiss' fast-scan layout) rather than one code per row."""
    import faiss

    return isinstance(ivf, faiss.IndexIVFFastScan)


def encode_rows(index: Any, reader: Any, a: int, b: int, on_block: Any = None) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """Rows [a, b) of `reader` assigned to the trained `index`'s lists and encoded, as faiss' `add` would store them.

    Returns:
        sizes (nlist,) int64, ids (b - a,) int64 grouped by list (ascending within one), codes (b - a, code_size)
        uint8 in the same order.
    """
    import faiss

    ivf = ivf_of(index)
    lists = np.empty(b - a, dtype=np.int64)
    codes = np.zeros((b - a, ivf.code_size), dtype=np.uint8)  # faiss ORs 4-bit codes into their bytes: zeroed
    for s, block in reader.blocks(a, b):
        i, n = s - a, len(block)
        lists[i : i + n] = ivf.quantizer.assign(block, 1).ravel()
        ivf.encode_vectors(n, faiss.swig_ptr(block), faiss.swig_ptr(lists[i : i + n]),
                           faiss.swig_ptr(codes[i : i + n]), False)
        if on_block is not None:
            on_block(s + n - a)
    if len(lists) and (lists.min() < 0 or lists.max() >= ivf.nlist):
        raise DataError("the coarse quantizer left some rows without a list (non-finite vectors?); embed again")
    order = np.argsort(lists, kind="stable")
    return np.bincount(lists, minlength=ivf.nlist).astype(np.int64), order + a, codes[order]


def write_part(path: Path, sizes: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> None:
    """One part file, written whole or not at all."""
    header = MAGIC + np.array([len(sizes), codes.shape[1], len(ids)], dtype="<i8").tobytes()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in (header, sizes.astype("<i8"), ids.astype("<i8"), np.ascontiguousarray(codes)):
            f.write(memoryview(piece).cast("B") if isinstance(piece, np.ndarray) else piece)


class Part:
    """An open part file: the ids and codes of a run of lists by positioned reads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            head = os.pread(self.fd, HEADER, 0)
            if len(head) != HEADER or head[: len(MAGIC)] != MAGIC:
                raise DataError(f"{self.path} is not an index part written by vsectl; remove it and build again")
            self.nlist, self.code_size, self.rows = (int(v) for v in np.frombuffer(head[len(MAGIC) :], dtype="<i8"))
            self.sizes = self._read(HEADER, self.nlist * 8, "<i8")
            expected = HEADER + self.nlist * 8 + self.rows * (8 + self.code_size)
            if int(self.sizes.sum()) != self.rows or os.fstat(self.fd).st_size != expected:
                raise DataError(f"{self.path} is cut short or damaged; remove it and build again")
        except BaseException:
            os.close(self.fd)
            raise
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self._ids_at = HEADER + self.nlist * 8
        self._codes_at = self._ids_at + self.rows * 8

    def _read(self, offset: int, size: int, dtype: str) -> np.ndarray:
        data = os.pread(self.fd, size, offset) if size else b""
        if len(data) != size:
            raise DataError(f"{self.path} is cut short; remove it and build again")
        return np.frombuffer(data, dtype=dtype)

    def lists(self, l0: int, l1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lists [l0, l1): their starts relative to the run (l1 - l0 + 1,), ids and codes (rows, code_size)."""
        a, b = int(self.starts[l0]), int(self.starts[l1])
        ids = self._read(self._ids_at + 8 * a, 8 * (b - a), "<i8")
        codes = self._read(self._codes_at + self.code_size * a, self.code_size * (b - a), np.uint8)
        return self.starts[l0 : l1 + 1] - a, ids, codes.reshape(b - a, self.code_size)

    def close(self) -> None:
        os.close(self.fd)


def merge(index: Any, files: list[Path], on_lists: Any = None) -> Any:
    """Every part's lists into the trained, empty `index` (in part order, so a list's ids stay ascending); returns
    it. Each list is handed to faiss once at its final length (packed into blocks for a fast-scan index), so the
    peak is the merged lists plus one run of lists read from the parts."""
    import faiss

    ivf = ivf_of(index)
    parts = [Part(f) for f in files]
    try:
        for part in parts:
            if (part.nlist, part.code_size) != (ivf.nlist, ivf.code_size):
                raise DataError(f"{part.path} has {part.nlist} lists of {part.code_size}-byte codes, the index "
                                f"{ivf.nlist} of {ivf.code_size}; remove the unfinished build and start again")
        sizes = np.sum([p.sizes for p in parts], axis=0) if parts else np.zeros(ivf.nlist, dtype=np.int64)
        packer = ivf.get_CodePacker() if is_fast_scan(ivf) else None
        l0 = 0
        while l0 < ivf.nlist:
            ends = np.cumsum(sizes[l0:]) * (ivf.code_size + 8)
            l1 = l0 + max(1, int(np.searchsorted(ends, MERGE_CHUNK_BYTES, side="right")))
            runs = [p.lists(l0, l1) for p in parts]
            for j, lst in enumerate(range(l0, l1)):
                if sizes[lst]:
                    ids = np.concatenate([ids[s[j] : s[j + 1]] for s, ids, _ in runs])
                    codes = np.concatenate([codes[s[j] : s[j + 1]] for s, _, codes in runs])
                    if packer is not None:
                        codes = pack_blocks(packer, codes)
                    # a fresh fast-scan list takes whole blocks as given: our zero padding, not uninitialised bytes
                    ivf.invlists.add_entries(lst, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            del runs
            trim_heap()  # the run's temporaries lay between the lists just allocated: their pages go back
            if on_lists is not None:
                on_lists(l1)
            l0 = l1
    finally:
        for part in parts:
            part.close()
    ivf.ntotal = index.ntotal = int(sizes.sum())
    return index


def pack_blocks(packer: Any, codes: np.ndarray) -> np.ndarray:
    """Flat codes (n, code_size) → the fast-scan layout: blocks of `packer.nvec` codes, the last padded with zeros."""
    import faiss

    per = int(packer.nvec)
    blocks = -(-len(codes) // per)
    flat = np.zeros((blocks * per, codes.shape[1]), dtype=np.uint8)
    flat[: len(codes)] = codes
    out = np.zeros(blocks * int(packer.block_size), dtype=np.uint8)
    for j in range(blocks):
        packer.pack_all(faiss.swig_ptr(flat[j * per :]), faiss.swig_ptr(out[j * int(packer.block_size) :]))
    return out
