"""Building a faiss index in bounded memory, resumably, across processes: train on a sample, add parts, merge.

The vectors are read from the embeddings' .npy file in blocks with plain reads (never mapped, never whole), so the
build's memory is the index itself plus one block. The rows are cut into parts of `PART_ROWS`; torchrun rank r
encodes the parts p with p % WORLD_SIZE == r with the trained (empty) index and writes each one as it finishes (its
codes and ids by list, `vsectl.retrieval.index_parts`), so a killed build loses at most one part per process. Rank 0
trains first (the others wait for its file), and merges the parts list by list once they all exist; ids are rows.

Work in progress lives in one folder (`partial`) that the caller renames into place when the index is complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.io import atomic_path, atomic_write_json
from vsectl.retrieval import index_parts
from vsectl.retrieval.index_memory import NoMemory
from vsectl.retrieval.index_plan import HNSW_MAX_EF, HNSW_MAX_M, IndexPlan
from vsectl.retrieval.rows import BLOCK_ROWS, RowReader

log = logging.getLogger(__name__)

ADD_BLOCK = BLOCK_ROWS  # rows read and handed to faiss per add() call (128 MiB at 512-d fp32)
PART_ROWS = 1 << 20  # rows per resumable part
PART_SUFFIX = "lists"  # a part's codes and ids by list (vsectl.retrieval.index_parts), not a faiss file
TRAINED = "trained.faiss"
PLAN = "plan.json"
POLL_SECONDS = 1.0
QUANTIZER_EF = 64  # beam width of an HNSW coarse quantizer's search (at least 2·nprobe)
_IVF_BOUNDS = {"nlist": (1, 1 << 40), "nprobe": (1, 1 << 40)}
PARAM_BOUNDS = {"flat": {}, "ivf": _IVF_BOUNDS, "ivf-sq8": _IVF_BOUNDS,
                "ivf-pq": {**_IVF_BOUNDS, "pq_bytes": (1, 4096)},
                "hnsw": {"M": (2, HNSW_MAX_M), "ef_construction": (1, HNSW_MAX_EF), "ef_search": (1, HNSW_MAX_EF)}}


def faiss_module() -> Any:
    """faiss, or a one-line error naming the extra that provides it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("approximate indexes (ivf, ivf-sq8, ivf-pq, hnsw) need faiss: pip install 'vsectl[faiss]' "
                          "(faiss-cpu); or use --kind flat (exact, nothing extra)") from None
    return faiss


def sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct rows of n, sorted (a training or query sample)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


def read_rows(reader: RowReader, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows, gathered block by block (runs of nearby rows share one read)."""
    out = np.empty((len(rows), reader.dim), dtype=np.float32)
    i = 0
    while i < len(rows):
        j = int(np.searchsorted(rows, rows[i] + ADD_BLOCK))
        block = reader.read(int(rows[i]), int(rows[j - 1]) + 1)
        out[i:j] = block[rows[i:j] - rows[i]]
        i = j
    return out


def new_index(plan: IndexPlan, dim: int) -> Any:
    """An empty faiss index of the plan's layout, inner-product metric."""
    faiss = faiss_module()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = plan.params["ef_construction"]
    return index


def train(plan: IndexPlan, reader: RowReader, seed: int) -> Any:
    """The trained, empty index: k-means (and the codec) fitted on a sample of `plan.n_train` rows."""
    index = new_index(plan, reader.dim)
    if plan.n_train:
        start = time.perf_counter()
        sample = read_rows(reader, sample_rows(reader.n, plan.n_train, seed))  # (n_train, E)
        index.train(sample)
        log.info("trained %s on %d vectors in %.1f s", plan.factory, len(sample), time.perf_counter() - start)
    return index


def _part_file(partial: Path, p: int) -> Path:
    return partial / f"part-{p:05d}.{PART_SUFFIX}"


_STRERROR = {os.strerror(code): code for code in errno.errorcode}


def _faiss_os_error(err: RuntimeError, path: Path) -> OSError | None:
    """faiss reports a failed write as a RuntimeError ending in the C library's message: the OSError it was."""
    found = re.search(r"\(([^()]*)\)\s*$", str(err))
    code = _STRERROR.get(found.group(1)) if found else None
    return OSError(code, os.strerror(code), str(path)) if code else None


def write_index(index: Any, path: Path) -> None:
    """faiss.write_index through a temporary file renamed into place (a killed write leaves no part behind); a full
    disk or a file-size limit is raised as the OSError it is (one line in the CLI)."""
    faiss = faiss_module()
    with atomic_path(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as err:
            raise (_faiss_os_error(err, path) or err) from None


def read_index(path: Path, kind: str, rebuild: str, mmap: bool = False) -> Any:
    """The faiss index of an index folder of `kind`; a missing, cut or foreign file is one line (DataError)."""
    faiss = faiss_module()
    if not path.is_file():
        raise DataError(f"{path} is missing; {rebuild}")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap and kind != "hnsw" else 0)
    except RuntimeError as err:
        said = str(err).split("failed:", 1)[-1].strip().splitlines()[0][:160] if str(err) else ""
        reason = "it is cut short or not a faiss file" if "read error" in said or not said else said
        raise DataError(f"{path} is not a readable faiss index ({reason}); {rebuild}") from None
    try:
        ok = hasattr(index, "hnsw") if kind == "hnsw" else faiss.extract_index_ivf(index) is not None
    except RuntimeError:  # extract_index_ivf: not an IVF index
        ok = False
    if not ok:
        raise DataError(f"{path} is a {type(index).__name__}, not the {kind} index its index.json describes; {rebuild}")
    return index


def _wait(files: list[Path], what: str) -> None:
    last = time.monotonic()
    while missing := [p for p in files if not p.is_file()]:
        if time.monotonic() - last > 60:
            log.info("waiting for %d %s from other ranks (e.g. %s)", len(missing), what, missing[0].name)
            last = time.monotonic()
        time.sleep(POLL_SECONDS)


def prepare(partial: Path, plan: IndexPlan, identity: dict[str, Any], rank: int) -> None:
    """Keep a partial build made with the same plan and embeddings; start again otherwise (rank 0 decides)."""
    settings = {"plan": plan.to_dict() | {"reason": ""}, "embeddings": identity, "part_rows": PART_ROWS,
                "parts": PART_SUFFIX}
    marker = partial / PLAN
    if rank == 0:
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) != settings:
            log.warning("removing an unfinished index build in %s made with other settings", partial)
            for f in partial.iterdir():
                f.unlink()
        partial.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            atomic_write_json(marker, settings)
    else:
        _wait([marker], "index plan")


def build_faiss(plan: IndexPlan, reader: RowReader, partial: Path, *, rank: int, world: int, seed: int,
                progress: Any, memory: Any = None) -> Any:
    """Train (rank 0), add this rank's parts, and on rank 0 merge every part; returns the index on rank 0, else None.

    An hnsw graph cannot be merged from parts, so it is built whole by rank 0 (other ranks return at once).
    """
    faiss = faiss_module()
    if plan.kind == "hnsw":
        if rank != 0:
            return None
        index = train(plan, reader, seed)
        for a, block in progress.track(reader.blocks(0, reader.n), total=-(-reader.n // ADD_BLOCK),
                                       description="index hnsw"):
            index.add(block)
            progress.update(vectors=a + len(block))
        return index
    memory = memory or NoMemory()
    trained = partial / TRAINED
    if rank == 0 and not trained.is_file():
        with memory.phase("train"):
            write_index(train(plan, reader, seed), trained)
    _wait([trained], "trained quantizer")
    index = faiss.read_index(str(trained))  # never added to: it encodes the parts, then receives the merge
    parts = -(-reader.n // PART_ROWS)
    mine = [p for p in range(rank, parts, world) if not _part_file(partial, p).is_file()]
    for p in progress.track(mine, total=len(mine), description=f"index {plan.kind}"):
        a, b = p * PART_ROWS, min((p + 1) * PART_ROWS, reader.n)
        with memory.phase("encode"):
            index_parts.write_part(_part_file(partial, p), *index_parts.encode_rows(
                index, reader, a, b, on_block=lambda done, p=p: progress.update(vectors=done, part=p)))
    if rank != 0:
        return None
    files = [_part_file(partial, p) for p in range(parts)]
    _wait(files, "index parts")
    for _ in progress.track([None], total=1, description=f"merge {parts} parts"):
        with memory.phase("merge"):
            index = index_parts.merge(index, files, on_lists=lambda done: progress.update(lists=done))
    if index.ntotal != reader.n:
        raise DataError(f"the merged index holds {index.ntotal} vectors, the embeddings {reader.n}; build it again")
    return index


def cleanup(partial: Path) -> None:
    """Remove the build's intermediate files (trained quantizer, parts, plan) from the finished folder."""
    for f in [partial / TRAINED, partial / PLAN, *partial.glob(f"part-*.{PART_SUFFIX}")]:
        f.unlink(missing_ok=True)


def set_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    """nprobe (ivf kinds) or efSearch (hnsw) from the stored parameters."""
    faiss = faiss_module()
    if kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])
    else:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(params["nprobe"])
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):  # an HNSW coarse quantizer must return nprobe good lists
            quantizer.hnsw.efSearch = max(QUANTIZER_EF, 2 * ivf.nprobe)


def file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def own_rss_bytes() -> int:
    """This process's resident memory now (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
