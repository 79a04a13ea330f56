"""The search engine behind `vsectl serve`: one opened collection, one model, two worker threads.

Concurrent requests' texts are encoded together by one worker (a transformer's cost per text falls with the batch),
then their vectors go to the search worker. For an exact scan it takes every vector waiting at that moment and reads
the collection once for all of them (`vsectl.serving.scan`, bit for bit the hits of each query alone), so under load
the pass over the embeddings is shared while an idle server answers at the latency of a single query; an index is
searched one query at a time, each answered as soon as it is found. A hit list of the largest k asked in a batch is
cut to each request's k: exact top-k is ordered by score then row, so the first k of a longer list are the top k.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from vsectl.errors import ConfigError
from vsectl.serving.threads import get_threads, set_threads, stage_threads

log = logging.getLogger(__name__)

MAX_K = 100            # hits one request may ask for
MAX_QUERY_CHARS = 500  # longer text is refused rather than truncated
MAX_BATCH = 64         # vectors scanned together at most
MAX_TEXTS = 32         # query texts encoded together at most
SIDES = ("images", "captions")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp", ".svg": "image/svg+xml"}  # what the page may show

SearchFn = Callable[[np.ndarray, int, str], list[Any]]  # (Q, E) vectors, k, side → one SearchResult per vector


class Coalescer:
    """One worker thread that runs `run(items) -> results` once for all the requests queued together.

    A result that is an exception is raised in its own request only; an exception of `run` itself in every request of
    the batch (the worker lives on).

    Args:
        run: items → one result per item, in order.
        max_batch: items per run at most.
        name: the worker thread's name.
        on_start: run once in the worker thread before its first batch (e.g. its thread counts).
        batchable: item → whether it may share a run with others (default: all may); one that may not runs alone,
            and a batch being gathered stops before it rather than make it wait.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch: int, name: str,
                 on_start: Callable[[], None] | None = None, batchable: Callable[[Any], bool] | None = None) -> None:
        self._run, self.max_batch, self._on_start = run, max_batch, on_start
        self._batchable = batchable or (lambda item: True)
        self._queue: queue.Queue = queue.Queue()
        self._held: tuple | None = None  # taken from the queue but left for the next run (it runs alone)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Any:
        future: Future = Future()
        self._queue.put((item, future))
        return future.result()

    def _take_batch(self) -> list[tuple] | None:
        if self._held is not None:
            first, self._held = self._held, None
        else:
            first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        if not self._batchable(first[0]):
            return batch
        while len(batch) < self.max_batch:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                self._queue.put(None)  # stop after this batch
                break
            if not self._batchable(entry[0]):
                self._held = entry
                break
            batch.append(entry)
        return batch

    def _work(self) -> None:
        if self._on_start is not None:
            self._on_start()  # in this thread: OpenMP thread counts belong to the thread that sets them
        while (batch := self._take_batch()) is not None:
            try:
                results = self._run([item for item, _ in batch])
            except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)


class QueryBatcher:
    """Serialise vector searches through one worker that scans once for all the vectors queued together.

    Args:
        search: the batched search, (Q, E) vectors, k, side → results with `.hits`.
        batching: False runs each search in the caller's thread instead (the benchmark's baseline).
        max_batch: vectors per scan at most.
        on_start: run once in the search worker's thread first.
        shared_sides: the sides whose search reads every vector once for a whole batch (an exact scan); a query of
            another side (searched through an index) is searched alone and answered at once.
    """

    def __init__(self, search: SearchFn, batching: bool = True, max_batch: int = MAX_BATCH,
                 on_start: Callable[[], None] | None = None, shared_sides: Iterable[str] = SIDES) -> None:
        self._search, self.batching, self.max_batch = search, batching, max_batch
        self.shared_sides = frozenset(shared_sides)
        self.scans = 0    # batched scans run, and vectors answered through them (for the log and the benchmark)
        self.vectors = 0
        self._worker = Coalescer(self._scan, max_batch, "vsectl-search", on_start,
                                 batchable=lambda item: item[2] in self.shared_sides) if batching else None

    def submit(self, vector: np.ndarray, k: int, side: str) -> list[Any]:
        """The top-k hits of one (E,) vector on `side`, best first."""
        if self._worker is None:
            return self._search(vector[None], k, side)[0].hits
        return self._worker.submit((vector, k, side))

    def _scan(self, items: list[tuple[np.ndarray, int, str]]) -> list[Any]:
        """One scan per side for the queued vectors; an error of one side's scan goes to that side's requests."""
        out: list[Any] = [None] * len(items)
        for side in SIDES:
            group = [i for i, item in enumerate(items) if item[2] == side]
            if not group:
                continue
            try:
                results = self._search(np.stack([items[i][0] for i in group]), max(items[i][1] for i in group), side)
                self.scans += 1
                self.vectors += len(group)
                for i, result in zip(group, results, strict=True):
                    out[i] = result.hits[:items[i][1]]
            except BaseException as e:  # noqa: BLE001 - handed to the requests of this side
                for i in group:
                    out[i] = e
        return out

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


class SearchEngine:
    """A collection opened for serving: text → images/captions and image → images/captions, with file lookup.

    Args:
        target: an opened `Embeddings` or `Index` (from `vsectl.retrieval.open_target`).
        model: a `RetrievalModel` whose fingerprint equals the embeddings' (checked here).
        batching: coalesce concurrent searches into one scan.
        exact: search exactly even where the embeddings folder holds an index.
        threads: intra-op threads of each stage (text encoding, search); None: see `stage_threads`.
    """

    def __init__(self, target: Any, model: Any, batching: bool = True, exact: bool = False,
                 threads: int | None = None) -> None:
        from vsectl.retrieval.index import best_index
        from vsectl.retrieval.query import check_model

        self.target = target
        self.emb = getattr(target, "embeddings", target)
        self.model = model
        check_model(model, self.emb)
        if target is not self.emb:  # an index folder was named: it alone answers its side
            self.indexes = {target.side: target}
        else:  # an embeddings folder: its best index per side, exact where it has none (or with exact=True)
            self.indexes = {side: None if exact or not self.emb.size(side) else best_index(self.emb, side)
                            for side in SIDES}
        for side, index in self.indexes.items():
            log.info("%s are searched %s", side, "exactly" if index is None else f"with {index.path.name}")
        scanned = [side for side, index in self.indexes.items() if index is None or index.exact]  # exact scans
        self.threads = stage_threads(threads, any(self.emb.size(side) for side in scanned))
        self._threads_before = get_threads()  # the process's own counts, given back on close()
        set_threads(self.threads)
        log.info("%d thread(s) each for text encoding and for search", self.threads)
        self._encode_lock = threading.Lock()  # one text encode at a time: torch threads are shared, not multiplied
        # concurrent queries' texts are encoded in one batch (a transformer's cost per text falls with the batch)
        own = lambda: set_threads(self.threads)  # noqa: E731 - the workers' first act
        self.text_batcher = Coalescer(self._encode_texts, MAX_TEXTS, "vsectl-encode", own) if batching else None
        # an index answers each query as soon as it is searched: waiting for a batch's last query only delays the
        # first (10M, ivf-pq, 8 clients: 191 against 178 requests/s, p50 41.3 against 44.6 ms)
        self.batcher = QueryBatcher(self._search_vectors, batching=batching, on_start=own, shared_sides=scanned)
        root = image_root(self.emb)
        # resolved now: a link swapped in later for the folder itself leads elsewhere, and is refused like any other
        self.image_root = os.path.realpath(root) if root is not None else None

    def warm_up(self) -> None:
        """One text encode and one scan, so the first user's query does not pay for imports and cold pages."""
        vector = self.model.encode_text(["warm up"])[0]
        for side in SIDES:
            covered = getattr(self.target, "side", side)  # an index covers one side (Embeddings.side is a method)
            if self.emb.size(side) and (not isinstance(covered, str) or covered == side):
                self.batcher.submit(vector, 1, side)

    def _search_vectors(self, vectors: np.ndarray, k: int, side: str) -> list[Any]:
        """One pass for all `vectors`: exact for embeddings and flat indexes, faiss's batch search otherwise."""
        from vsectl.retrieval.query import make_hits
        from vsectl.serving.scan import shared_topk

        if self.target is not self.emb and self.target.side != side:
            raise ConfigError(f"index {self.target.path} covers the {self.target.side} side; search it with "
                              f"side={self.target.side} or serve the embeddings folder {self.emb.path}")
        index = self.indexes.get(side)
        if index is None or index.exact:
            scores, rows = shared_topk(self.emb.side(side), vectors, k)
        else:
            scores, rows = index.search_vectors(vectors, k)
        return [SimpleNamespace(hits=make_hits(self.emb, side, s, r)) for s, r in zip(scores, rows, strict=True)]

    def check_k(self, k: int, side: str) -> int:
        n = self.emb.size(side)
        if n == 0:
            raise ConfigError(f"this collection holds no {side}")
        if not 1 <= k <= min(MAX_K, n):
            raise ConfigError(f"k must be between 1 and {min(MAX_K, n)}, got {k}")
        return k

    def encode(self, text: str) -> np.ndarray:
        """(E,) float32 unit vector of one query text."""
        text = text.strip()
        if not text:
            raise ConfigError("empty query: type some words to search for")
        if len(text) > MAX_QUERY_CHARS:
            raise ConfigError(f"query too long ({len(text)} characters, at most {MAX_QUERY_CHARS})")
        if self.text_batcher is not None:
            return self.text_batcher.submit(text)
        return self._encode_texts([text])[0]

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        with self._encode_lock:
            return list(self.model.encode_text(texts))

    def search_text(self, text: str, k: int = 10, side: str = "images") -> dict[str, Any]:
        """The JSON answer of a text query: {"query", "side", "k", "took_ms", "hits": [...]}."""
        side = _side(side)
        self.check_k(k, side)
        start = time.perf_counter()
        hits = self.batcher.submit(self.encode(text), k, side)
        return self._answer(text.strip(), side, k, hits, start)

    def search_image(self, image: int, k: int = 10, side: str = "images") -> dict[str, Any]:
        """The JSON answer of an image→image (or image→caption) query by the collection's own image `image`."""
        side = _side(side)
        self.check_k(k, side)
        if not 0 <= image < self.emb.n_images:
            raise LookupError(f"no image {image} in this collection of {self.emb.n_images}")
        start = time.perf_counter()
        vector = np.array(self.emb.images[image], dtype=np.float32)  # one row of the map, copied
        hits = self.batcher.submit(vector, k, side)
        record = self.emb.image(image)
        query = {"index": image, "id": record["id"], "caption": record.get("caption"),
                 "image_url": f"/image/{image}" if self._shown(image) else None}  # the page shows it above the hits
        return self._answer(f"image:{record['id']}", side, k, hits, start, image=image, query_image=query)

    def _answer(self, query: str, side: str, k: int, hits: list[Any], start: float, **extra: Any) -> dict[str, Any]:
        rows = []
        for hit in hits:
            row = asdict(hit)
            row["image_url"] = f"/image/{hit.image}" if hit.path or self._shown(hit.image) else None
            row.pop("path")  # the server's file layout is not the client's business
            rows.append(row)
        took_ms = round(1000 * (time.perf_counter() - start), 3)
        return {"query": query, "side": side, "k": k, **extra, "took_ms": took_ms,
                "searched_with": self.searched_with(side), "hits": rows}

    def _shown(self, image: int) -> bool:
        """Whether image `image` has something `/image/N` can serve: a recorded file, or a member of a tar shard."""
        if self.image_root is None:  # nothing is served without a root (`open_image`): no record to read
            return False
        record = self.emb.image(image)
        return bool(record.get("path") or record.get("tar"))

    def searched_with(self, side: str) -> dict[str, Any]:
        """What answers searches of `side`: {"kind": "exact"} or the index's kind, folder and recall@10."""
        index = self.indexes.get(side)
        return {"kind": "exact"} if index is None else {**index.describe(), "path": index.path.name}

    def image_file(self, image: int) -> Path | None:
        """The file of the collection's image `image` as recorded, or None when unknown or out of range."""
        if not 0 <= image < self.emb.n_images:
            return None
        return self.emb.image_path(image)

    def open_image(self, image: int) -> tuple[Any, str] | None:
        """The open file of image `image` and its content type, or None when it has none to show: unknown, missing,
        not a regular file, of a type not served, or (resolved after opening, links included) outside the folder the
        collection's images were embedded from. An image inside a tar shard is its recorded bytes, read from the
        shard file under the same rules."""
        if not 0 <= image < self.emb.n_images or self.image_root is None:
            return None
        member = self.emb.image(image).get("tar")
        path = Path(member["file"]) if member else self.emb.image_path(image)
        suffix = Path(member["member"]).suffix if member else path.suffix if path is not None else ""
        kind = IMAGE_TYPES.get(suffix.lower())
        f = self._open_inside(image, path) if kind is not None and path is not None else None
        if f is None or not member:
            return (f, kind) if f is not None else None
        with f:  # an image inside a tar shard: its bytes at the recorded offset
            offset, size = int(member["offset"]), int(member["size"])
            f.seek(offset)
            data = f.read(size)
        return (io.BytesIO(data), kind) if len(data) == size else None

    def _open_inside(self, image: int, path: Path) -> Any:
        """`path` opened for reading if it is a regular file inside the image root (checked on the open file)."""
        try:  # O_NONBLOCK: a FIFO swapped in for the file must not hold the request's thread
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            real, root = _opened_path(fd, path), self.image_root
            inside = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not inside:
                if not inside:
                    log.warning("image %d: %s leads outside %s; not served", image, path, root)
                os.close(fd)
                return None
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def info(self) -> dict[str, Any]:
        meta = self.emb.meta
        run = meta.get("run")
        return {"images": self.emb.n_images, "captions": self.emb.n_captions, "embed_dim": self.emb.dim,
                "run": Path(run).name if run else None,  # its name: the server's file layout is not the client's
                "fingerprint": self.emb.fingerprint, "index": type(self.target).__name__,
                "max_k": MAX_K, "searched_with": {side: self.searched_with(side) for side in SIDES
                                                  if self.emb.size(side) and side in self.indexes}}

    def close(self) -> None:
        self.batcher.close()
        if self.text_batcher is not None:
            self.text_batcher.close()
        set_threads(*self._threads_before)


def _opened_path(fd: int, path: Path) -> str:
    """The real path of the file open as `fd` (Linux: from the descriptor itself, so no later swap can fool it)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)  # elsewhere: resolve the name, and check it still is the opened file
        st, own = os.stat(real), os.fstat(fd)
        return real if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino) else ""


def image_root(emb: Any) -> Path | None:
    """The folder every image of the collection lies under, as recorded at embed time (None recorded: no image
    files); for embeddings written before it was recorded, the common folder of the recorded image paths (one pass
    over the records: about 8 s per million, which a recorded root spares every start of `serve`)."""
    if "image_root" in emb.meta:
        recorded = emb.meta["image_root"]
        return Path(recorded) if isinstance(recorded, str) and recorded else None
    if emb.meta.get("source", {}).get("kind") == "images" and emb.meta["source"].get("path"):
        return Path(emb.meta["source"]["path"])
    folders = {os.path.dirname(p) for p in (emb.image(i).get("path") for i in range(emb.n_images)) if p}
    return Path(os.path.commonpath(sorted(folders))) if folders else None


def _side(side: str) -> str:
    if side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; use images or captions")
    return side
