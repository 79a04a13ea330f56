"""`vsectl serve`: a collection of embeddings behind a local search page and a JSON API.

    server = open_server("emb/clipart", port=8000)   # binds 127.0.0.1; server.url
    server.serve_forever()
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vsectl.errors import ConfigError

log = logging.getLogger(__name__)


def open_server(target: str | Path, *, run: str | Path | None = None, checkpoint: str | None = None,
                host: str = "127.0.0.1", port: int = 8000, device: str = "auto", batching: bool = True,
                allow_hosts: Sequence[str] = (), verify: bool = False, exact: bool = False,
                threads: int | None = None) -> Any:
    """Open a collection and its model and bind the server (not yet serving).

    Args:
        target: an embeddings folder (`vsectl embed`) or an index folder (`vsectl index`).
        run: the run whose text tower encodes the queries; default: the run recorded in the embeddings.
        checkpoint: "best" or "last"; default: the one recorded in the embeddings.
        host: address to listen on; loopback unless you mean to share the collection.
        port: TCP port; 0 picks a free one (see the returned server's `.url`).
        device: where the text tower runs.
        batching: coalesce concurrent searches into one scan of the embeddings.
        allow_hosts: more names to answer in the Host header (by default the bound address, and the loopback names
            on loopback); a request naming another host is refused (403), which stops DNS rebinding.
        verify: hash the embeddings against meta.json and check every row for NaN/inf before serving.
        exact: search an embeddings folder exactly even when it holds an index (by default its best index per side
            answers, see `vsectl.retrieval.index.best_index`).
        threads: intra-op threads of each stage (text encoding, search); default: all usable CPUs when a side is
            scanned exactly, half of them each when indexes answer (`vsectl.serving.engine.stage_threads`).

    Returns:
        a bound `VsectlServer`; call `.serve_forever()`, and `.server_close()` plus `.engine.close()` when done.

    Raises:
        ConfigError: the port is in use, the run cannot be found, or the model does not match the embeddings.
        DataError: the embeddings or index are missing or inconsistent.
    """
    from vsectl.retrieval import open_target
    from vsectl.serving.engine import SearchEngine
    from vsectl.serving.http import make_server

    opened = open_target(target, verify=verify)
    emb = getattr(opened, "embeddings", opened)
    if run is None:
        run = emb.meta.get("run")
        if not run or not Path(run).exists():
            raise ConfigError(f"the run that made {emb.path} ({run}) is not there; give the run with --run")
    # bound first: a port in use fails before the model loads
    server = make_server(None, host=host, port=port, allow_hosts=allow_hosts)
    try:
        from vsectl.retrieval import load  # torch: imported after the port is ours

        model = load(run, checkpoint=checkpoint or emb.meta.get("checkpoint") or "best", device=device)
        server.engine = SearchEngine(opened, model, batching=batching, exact=exact, threads=threads)
        server.engine.warm_up()
    except BaseException:
        server.server_close()
        raise
    log.info("serving %d images and %d captions of %s", emb.n_images, emb.n_captions, emb.path)
    return server
