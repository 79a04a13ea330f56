"""vsectl serve answers only for its own host names (no DNS rebinding), serves only files inside the collection's image
folder (a link swapped in later leads nowhere), shows no server paths, and never sends NaN."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def collection(clipart_run, tmp_path_factory) -> dict[str, Path]:
    """A copy of the clip-art dataset (so its files can be swapped) embedded with the fixture run."""
    from vsectl.retrieval import embed

    root = tmp_path_factory.mktemp("served")
    raw = Path(shutil.copytree(clipart_run["raw"], root / "raw"))
    emb = embed(clipart_run["run"], root / "emb", data=raw, split="test", device="cpu", workers=0)
    return {**clipart_run, "raw": raw, "emb": emb}


def serving(target: Path, **options) -> Iterator:  # noqa: ANN003
    from vsectl.serving import open_server

    server = open_server(target, port=0, device="cpu", **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.engine.close()


@pytest.fixture(scope="module")
def server(collection) -> Iterator:
    yield from serving(collection["emb"], allow_hosts=["search.lab.example"])


def request(server, path: str, host: str | None = "127.0.0.1") -> tuple[int, bytes]:  # noqa: ANN001
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_a_foreign_host_header_is_refused(server) -> None:
    port = server.server_address[1]
    for host in ("evil.example.com", f"evil.example.com:{port}", "attacker.localhost.example", "127.0.0.1.nip.io"):
        status, body = request(server, "/api/info", host)
        assert status == 403, host
        assert "--allow-host" in json.loads(body)["error"]
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", "search.lab.example", None):
        status, body = request(server, "/api/info", host)
        assert status == 200, host


def test_the_names_a_server_answers(monkeypatch) -> None:
    from vsectl.serving.http import is_loopback, served_names

    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("192.168.1.5")
    assert served_names("192.168.1.5") == {"192.168.1.5"}
    assert {"localhost", "127.0.0.1", "::1"} <= served_names("127.0.0.1")
    monkeypatch.setattr("socket.gethostname", lambda: "labbox")
    monkeypatch.setattr("socket.getfqdn", lambda: "labbox.example.org")
    monkeypatch.setattr("socket.getaddrinfo", lambda *a, **k: [(None, None, None, None, ("10.1.2.3", 0))])
    assert {"labbox", "labbox.example.org", "10.1.2.3", "localhost"} <= served_names("0.0.0.0", ["Proxy.Example:443"])
    assert "proxy.example" in served_names("0.0.0.0", ["Proxy.Example:443"])


def test_info_shows_the_run_by_name_not_its_path(server, collection) -> None:
    status, body = request(server, "/api/info")
    info = json.loads(body)
    assert status == 200 and info["run"] == collection["run"].name and "/" not in body.decode()


def test_a_link_swapped_in_after_embedding_is_not_followed(server, collection) -> None:
    from vsectl.retrieval import open_embeddings

    emb = open_embeddings(collection["emb"])
    first, second = Path(emb.image(0)["path"]), Path(emb.image(1)["path"])
    status, body = request(server, "/image/0")
    assert status == 200 and body == first.read_bytes()
    kept = first.with_suffix(".kept")
    os.rename(first, kept)
    try:
        os.symlink("/etc/passwd", first)  # a link that leaves the collection
        status, body = request(server, "/image/0")
        assert status == 404 and b"root:" not in body
        first.unlink()
        os.symlink(second, first)  # a link to another image of the collection is fine
        status, body = request(server, "/image/0")
        assert status == 200 and body == second.read_bytes()
        first.unlink()
        os.mkfifo(first)  # a FIFO would hold the request's thread
        status, _ = request(server, "/image/0")
        assert status == 404
    finally:
        first.unlink(missing_ok=True)
        os.rename(kept, first)


def test_a_damaged_row_answers_an_error_in_valid_json_and_the_server_lives_on(collection, tmp_path) -> None:
    from vsectl.errors import DataError
    from vsectl.serving import open_server

    emb = Path(shutil.copytree(collection["emb"], tmp_path / "emb"))
    for server in serving(emb):
        matrix = np.load(emb / "images.npy", mmap_mode="r+")
        matrix[:] = np.nan  # damaged while it is served: the server's map sees the new bytes
        matrix.flush()
        del matrix
        status, body = request(server, "/api/search?q=a+bird&k=3")
        assert status == 500 and "damaged" in json.loads(body)["error"]  # strict JSON: NaN would not parse
        assert b"NaN" not in body and request(server, "/api/info")[0] == 200
    with pytest.raises(DataError, match="holds NaN or inf values"):
        open_server(emb, port=0, device="cpu")  # and it is not served again


def test_serve_allow_host_on_the_command_line(collection) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vsectl", "serve", str(collection["emb"]), "--port", "0",
                             "--device", "cpu", "--allow-host", "search.lab.example"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = proc.stdout.readline().strip()
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for host, status in (("search.lab.example", 200), ("evil.example.com", 403)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/info", headers={"Host": host})
            assert conn.getresponse().status == status, host
            conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
