"""vsectl serve: batched search equals one search per query, the JSON API, refused paths, and the page in Chromium."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vsectl.serving.engine import QueryBatcher

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/cdp.py


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
    while batcher._worker._queue.qsize() < len(queries) - 1 and time.monotonic() < deadline:
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


@pytest.mark.parametrize("n, k, dim", [(50, 7, 16), (33, 33, 16), (70_001, 10, 16), (32_768 + 5, 10, 16),
                                       (2 * 32_768, 3, 16), (40_000, 10, 512)])
def test_shared_scan_equals_each_query_alone_bit_for_bit(n, k, dim):
    from vsectl.retrieval import topk
    from vsectl.serving.scan import shared_topk

    rng = np.random.default_rng(n)
    matrix = rng.standard_normal((n, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix[n // 2] = matrix[3]  # a duplicate row: an exact tie
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    queries[4] = matrix[3]
    scores, rows = shared_topk(matrix, queries, k)
    for i in range(5):
        s_alone, r_alone = topk(matrix, queries[i], k)
        assert np.array_equal(scores[i], s_alone[0]) and np.array_equal(rows[i], r_alone[0])
    reference = loop_topk(matrix[:50], queries[0], min(k, 50)) if n == 50 else None
    if reference:
        assert rows[0].tolist() == [i for i, _ in reference]
    assert rows[4][:2].tolist() == [3, n // 2]  # the tie: lower row first


def test_query_texts_that_arrive_together_are_encoded_in_one_batch_each_getting_its_own_vector():
    """The server encoded one query text at a time under a lock; texts queued behind a running encode now go in one
    batch (a transformer's cost per text falls with the batch), and each request gets its own text's vector."""
    from vsectl.serving.engine import Coalescer

    gate, entered, calls = threading.Event(), threading.Event(), []

    def encode(texts: list[str]) -> list[np.ndarray]:
        entered.set()
        gate.wait(5)
        calls.append(list(texts))
        return [np.array([len(t)], dtype=np.float32) for t in texts]

    coalescer = Coalescer(encode, max_batch=32, name="test-encode")
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    answers: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda j=j, t=t: answers.__setitem__(j, coalescer.submit(t)))
               for j, t in enumerate(texts)]
    threads[0].start()
    assert entered.wait(5)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 5
    while coalescer._queue.qsize() < len(texts) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(5)
    coalescer.close()
    assert [float(answers[j][0]) for j in range(len(texts))] == [1, 2, 3, 4, 5]
    assert calls[0] == ["a"] and sorted(calls[1]) == ["bb", "ccc", "dddd", "eeeee"] and len(calls) == 2


def test_each_stage_gets_half_the_cpus_with_an_index_and_all_of_them_for_an_exact_scan(monkeypatch):
    """Decided once: given threads as given (below 1 refused in one line); an exact scan gains from every core; with
    indexes the encode and search stages run side by side, half the cores each."""
    from vsectl import runtime
    from vsectl.errors import ConfigError
    from vsectl.serving.threads import stage_threads

    for cpus, scanned, expected in ((2, False, 1), (16, False, 8), (1, False, 1), (2, True, 2), (16, True, 16)):
        monkeypatch.setattr(runtime, "usable_cpus", lambda c=cpus: c)
        assert stage_threads(None, scanned) == expected
    assert stage_threads(3, False) == 3
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        stage_threads(0, True)


def test_a_worker_sets_its_own_thread_counts_before_its_first_batch():
    """OpenMP thread counts belong to the thread that sets them: faiss run from the worker thread would use every
    core whatever the main thread set, so each worker sets them itself first."""
    faiss = pytest.importorskip("faiss")
    import torch

    from vsectl.serving.engine import Coalescer
    from vsectl.serving.threads import set_threads

    seen, before = [], torch.get_num_threads()
    coalescer = Coalescer(lambda items: [faiss.omp_get_max_threads() for _ in items], 4, "test-threads",
                          on_start=lambda: (seen.append(threading.current_thread().name), set_threads(1)))
    try:
        assert coalescer.submit("x") == 1 and seen == ["test-threads"]
    finally:
        coalescer.close()
        torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def collection(clipart_run, tmp_path_factory) -> dict[str, Path]:
    """The clip-art test split embedded with the fixture run: real image files with their captions."""
    from vsectl.retrieval import embed

    out = tmp_path_factory.mktemp("serve") / "emb"
    embed(clipart_run["run"], out, data=clipart_run["raw"], split="test", device="cpu", workers=0)
    return {**clipart_run, "emb": out}


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    """`vsectl serve ARGS --port 0` in its own process; returns it and the URL it printed."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "vsectl", "serve", *args, "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"vsectl serve did not start: {url!r} {proc.stderr.read()}")
    return proc, url


@pytest.fixture(scope="module")
def server(collection) -> Iterator[str]:
    proc, url = start_serve(str(collection["emb"]))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def get(url: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    """A raw GET: the path goes on the request line exactly as given (no client-side normalisation)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, dict(response.getheaders())


def get_json(url: str, path: str) -> tuple[int, dict]:
    status, body, headers = get(url, path)
    assert headers["Content-Type"].startswith("application/json")
    return status, json.loads(body)


def test_json_search_answers_as_the_python_api_does(server, collection):
    import vsectl

    status, answer = get_json(server, "/api/search?q=a+bird&k=5")
    assert status == 200 and answer["query"] == "a bird" and answer["k"] == 5
    expected = vsectl.search(collection["emb"], "a bird", k=5, model=vsectl.load(collection["run"], device="cpu"))
    assert [h["index"] for h in answer["hits"]] == [h.index for h in expected[0].hits]
    assert [h["rank"] for h in answer["hits"]] == [1, 2, 3, 4, 5]
    for got, want in zip(answer["hits"], expected[0].hits, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert got["caption"] == want.caption and got["id"] == want.id
        assert got["image_url"] == f"/image/{want.image}" and "path" not in got
    status, body, headers = get(server, answer["hits"][0]["image_url"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == Path(expected[0].hits[0].path).read_bytes()


def test_json_image_to_image_finds_the_image_itself_first(server, collection):
    status, answer = get_json(server, "/api/similar?image=7&k=3")
    assert status == 200 and answer["image"] == 7 and len(answer["hits"]) == 3
    assert answer["hits"][0]["index"] == 7 and answer["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    status, answer = get_json(server, "/api/search?q=a+bird&k=4&side=captions")
    assert status == 200 and answer["side"] == "captions" and all(h["caption"] for h in answer["hits"])


def test_an_index_folder_is_served_too_and_its_side_is_kept(collection):
    from vsectl.retrieval import build_index, open_embeddings
    from vsectl.serving import open_server

    index = build_index(collection["emb"], kind="flat")
    server = open_server(index, port=0, device="cpu")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, answer = get_json(server.url, "/api/search?q=a+red+circle&k=3")
        assert status == 200 and server.engine.info()["index"] == "Index"
        emb = open_embeddings(collection["emb"])
        vector = server.engine.model.encode_text(["a red circle"])[0]
        assert [h["index"] for h in answer["hits"]] == np.argsort(-(emb.images @ vector), kind="stable")[:3].tolist()
        status, answer = get_json(server.url, "/api/search?q=a+red+circle&k=3&side=captions")
        assert status == 400 and "covers the images side" in answer["error"]
    finally:
        server.shutdown()
        server.server_close()
        server.engine.close()


@pytest.mark.parametrize("path, message", [
    ("/api/search?q=&k=5", "empty query"),
    ("/api/search?q=%20%20&k=5", "empty query"),
    ("/api/search?q=bird&k=0", "k must be between 1 and"),
    ("/api/search?q=bird&k=100000", "k must be between 1 and"),
    ("/api/search?q=bird&k=ten", "k must be an integer"),
    ("/api/search?q=bird&side=videos", "unknown side"),
    ("/api/similar?k=3", "missing parameter image"),
])
def test_json_endpoint_refuses_bad_queries_with_a_message(server, path, message):
    status, answer = get_json(server, path)
    assert status == 400 and message in answer["error"]


TRAVERSALS = [
    "/image/../../../../etc/passwd", "/image/..%2f..%2f..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd",
    "/../../../../etc/passwd", "//etc/passwd", "/image/1/../../../../etc/passwd", "/image/%2e%2e%2fsecret.txt",
    "/image/-1", "/image/99999999", "/image/1.png", "/image/%201", "/image/1%00", "/etc/passwd",
    "/static/../secret.txt", "/api/../../secret.txt", "http://127.0.0.1/etc/passwd", "/image/{secret}",
    "/image/file:{secret}",
]


def test_no_url_reaches_a_file_outside_the_collection(server, collection, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    for path in TRAVERSALS:
        path = path.replace("{secret}", str(secret))
        status, body, _ = get(server, path)
        assert status in (400, 404), (path, status)
        assert b"TOP-SECRET" not in body and b"root:" not in body, path
    status, _, _ = get(server, "/image/0")  # while a listed image is served
    assert status == 200


def test_a_port_in_use_is_one_line_and_exit_2(collection):
    from typer.testing import CliRunner

    from vsectl.cli import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(collection["emb"]), "--port", str(port)])
    assert result.exit_code == 2 and not result.stdout.strip()  # no URL printed
    assert f"port {port} on 127.0.0.1 is in use" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- the page in Chromium


def test_the_page_shows_result_images_with_captions_and_clicks_through_to_similar_images(server, tmp_path):
    from cdp import Browser, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium; here that failed or was not run)")
    with Browser(chromium) as browser:
        browser.navigate(server)
        browser.wait_for("document.getElementById('info').textContent.includes('120 images')")
        browser.evaluate("document.getElementById('q').focus()")
        browser.type_text("a bird")
        browser.press_enter()
        cards = browser.wait_for(
            "(() => { const hits = [...document.querySelectorAll('#results .hit')];"
            " const ready = hits.length === 10 && hits.every(h => { const img = h.querySelector('img');"
            " return img && img.complete && img.naturalWidth > 0 && h.querySelector('.caption').textContent; });"
            " return ready && hits.map(h => [h.dataset.image, h.querySelector('.caption').textContent,"
            " h.querySelector('.score').textContent]); })()")
        assert browser.evaluate("location.search") == "?q=a+bird&k=10&side=images"
        shot = browser.screenshot(tmp_path / "serve.png")
        if os.environ.get("VSECTL_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["VSECTL_SCREENSHOT_DIR"]) / "serve.png")
        status, answer = get_json(server, "/api/search?q=a+bird&k=10")
        assert [[str(h["image"]), h["caption"], f"{h['score']:.3f}"] for h in answer["hits"]] == cards
        browser.click("#results .hit:nth-child(3) .thumb")
        clicked = cards[2][0]
        first = browser.wait_for("document.getElementById('status').textContent.includes('image:')"
                                 " && document.querySelector('#results .hit').dataset.image")
        assert first == clicked  # an image is its own nearest neighbour
        if os.environ.get("VSECTL_SCREENSHOT_DIR"):
            browser.wait_for("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            browser.screenshot(Path(os.environ["VSECTL_SCREENSHOT_DIR"]) / "serve_similar.png")
        assert browser.evaluate("location.search") == f"?similar={clicked}&k=10&side=images"


def test_a_run_other_than_the_embeddings_one_is_refused(collection, toy_root, tmp_path):
    from vsectl.config import load_recipe
    from vsectl.errors import ConfigError
    from vsectl.serving import open_server
    from vsectl.training import train

    other = train(load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={toy_root}", "train.epochs=1",
                                                               "name=other"]), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="was embedded with another model"):
        open_server(collection["emb"], run=other, port=0, device="cpu")


@pytest.mark.parametrize("command", ["serve", "export"])
def test_help_works(command):
    from typer.testing import CliRunner

    from vsectl.cli import app

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_the_page_takes_any_k_from_the_address_and_shows_the_query_image_of_a_similar_search(server):
    """?k=12 is not in the page's menu (5/10/20/50): it used to become k=0 and an error."""
    from cdp import Browser, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium; here that failed or was not run)")
    with Browser(chromium) as browser:
        browser.navigate(server + "?q=a+bird&k=12")
        assert browser.wait_for("document.querySelectorAll('#results .hit').length === 12"
                                " && document.getElementById('k').value") == "12"
        assert browser.evaluate("document.getElementById('query').className") == ""  # a text query has no image
        assert browser.evaluate("[...document.getElementById('k').options].map(o => o.value)") == [
            "5", "10", "12", "20", "50"]
        browser.navigate(server + "?similar=7&k=5")
        shown = browser.wait_for(
            "(() => { const box = document.getElementById('query'); const img = box.querySelector('img');"
            " return box.className === 'shown' && img && img.complete && img.naturalWidth > 0"
            " && img.getAttribute('src'); })()")
        assert shown == "/image/7"
        assert browser.evaluate("document.querySelectorAll('#results .hit').length") == 5
        if os.environ.get("VSECTL_SCREENSHOT_DIR"):
            browser.wait_for("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            browser.screenshot(Path(os.environ["VSECTL_SCREENSHOT_DIR"]) / "serve_similar_query.png")
        browser.navigate(server + "?q=a+bird&k=0")  # out of range: the menu's default stays
        assert browser.wait_for("document.querySelectorAll('#results .hit').length === 10"
                                " && document.getElementById('k').value") == "10"


def test_json_similar_answer_names_its_query_image(server, collection):
    status, answer = get_json(server, "/api/similar?image=4&k=2")
    from vsectl.retrieval import open_embeddings

    emb = open_embeddings(collection["emb"])
    assert status == 200 and answer["query_image"] == {"index": 4, "id": emb.image(4)["id"],
                                                       "caption": emb.image(4)["caption"], "image_url": "/image/4"}


# ---------------------------------------------------------------------------------------------- served through an index


@pytest.fixture(scope="module")
def indexed(collection, tmp_path_factory) -> Path:
    """A copy of the collection with an ivf index over its images (3 lists, nprobe tuned to recall 1)."""
    pytest.importorskip("faiss")
    from vsectl.retrieval import build_index

    emb = tmp_path_factory.mktemp("indexed") / "emb"
    shutil.copytree(collection["emb"], emb)
    build_index(emb, kind="ivf")
    return emb


def test_an_embeddings_folder_is_served_through_its_index_and_says_so(indexed, collection):
    import vsectl

    proc, url = start_serve(str(indexed))
    exact_proc, exact_url = start_serve(str(indexed), "--exact")
    try:
        status, answer = get_json(url, "/api/search?q=a+bird&k=5")
        assert status == 200 and answer["searched_with"]["kind"] == "ivf"
        assert answer["searched_with"]["path"] == "index-ivf-images" and answer["searched_with"]["recall@10"] == 1.0
        index = vsectl.open_index(indexed / "index-ivf-images")
        model = vsectl.load(collection["run"], device="cpu")
        expected = vsectl.search(index, "a bird", k=5, model=model)[0]
        assert [h["index"] for h in answer["hits"]] == [h.index for h in expected.hits]
        status, answer = get_json(url, "/api/search?q=a+bird&k=5&side=captions")  # no caption index: exact
        assert status == 200 and answer["searched_with"] == {"kind": "exact"}
        status, info = get_json(url, "/api/info")
        assert info["searched_with"]["images"]["kind"] == "ivf"
        status, answer = get_json(exact_url, "/api/search?q=a+bird&k=5")
        assert answer["searched_with"] == {"kind": "exact"}
    finally:
        for p in (proc, exact_proc):
            p.terminate()
            p.wait(10)


def test_an_index_answers_each_query_as_it_comes_and_an_exact_scan_in_batches(indexed, collection):
    """A faiss index gains little from a batch (each query visits its own lists), so only the sides scanned exactly
    queue their queries together; a folder with an image index still scans its captions exactly."""
    import vsectl
    from vsectl.retrieval import open_target
    from vsectl.serving.engine import SearchEngine

    model = vsectl.load(collection["run"], device="cpu")
    for target, exact, shared in ((indexed / "index-ivf-images", False, set()), (indexed, False, {"captions"}),
                                  (indexed, True, {"images", "captions"})):
        engine = SearchEngine(open_target(target), model, exact=exact)
        try:
            assert engine.batcher.shared_sides == shared
            assert engine.search_text("a bird", k=3)["hits"]
        finally:
            engine.close()


def test_an_item_that_may_not_share_a_run_runs_alone_and_does_not_wait():
    """Queued behind a running batch: b, then one that must run alone, then c. b's batch stops before it (rather
    than make it wait for c's), it runs alone, then c."""
    from vsectl.serving.engine import Coalescer

    gate, entered, calls = threading.Event(), threading.Event(), []

    def run(items: list[str]) -> list[str]:
        entered.set()
        gate.wait(5)
        calls.append(list(items))
        return [i.upper() for i in items]

    coalescer = Coalescer(run, max_batch=8, name="test-alone", batchable=lambda item: item != "alone")
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda t=t: answers.__setitem__(t, coalescer.submit(t)))
               for t in ("a", "b", "alone", "c")]
    threads[0].start()
    assert entered.wait(5)
    for n, t in enumerate(threads[1:], start=1):
        t.start()
        deadline = time.monotonic() + 5
        while coalescer._queue.qsize() < n and time.monotonic() < deadline:  # queued in this order
            time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(5)
    coalescer.close()
    assert answers == {"a": "A", "b": "B", "alone": "ALONE", "c": "C"}
    assert calls == [["a"], ["b"], ["alone"], ["c"]]


def test_search_json_says_which_index_answered(indexed):
    from typer.testing import CliRunner

    from vsectl.cli import app

    for extra, kind in (([], "ivf"), (["--exact"], "exact")):
        result = CliRunner().invoke(app, ["-q", "search", str(indexed), "a bird", "-k", "3", "--json", "--device",
                                          "cpu", *extra])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)[0]["searched_with"]["kind"] == kind


def test_the_page_searches_through_the_index_and_shows_it(indexed, tmp_path):
    from cdp import Browser, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium; here that failed or was not run)")
    proc, url = start_serve(str(indexed))
    try:
        with Browser(chromium) as browser:
            browser.navigate(url)
            info = browser.wait_for("(() => { const t = document.getElementById('info').textContent;"
                                    " return t.includes('index') && t; })()")
            assert "images: ivf index, recall@10 1.000" in info and "captions: exact search" in info
            browser.evaluate("document.getElementById('q').focus()")
            browser.type_text("a bird")
            browser.press_enter()
            status = browser.wait_for("(() => { const s = document.getElementById('status').textContent;"
                                      " return document.querySelectorAll('#results .hit').length === 10"
                                      " && s.includes('index') && s; })()")
            assert "ivf index, recall@10 1.000" in status
            shown = browser.evaluate("[...document.querySelectorAll('#results .hit')].map(h => h.dataset.image)")
            if os.environ.get("VSECTL_SCREENSHOT_DIR"):
                browser.screenshot(Path(os.environ["VSECTL_SCREENSHOT_DIR"]) / "serve_index.png")
        _, answer = get_json(url, "/api/search?q=a+bird&k=10")
        assert shown == [str(h["image"]) for h in answer["hits"]]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_recorded_image_root_is_taken_without_reading_the_records(tmp_path):
    """`serve` found the image folder of a collection without a recorded one by reading every record (8 s per
    million at start-up); a recorded root, None included (vectors with no image files), is taken as recorded, and
    only a folder written before roots were recorded is still read."""
    import json as json_module

    from vsectl.retrieval.embeddings import open_embeddings, write_vectors
    from vsectl.serving.engine import image_root

    x = np.eye(4, dtype=np.float32)
    folder = write_vectors(tmp_path / "emb", [x], 4, 4)
    emb = open_embeddings(folder)
    assert emb.meta["image_root"] is None
    emb.image = lambda i: (_ for _ in ()).throw(AssertionError("a record was read"))
    assert image_root(emb) is None
    emb.meta["image_root"] = str(tmp_path)
    assert image_root(emb) == tmp_path
    meta = json_module.loads((folder / "meta.json").read_text())
    del meta["image_root"]  # written before roots were recorded: the records' common folder
    (folder / "meta.json").write_text(json_module.dumps(meta))
    old = open_embeddings(folder)
    seen = []
    old.image = lambda i: (seen.append(i), {"path": str(tmp_path / "pics" / f"{i}.png")})[1]
    assert image_root(old) == tmp_path / "pics" and seen == [0, 1, 2, 3]
