"""Indexes beside an embeddings folder: `flat` (exact, nothing extra) and faiss kinds chosen under a memory budget.

An index is a folder `EMB/index-<kind>-<side>/` holding `index.json` (kind, side, the faiss layout, the tuned search
parameters and the identity of the embeddings it was built from), the index card `card.json` (what it costs and how
close to exact it comes, `vsectl.retrieval.index_card`) and, for faiss kinds, `index.faiss`. Opening an index whose
embeddings changed since (another embed into the same folder) is refused. faiss is imported only when an approximate
kind is built or opened; there is no fallback from one kind to another. The kinds and how one is chosen are in
`vsectl.retrieval.index_plan`; the build (streamed, resumable, across torchrun processes) in `index_build`.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.folders import check_target, publish, recover
from vsectl.io import sha256_file
from vsectl.locks import folder_lock
from vsectl.retrieval import index_build
from vsectl.retrieval.embeddings import META, SIDES, Embeddings, open_embeddings
from vsectl.retrieval.index_build import faiss_module
from vsectl.retrieval.index_card import TARGET_RECALL, measure
from vsectl.retrieval.index_files import (
    CARD,
    FAISS_FILE,
    INDEX_FORMAT,
    INDEX_META,
    INDEX_VERSION,
    earlier_index,
    read_card,
    read_meta,
)
from vsectl.retrieval.index_memory import NoMemory, PhaseMemory
from vsectl.retrieval.index_plan import KIND_CHOICES, IndexPlan, plan_index
from vsectl.retrieval.rows import RowReader

log = logging.getLogger(__name__)

RECALL_FLOOR = 0.9  # an index is served in place of exact search only if its card's recall@10 reaches this
NPROBE_LADDER_TOP = 1 << 16
EF_LADDER = [16, 32, 64, 128, 256, 512, 1024]
INDEX_HINT = "move them out of the index folder, or delete it, then build again"


def write_json(path: Path, obj: Any) -> None:
    """A plain write (the umask applies) inside a temporary folder that is renamed into place when complete."""
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


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
        kind: one of `INDEX_KINDS`.
        side: "images" or "captions".
        embeddings: the embeddings it was built from (records, the vectors for `flat` and for re-scoring).
        params: the kind's parameters (nlist, nprobe, pq_bytes, refine / M, ef_search, ...).
        card: the index card (see `vsectl.retrieval.index_card`), {} for an index built before cards existed.
    """

    path: Path
    kind: str
    side: str
    embeddings: Embeddings
    params: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)
    _faiss_index: Any = field(default=None, repr=False)
    _rows: Any = field(default=None, repr=False)  # the side's rows by positioned reads, for re-scoring

    @property
    def exact(self) -> bool:
        """Whether a search scans every vector (flat): exact hits, and one pass over the file answers a whole batch
        of queries, so queuing concurrent queries together pays. The faiss kinds visit other lists or graph nodes for
        each query, so a batch saves them little (ivf-pq at 10M: 3.4 against 3.5 ms a query, batches of 4 against 1)."""
        return self.kind == "flat"

    def describe(self) -> dict[str, Any]:
        """What answers a search, for the page and --json: kind, folder, recall@10 from the card."""
        return {"kind": self.kind, "path": str(self.path), "recall@10": self.card.get("recall", {}).get("@10")}

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, E) float32 queries → scores (Q, k) float32 and rows (Q, k) int64, best first."""
        scores, rows = self.search_raw(queries, k)
        if (rows < 0).any():  # faiss pads with -1 when it finds fewer than asked (too few lists probed)
            raise DataError(f"the {self.kind} index found fewer than {k} neighbours; raise nprobe / ef_search or k")
        return scores, rows

    def search_raw(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As `search_vectors`, but a query with fewer than k neighbours found keeps its -1 rows (for measuring)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        matrix = self.embeddings.side(self.side)
        if self.exact:
            from vsectl.retrieval.exact import topk

            return topk(matrix, queries, k)
        refine = int(self.params.get("refine", 0))
        scores, rows = self._faiss_index.search(queries, min(k * refine, matrix.shape[0]) if refine else k)
        if refine:
            if self._rows is None:
                self._rows = RowReader(self.embeddings.path / f"{self.side}.npy")
            return _rescore(self._rows, queries, rows, k)
        return scores.astype(np.float32), rows.astype(np.int64)


def _rescore(reader: Any, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidates by their exact inner product, read from the embeddings file (positioned
    reads, not the memory map: a server's memory does not grow with the rows it has re-scored).

    Fewer than k candidates (a query whose probed lists were short) leave -1 rows with score -inf at the end.
    """
    from vsectl.retrieval.exact import sort_hits

    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for q, rows in enumerate(candidates):
        rows = np.unique(rows[rows >= 0])                         # sorted: the file is read front to back
        scores = reader.gather(rows) @ queries[q]                 # (c,) exact scores of the candidates
        top = np.argsort(-scores, kind="stable")[:k]
        s, i = sort_hits(scores[top][None], rows[top][None])
        out_s[q, : len(top)], out_i[q, : len(top)] = s[0], i[0]
    return out_s, out_i


def _ladder(kind: str, params: dict[str, Any]) -> list[int]:
    if kind == "hnsw":
        return EF_LADDER
    nlist = int(params["nlist"])
    steps = {v for p in range(NPROBE_LADDER_TOP.bit_length()) for v in (1 << p, 3 << max(0, p - 1)) if v <= nlist}
    return sorted(steps | {nlist})  # powers of two and the halfway steps between them (…, 64, 96, 128, 192, …)


def _card(emb: Embeddings, side: str, plan: IndexPlan, faiss_index: Any, tuned: bool,
          max_query_ms: float | None, target: float) -> dict[str, Any]:
    params = dict(plan.params)
    opened = Index(path=Path(), kind=plan.kind, side=side, embeddings=emb, params=params, _faiss_index=faiss_index)
    key = "ef_search" if plan.kind == "hnsw" else "nprobe"

    def set_param(value: int) -> None:
        params[key] = value
        index_build.set_search_params(faiss_index, plan.kind, params)

    if faiss_index is not None:
        index_build.set_search_params(faiss_index, plan.kind, params)
    tune_with = (set_param, _ladder(plan.kind, params)) if faiss_index is not None and tuned else None
    card = measure(emb, side, opened.search_raw, tune_with=tune_with, max_query_ms=max_query_ms, target=target)
    return {**card, "params": params}


def build_index(
    embeddings: str | Path | Embeddings,
    kind: str = "flat",
    side: str = "images",
    *,
    max_memory: str | int | None = None,
    max_query_ms: float | None = None,
    recall: float = TARGET_RECALL,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_bytes: int | None = None,
    m: int | None = None,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    seed: int = 0,
    progress: Any = None,
) -> Path | None:
    """Build an index over one side of an embeddings folder, written atomically to `index_dir(emb, kind, side)`.

    Under torchrun every rank adds its share of the vectors to the shared trained quantizer; rank 0 merges, measures
    the card and publishes (other ranks return None). A killed build resumes from its finished parts.

    Args:
        embeddings: the embeddings folder (or an opened one).
        kind: "auto" (chosen under `max_memory`, see `vsectl.retrieval.index_plan`) or one of `INDEX_KINDS`.
        side: "images" or "captions".
        max_memory: budget for the opened index, e.g. "4GB" (None: no limit).
        max_query_ms: a single query may take at most this long; the tuned nprobe / ef_search respects it.
        recall: the recall@10 the tuning aims for: the smallest nprobe / ef_search reaching it on held-out queries.
        nlist, nprobe, pq_bytes: ivf lists, lists probed per query (given: not tuned), ivf-pq code bytes.
        m, ef_construction, ef_search: hnsw graph degree and beam widths (ef_search given: not tuned).
        seed: picks the training sample.
        progress: progress reporting.

    Returns:
        The index folder (None on torchrun ranks other than 0).
    """
    from vsectl.runtime import NullProgress, distributed_from_env

    progress = progress or NullProgress()
    if kind not in KIND_CHOICES:
        raise ConfigError(f"unknown index kind {kind!r}; use {', '.join(KIND_CHOICES)}")
    if side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; use images or captions")
    if max_query_ms is not None and max_query_ms <= 0:
        raise ConfigError(f"--max-query-ms must be positive, got {max_query_ms}")
    if not 0 < recall <= 1:
        raise ConfigError(f"--recall is a recall@10 between 0 and 1, got {recall}")
    if recall < RECALL_FLOOR:
        log.warning("--recall %s is under %s: serve and search use an index only from recall@10 %s on",
                    recall, RECALL_FLOOR, RECALL_FLOOR)
    emb = embeddings if isinstance(embeddings, Embeddings) else open_embeddings(embeddings)
    n = emb.size(side)
    if n == 0:
        raise ConfigError(f"{emb.path} holds no {side} to index")
    overrides = {k: v for k, v in (("nlist", nlist), ("nprobe", nprobe), ("pq_bytes", pq_bytes), ("m", m),
                                   ("ef_construction", ef_construction), ("ef_search", ef_search)) if v is not None}
    plan = plan_index(n, emb.dim, kind, max_memory, **overrides)
    log.info("index plan: %s", plan.reason)
    if plan.kind != "flat":
        faiss_module()  # fail before any work when the extra is missing
    try:
        dist = distributed_from_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = index_dir(emb.path, plan.kind, side)
    partial = out.with_name(f".{out.name}.partial")
    build = (emb, side, plan, out, partial, dist.rank, dist.world_size, seed, progress)
    tuning = {"tuned": (nprobe if plan.kind != "hnsw" else ef_search) is None, "max_query_ms": max_query_ms,
              "target": recall}
    if dist.rank != 0:  # rank 0 holds the folder's lock for the whole job; the others add their parts
        return _build(*build, tuning=tuning)
    with folder_lock(out):
        recover(out, earlier_index)
        check_target(out, INDEX_HINT, earlier_index)  # refused before any work, not after the build
        return _build(*build, tuning=tuning)


def _build(emb: Embeddings, side: str, plan: IndexPlan, out: Path, partial: Path, rank: int, world: int, seed: int,
           progress: Any, *, tuning: dict[str, Any]) -> Path | None:
    try:
        return _build_parts(emb, side, plan, out, partial, rank, world, seed, progress, tuning=tuning)
    except BaseException:
        if rank == 0 and partial.is_dir() and not any(partial.glob(f"part-*.{index_build.PART_SUFFIX}")):
            shutil.rmtree(partial, ignore_errors=True)  # nothing a rerun could resume from
        raise


def _build_parts(emb: Embeddings, side: str, plan: IndexPlan, out: Path, partial: Path, rank: int, world: int,
                 seed: int, progress: Any, *, tuning: dict[str, Any]) -> Path | None:
    start, cpu0 = time.perf_counter(), time.process_time()
    index_build.prepare(partial, plan, _identity(emb, side), rank)
    faiss_index = None
    memory = PhaseMemory() if rank == 0 else NoMemory()
    try:
        if plan.kind != "flat":
            reader = RowReader(emb.path / f"{side}.npy")
            faiss_index = index_build.build_faiss(plan, reader, partial, rank=rank, world=world, seed=seed,
                                                  progress=progress, memory=memory)
        if rank != 0:
            return None
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
        with memory.phase("measure"):
            card = _card(emb, side, plan, faiss_index, **tuning)
        params = card.pop("params")
        if faiss_index is not None:
            with memory.phase("write"):
                index_build.write_index(faiss_index, partial / FAISS_FILE)
    finally:
        memory.stop()
    index_build.cleanup(partial)
    card = {"kind": plan.kind, "factory": plan.factory, "params": params, "side": side, "vectors": emb.size(side),
            "dim": emb.dim, "reason": plan.reason, "bytes_on_disk": index_build.file_bytes(partial),
            "ram_bytes_estimate": plan.ram_bytes, "build_seconds": round(seconds, 2),
            "build_cpu_seconds": round(cpu, 2), "build_peak_rss_bytes": _peak_rss(),
            "build_rss_by_phase": memory.summary(), "processes": world, **card}
    write_json(partial / CARD, card)
    write_json(partial / INDEX_META, {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": plan.kind,
                                      "side": side, "factory": plan.factory, "params": params,
                                      "embeddings": _identity(emb, side), "build_seconds": round(seconds, 3)})
    publish(partial, out, earlier_index)  # the old index is replaced only if vsectl wrote all of it
    log.info("%s index over %d %s built in %.1f s (recall@10 %.3f): %s", plan.kind, emb.size(side), side, seconds,
             card["recall"]["@10"], out)
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def open_index(path: str | Path, embeddings: Embeddings | None = None, mmap: bool = False,
               verify: bool = False) -> Index:
    """Open an index folder made by `build_index`, checking that its embeddings are the ones it was built from.

    Args:
        path: the index folder (EMB/index-<kind>-<side>).
        embeddings: the embeddings, if already open (default: the folder above the index).
        mmap: map the inverted lists of an ivf kind from the file instead of reading them into memory.
        verify: opening the embeddings, hash them and check every row (see `open_embeddings`).

    Raises:
        DataError: not an index, or its embeddings changed since it was built (rebuild it).
        ConfigError: an approximate index and faiss is missing.
    """
    path = Path(path)
    meta = read_meta(path)
    emb = embeddings or open_embeddings(path.parent, verify=verify)
    side = meta["side"]
    rebuild = f"rebuild it: vsectl index {emb.path} --kind {meta['kind']} --side {side}"
    if not _unchanged(emb, side, meta["embeddings"]):
        raise DataError(f"index {path} was built from other embeddings than those now in {emb.path} (they changed "
                        f"since); {rebuild}")
    faiss_index = None
    if meta["kind"] != "flat":
        faiss_index = index_build.read_index(path / FAISS_FILE, meta["kind"], rebuild, mmap=mmap)
        if faiss_index.ntotal != emb.size(side) or faiss_index.d != emb.dim:
            raise DataError(f"index {path} holds {faiss_index.ntotal} vectors of {faiss_index.d} dimensions, the "
                            f"embeddings {emb.size(side)} of {emb.dim}; {rebuild}")
        index_build.set_search_params(faiss_index, meta["kind"], meta["params"])
    return Index(path=path, kind=meta["kind"], side=side, embeddings=emb, params=meta["params"],
                 card=read_card(path), _faiss_index=faiss_index)


def list_indexes(emb_path: str | Path, side: str | None = None) -> list[Path]:
    """The index folders inside an embeddings folder (of one side, or all), sorted by name."""
    folder = Path(emb_path)
    found = sorted(p for p in folder.glob("index-*") if (p / INDEX_META).is_file())
    return [p for p in found if side is None or p.name.endswith(f"-{side}")]


def best_index(emb: Embeddings, side: str) -> Index | None:
    """The index to serve `side` from: the fastest single query among those with recall@10 ≥ RECALL_FLOOR.

    Indexes that cannot be opened (embeddings changed, faiss missing) are skipped with a warning; None means exact.
    """
    usable = []
    for path in list_indexes(emb.path, side):
        try:
            index = open_index(path, emb)
        except (DataError, ConfigError) as e:
            log.warning("not using index %s: %s", path.name, e)
            continue
        card = index.card
        if card.get("recall", {}).get("@10", 0.0) >= RECALL_FLOOR:
            usable.append((card["query_ms"]["single"]["median"], path.name, index))
    return min(usable, key=lambda t: t[:2])[2] if usable else None


def open_target(path: str | Path, verify: bool = False) -> Embeddings | Index:
    """An embeddings folder (→ `Embeddings`, exact search) or an index folder (→ `Index`), whichever `path` is."""
    path = Path(path)
    if (path / INDEX_META).is_file():
        return open_index(path, verify=verify)
    if (path / META).is_file() or not path.exists():
        return open_embeddings(path, verify=verify)
    raise DataError(f"{path} is neither an embeddings folder (meta.json) nor an index folder ({INDEX_META})")
