"""The index card: what an index costs and how close it comes to exact search, measured when it is built.

Queries are held out from the collection: for an image index over a collection with captions, a sample of its
captions (the text → image task it serves); otherwise a sample of the indexed rows themselves, each query's own row
left out of both its exact and its approximate hit list. Exact hits come from one streamed pass over the embeddings
file (`exact.topk` per block). The search parameter (nprobe, or efSearch for hnsw) is tuned here: the smallest value
on a doubling ladder whose recall@10 reaches the target, unless a single query then takes longer than --max-query-ms.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vsectl.retrieval.index_build import read_rows, sample_rows
from vsectl.retrieval.rows import RowReader

log = logging.getLogger(__name__)

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (Q, E), k → scores, rows (Q, k)
CARD_QUERIES = 256  # held-out queries: recall@10 to about ±0.01
SINGLE_QUERIES = 50  # of those, timed one at a time
RECALL_KS = (1, 10, 100)
QUERY_K = 10  # hits per query in the timings
TARGET_RECALL = 0.95  # recall@10 that tuning aims for
RSUM_SAMPLE = 1000  # captions (and images) whose R@1/5/10 the card computes, at most
RSUM_KS = (1, 5, 10)
EXACT_BLOCK = 1 << 16  # rows per block of the exact pass (128 MiB at 512-d; its scores for 256 queries 64 MiB)
QUERY_SEED = 1


def exact_stream(reader: RowReader, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a .npy file read block by block: scores and rows (Q, k), best first."""
    from vsectl.retrieval.exact import sort_hits, topk

    best_s = np.empty((len(queries), 0), dtype=np.float32)
    best_i = np.empty((len(queries), 0), dtype=np.int64)
    for a, block in reader.blocks(0, reader.n, EXACT_BLOCK):
        s, i = topk(block, queries, min(k, len(block)))
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + a], axis=1)
        if best_s.shape[1] > k:
            keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return sort_hits(best_s, best_i)


def held_out(emb: Any, side: str, n_queries: int, seed: int = QUERY_SEED) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(Q, E) query vectors, the rows they are (None for captions querying images), and what they are."""
    if side == "images" and emb.n_captions:
        rows = sample_rows(emb.n_captions, n_queries, seed)
        return read_rows(RowReader(emb.path / "captions.npy"), rows), None, "captions"
    rows = sample_rows(emb.size(side), n_queries, seed)
    return read_rows(RowReader(emb.path / f"{side}.npy"), rows), rows, f"{side} (each query's own row left out)"


def _drop_self(rows: np.ndarray, own: np.ndarray | None, k: int) -> list[list[int]]:
    if own is None:
        return [r[:k].tolist() for r in rows]
    return [[int(x) for x in r if x != o][:k] for r, o in zip(rows, own, strict=True)]


def recall(approx: np.ndarray, exact: np.ndarray, own: np.ndarray | None, k: int) -> float:
    """Mean share of each query's exact top-k that the approximate top-k holds."""
    a, e = _drop_self(approx, own, k), _drop_self(exact, own, k)
    return float(np.mean([len(set(x) & set(y)) / max(1, len(y)) for x, y in zip(a, e, strict=True)]))


def time_single(search: SearchFn, queries: np.ndarray, k: int) -> dict[str, float]:
    """Median and worst wall ms of one query at a time, and the median CPU ms (all threads): on a shared machine
    the wall time grows with the other load, the CPU time much less."""
    times, cpu = [], []
    for q in queries[:SINGLE_QUERIES]:
        start, cpu0 = time.perf_counter(), time.process_time()
        search(q[None], k)
        times.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.process_time() - cpu0))
    return {"median": round(statistics.median(times), 3), "max": round(max(times), 3),
            "cpu_median": round(statistics.median(cpu), 3), "count": len(times)}


def time_batch(search: SearchFn, queries: np.ndarray, k: int) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    start = time.perf_counter()
    out = search(queries, k)
    return round(1000 * (time.perf_counter() - start) / len(queries), 3), out


def tune(search: SearchFn, set_param: Callable[[int], None], ladder: list[int], queries: np.ndarray,
         exact: np.ndarray, own: np.ndarray | None, k: int, max_query_ms: float | None,
         target: float = TARGET_RECALL) -> tuple[int, list[dict[str, float]]]:
    """The smallest ladder value reaching `target` recall@k (the best one if none does), stepped down while a single
    query takes longer than `max_query_ms`; returns it and the measured ladder."""
    table: list[dict[str, float]] = []
    chosen = ladder[-1]
    for value in ladder:
        set_param(value)
        _, (_, rows) = time_batch(search, queries, k + 1)
        table.append({"value": value, "recall@10": round(recall(rows, exact, own, k), 4)})
        if table[-1]["recall@10"] >= target:
            chosen = value
            break
    else:
        chosen = max(table, key=lambda r: r["recall@10"])["value"]
    if max_query_ms is not None:
        for value in [v for v in reversed(ladder) if v <= chosen]:
            set_param(value)
            ms = time_single(search, queries, k)["median"]
            chosen = value
            if ms <= max_query_ms:
                break
            log.warning("a query takes %.1f ms with %d, over --max-query-ms %s: trying less", ms, value, max_query_ms)
    set_param(chosen)
    return chosen, table


def _hits_at(rows: np.ndarray, truth: list[set[int]]) -> dict[int, float]:
    return {k: 100.0 * float(np.mean([bool(truth[q] & set(rows[q, :k].tolist())) for q in range(len(truth))]))
            for k in RSUM_KS}


def rsum(emb: Any, side: str, search: SearchFn, seed: int = QUERY_SEED) -> dict[str, Any] | None:
    """R@1/5/10 both ways on samples of captions and images, the indexed direction through the index and exactly.

    The direction that searches `side` goes through the index; the other one is exact in both sums. Items tied exactly
    keep the order the search returns them in (no tie rule): the sums compare the index with exact search, and the
    protocol's numbers are `vsectl eval`'s.
    """
    if not emb.n_captions or not emb.n_images:
        return None
    cap2img = np.asarray(emb.cap2img)
    caps = sample_rows(emb.n_captions, RSUM_SAMPLE, seed)
    imgs = sample_rows(emb.n_images, RSUM_SAMPLE, seed)
    t2i_q = read_rows(RowReader(emb.path / "captions.npy"), caps)
    i2t_q = read_rows(RowReader(emb.path / "images.npy"), imgs)
    t2i_truth = [{int(cap2img[j])} for j in caps]
    by_image: dict[int, set[int]] = {}
    for j, i in enumerate(cap2img.tolist()):
        by_image.setdefault(i, set()).add(j)
    i2t_truth = [by_image.get(int(i), set()) for i in imgs]
    k = min(max(RSUM_KS), emb.n_images, emb.n_captions)
    exact_t2i = exact_stream(RowReader(emb.path / "images.npy"), t2i_q, k)[1]
    exact_i2t = exact_stream(RowReader(emb.path / "captions.npy"), i2t_q, k)[1]
    exact = {"t2i": _hits_at(exact_t2i, t2i_truth), "i2t": _hits_at(exact_i2t, i2t_truth)}
    through = dict(exact)
    if side == "images":
        through["t2i"] = _hits_at(search(t2i_q, k)[1], t2i_truth)
    else:
        through["i2t"] = _hits_at(search(i2t_q, k)[1], i2t_truth)
    total = {name: round(sum(v for d in parts.values() for v in d.values()), 2)
             for name, parts in (("index", through), ("exact", exact))}
    return {**total, "captions": len(caps), "images": len(imgs), "indexed_direction": "t2i" if side == "images"
            else "i2t", "ties": "search order", "recall_index": through, "recall_exact": exact}


def measure(emb: Any, side: str, search: SearchFn, *, tune_with: tuple[Callable[[int], None], list[int]] | None,
            max_query_ms: float | None, target: float = TARGET_RECALL,
            n_queries: int = CARD_QUERIES) -> dict[str, Any]:
    """The card's measured part: held-out recall@1/10/100, query times, tuning (to recall@10 `target`), rsum.

    Recall@K is measured asking the index for K hits, as a search of k = K does (an ivf-pq index re-scores k·refine
    candidates, so asking for 100 hits and keeping 10 would overstate recall@10)."""
    queries, own, source = held_out(emb, side, n_queries)
    n = emb.size(side)
    extra = int(own is not None)  # a query taken from the collection finds itself first: one more hit, left out
    kmax = min(max(RECALL_KS), n - extra)
    start = time.perf_counter()
    exact = exact_stream(RowReader(emb.path / f"{side}.npy"), queries, kmax + extra)[1]
    exact_s = time.perf_counter() - start
    card: dict[str, Any] = {"queries": {"count": len(queries), "source": source, "seed": QUERY_SEED},
                            "exact_pass_seconds": round(exact_s, 2)}
    if tune_with is not None:
        set_param, ladder = tune_with
        chosen, table = tune(search, set_param, ladder, queries, exact, own, min(10, kmax), max_query_ms, target)
        card["tuning"] = {"chosen": chosen, "ladder": table, "target_recall@10": target}
    card["recall"] = {}
    for k in RECALL_KS:
        at = min(k, kmax)
        card["recall"][f"@{k}"] = round(recall(search(queries, at + extra)[1], exact, own, at), 4)
    k = min(QUERY_K, n)
    card["query_ms"] = {"single": time_single(search, queries, k), "batched_per_query": time_batch(search, queries,
                                                                                                 k)[0],
                        "batch": len(queries), "k": k}
    card["rsum"] = rsum(emb, side, search)
    return card
