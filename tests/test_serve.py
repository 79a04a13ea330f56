"""vsectl serve: batched search equals one search per query, the JSON API, refused paths, and the page in Chromium."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np

from vsectl.serving.engine import QueryBatcher


def loop_topk(matrix: np.ndarray, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The obvious reference: score every row, sort by (-score, row)."""
    scores = [(float(np.dot(row, vector)), i) for i, row in enumerate(matrix)]
    return [(i, s) for s, i in sorted(scores, key=lambda t: (-t[0], t[1]))[:k]]


def test_batched_searches_equal_one_search_per_query_and_share_scans():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((50, 8)).astype(np.float32)
    entered, gate = threading.Event(), threading.Event()
    calls = []

    def search(vectors: np.ndarray, k: int, side: str) -> list:
        entered.set()
        gate.wait(5)  # hold the first scan so the other requests queue up behind it
        calls.append((len(vectors), k, side))
        results = []
        for v in vectors:
            hits = [SimpleNamespace(index=i, score=s) for i, s in loop_topk(matrix, v, k)]
            results.append(SimpleNamespace(hits=hits))
        return results

    batcher = QueryBatcher(search)
    queries = [(rng.standard_normal(8).astype(np.float32), k, side) for k, side in
               [(3, "images"), (7, "images"), (1, "captions"), (5, "images"), (2, "captions"), (4, "images")]]
    answers: dict[int, list] = {}
    threads = [threading.Thread(target=lambda j=j, q=q: answers.__setitem__(j, batcher.submit(*q)))
               for j, q in enumerate(queries)]
    threads[0].start()
    assert entered.wait(5)  # the first request is being scanned (and held) before the others arrive
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 5
    while batcher._queue.qsize() < len(queries) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(5)
    batcher.close()
    for j, (vector, k, _) in enumerate(queries):
        assert [(h.index, h.score) for h in answers[j]] == loop_topk(matrix, vector, k)
    # one scan for the first request, then one per side for the five that queued together
    assert sorted(calls) == sorted([(1, 3, "images"), (3, 7, "images"), (2, 2, "captions")])
    assert batcher.scans == 3 and batcher.vectors == 6


def test_an_error_in_a_batched_search_reaches_every_waiting_request_and_the_worker_survives():
    def search(vectors: np.ndarray, k: int, side: str) -> list:
        if k == 99:
            raise ValueError("boom")
        return [SimpleNamespace(hits=[k]) for _ in vectors]

    batcher = QueryBatcher(search)
    vector = np.zeros(4, dtype=np.float32)
    try:
        batcher.submit(vector, 99, "images")
    except ValueError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("the error was swallowed")
    assert batcher.submit(vector, 2, "images") == [2]
    batcher.close()
