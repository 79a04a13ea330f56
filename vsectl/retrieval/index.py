"""Indexes beside an embeddings folder: `flat` (exact, nothing extra) and faiss's `ivf` / `hnsw` (optional extra).

An index is a folder `EMB/index-<kind>-<side>/` holding `index.json` (kind, side, parameters and the identity of
the embeddings it was built from) and, for faiss kinds, `index.faiss`. Opening an index whose embeddings changed
since (another embed into the same folder) is refused. faiss is imported only when an approximate kind is built or
opened; there is no fallback from one kind to another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.io import sha256_file
from vsectl.retrieval.embeddings import META, SIDES, Embeddings, open_embeddings

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FORMAT = "vsectl-index"
INDEX_VERSION = 1
INDEX_META = "index.json"
FAISS_FILE = "index.faiss"
ADD_BLOCK = 65536  # vectors handed to faiss per add() call: bounds the copy out of the memmap
IVF_LISTS_PER_SQRT = 4  # nlist = 4·sqrt(N), the usual rule of thumb for IVF-Flat
IVF_TRAIN_PER_LIST = 64  # k-means training sample: 64 vectors per list (faiss warns below 39)
IVF_NPROBE_SHARE = 1 / 16  # lists probed per query by default (recall@10 ≥ 0.95 measured in bench_search.py)
IVF_MIN_NPROBE = 8  # small collections have few lists: probe at least this many
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def write_json(path: Path, obj: Any) -> None:
    """A plain write (the umask applies) inside a temporary folder that is renamed into place when complete."""
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def faiss_module() -> Any:
    """faiss, or a one-line error naming the extra that provides it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("approximate indexes (ivf, hnsw) need faiss: pip install 'vsectl[faiss]' (faiss-cpu); "
                          "or use --kind flat (exact, nothing extra)") from None
    return faiss


def index_dir(emb_path: str | Path, kind: str, side: str = "images") -> Path:
    """Where `build_index` puts an index of `kind` over `side`: EMB/index-<kind>-<side>."""
    return Path(emb_path) / f"index-{kind}-{side}"


def _identity(emb: Embeddings, side: str) -> dict[str, Any]:
    stat = (emb.path / f"{side}.npy").stat()
    return {"sha256": emb.meta[f"{side}_sha256"], "rows": emb.size(side), "dim": emb.dim, "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "fingerprint": emb.fingerprint}


def _unchanged(emb: Embeddings, side: str, built: dict[str, Any]) -> bool:
    """Whether the embeddings are still those an index was built from.

    A re-embed changes meta.json; a file replaced by hand changes its size or mtime, and is then hashed again (a copy
    that keeps the content, e.g. `cp -r`, passes).
    """
    now = _identity(emb, side)
    same_meta = all(now[k] == built.get(k) for k in ("sha256", "rows", "dim", "fingerprint"))
    if not same_meta or now["bytes"] != built.get("bytes"):
        return False
    if now["mtime_ns"] == built.get("mtime_ns"):
        return True
    log.debug("%s changed on disk since the index was built: hashing it again", emb.path / f"{side}.npy")
    return sha256_file(emb.path / f"{side}.npy") == built["sha256"]


@dataclass
class Index:
    """An opened index over one side of an embeddings folder.

    Attributes:
        path: the index folder.
        kind: "flat", "ivf" or "hnsw".
        side: "images" or "captions".
        embeddings: the embeddings it was built from (records, and the vectors for `flat`).
        params: the kind's parameters (nlist, nprobe / M, ef_search, ...).
    """

    path: Path
    kind: str
    side: str
    embeddings: Embeddings
    params: dict[str, Any]
    _faiss_index: Any = field(default=None, repr=False)

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, E) float32 queries → scores (Q, k) float32 and rows (Q, k) int64, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.kind == "flat":
            from vsectl.retrieval.exact import topk

            return topk(self.embeddings.side(self.side), queries, k)
        scores, rows = self._faiss_index.search(queries, k)
        if (rows < 0).any():  # faiss pads with -1 when it finds fewer than k (too few lists probed)
            raise DataError(f"the {self.kind} index found fewer than {k} neighbours; raise nprobe / ef_search or k")
        return scores.astype(np.float32), rows.astype(np.int64)


def _ivf_params(n: int, nlist: int | None, nprobe: int | None) -> dict[str, int]:
    nlist = nlist or max(1, min(n // IVF_TRAIN_PER_LIST, round(IVF_LISTS_PER_SQRT * math.sqrt(n))))
    nprobe = nprobe or min(nlist, max(IVF_MIN_NPROBE, round(nlist * IVF_NPROBE_SHARE)))
    if not 1 <= nlist <= n:
        raise ConfigError(f"nlist must be in [1, {n}] for {n} vectors, got {nlist}")
    if not 1 <= nprobe <= nlist:
        raise ConfigError(f"nprobe must be in [1, nlist = {nlist}], got {nprobe}")
    return {"nlist": nlist, "nprobe": nprobe}


def _build_faiss(matrix: np.ndarray, kind: str, params: dict[str, Any], progress: Any, seed: int) -> Any:
    faiss = faiss_module()
    n, dim = matrix.shape
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, params["nlist"] * IVF_TRAIN_PER_LIST)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        index.train(np.ascontiguousarray(matrix[rows], dtype=np.float32))  # (n_train, E): a sample, not the whole
        index.nprobe = params["nprobe"]
    else:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    blocks = range(0, n, ADD_BLOCK)
    for a in progress.track(blocks, total=len(blocks), description=f"index {kind}"):
        index.add(np.ascontiguousarray(matrix[a : a + ADD_BLOCK], dtype=np.float32))
        progress.update(vectors=min(a + ADD_BLOCK, n))
    return index


def build_index(
    embeddings: str | Path | Embeddings,
    kind: str = "flat",
    side: str = "images",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
    seed: int = 0,
    progress: Any = None,
) -> Path:
    """Build an index over one side of an embeddings folder, written atomically to `index_dir(emb, kind, side)`.

    Args:
        embeddings: the embeddings folder (or an opened one).
        kind: "flat" (exact top-k over the memmap), "ivf" (faiss IVF-Flat, inner product) or "hnsw" (faiss HNSW-Flat).
        side: "images" or "captions".
        nlist, nprobe: ivf lists (default 4·sqrt(N)) and lists probed per query (default nlist / 16, at least 8).
        m, ef_construction, ef_search: hnsw graph degree and beam widths.
        seed: picks the ivf training sample.
        progress: progress reporting.

    Returns:
        The index folder.
    """
    from vsectl.runtime import NullProgress

    progress = progress or NullProgress()
    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; use {', '.join(INDEX_KINDS)}")
    if side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; use images or captions")
    emb = embeddings if isinstance(embeddings, Embeddings) else open_embeddings(embeddings)
    n = emb.size(side)
    if n == 0:
        raise ConfigError(f"{emb.path} holds no {side} to index")
    if kind == "ivf":
        params: dict[str, Any] = _ivf_params(n, nlist, nprobe)
    elif kind == "hnsw":
        for name, value in (("M", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        params = {"M": m, "ef_construction": ef_construction, "ef_search": ef_search}
    else:
        params = {}
    if kind != "flat":
        faiss_module()  # fail before any work when the extra is missing
    out = index_dir(emb.path, kind, side)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        if kind != "flat":
            faiss = faiss_module()
            index = _build_faiss(emb.side(side), kind, params, progress, seed)
            faiss.write_index(index, str(tmp / FAISS_FILE))
        seconds = time.perf_counter() - start
        write_json(tmp / INDEX_META, {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": kind,
                                             "side": side, "params": params, "embeddings": _identity(emb, side),
                                             "build_seconds": round(seconds, 3)})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s index over %d %s built in %.1f s: %s", kind, n, side, seconds, out)
    return out


def open_index(path: str | Path, embeddings: Embeddings | None = None) -> Index:
    """Open an index folder made by `build_index`, checking that its embeddings are the ones it was built from.

    Args:
        path: the index folder (EMB/index-<kind>-<side>).
        embeddings: the embeddings, if already open (default: the folder above the index).

    Raises:
        DataError: not an index, or its embeddings changed since it was built (rebuild it).
        ConfigError: an approximate index and faiss is missing.
    """
    path = Path(path)
    meta_path = path / INDEX_META
    if not meta_path.is_file():
        raise DataError(f"{path} is not an index folder (no {INDEX_META}); make one with `vsectl index EMB`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path} is not valid JSON ({e}); rebuild the index") from None
    if meta.get("format") != INDEX_FORMAT or meta.get("kind") not in INDEX_KINDS:
        raise DataError(f"{path} is not a vsectl index ({INDEX_META} format/kind unknown)")
    emb = embeddings or open_embeddings(path.parent)
    side = meta["side"]
    if not _unchanged(emb, side, meta["embeddings"]):
        raise DataError(f"index {path} was built from other embeddings than those now in {emb.path} (they changed "
                        f"since); rebuild it: vsectl index {emb.path} --kind {meta['kind']} --side {side}")
    faiss_index = None
    if meta["kind"] != "flat":
        faiss = faiss_module()
        faiss_index = faiss.read_index(str(path / FAISS_FILE))
        if faiss_index.ntotal != emb.size(side):
            raise DataError(f"index {path} holds {faiss_index.ntotal} vectors, the embeddings {emb.size(side)}; "
                            "rebuild it")
        if meta["kind"] == "ivf":
            faiss_index.nprobe = int(meta["params"]["nprobe"])
        else:
            faiss_index.hnsw.efSearch = int(meta["params"]["ef_search"])
    return Index(path=path, kind=meta["kind"], side=side, embeddings=emb, params=meta["params"],
                 _faiss_index=faiss_index)


def open_target(path: str | Path) -> Embeddings | Index:
    """An embeddings folder (→ `Embeddings`, exact search) or an index folder (→ `Index`), whichever `path` is."""
    path = Path(path)
    if (path / INDEX_META).is_file():
        return open_index(path)
    if (path / META).is_file() or not path.exists():
        return open_embeddings(path)
    raise DataError(f"{path} is neither an embeddings folder (meta.json) nor an index folder ({INDEX_META})")
