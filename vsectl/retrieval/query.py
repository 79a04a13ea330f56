"""`search`: top-k hits of text or vector queries over an embeddings folder or an index, with ids, paths, captions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.retrieval.embeddings import SIDES, Embeddings
from vsectl.retrieval.index import Index, open_target

MAX_QUERY_CHARS = 1000  # characters in one text query (a caption is a sentence; longer text is refused, not cut)
MAX_QUERIES = 10000  # text queries in one search


@dataclass
class Hit:
    """One result.

    Attributes:
        rank: 1-based position.
        score: cosine similarity (inner product of unit vectors; approximate indexes return the same quantity).
        index: row in the searched side (an image index, or a caption index with side="captions").
        id: the image's id (for a caption hit: the id of the caption's image).
        path: the image file (absolute) or None when the embeddings do not know it.
        caption: the caption (side="captions"), or the image's first caption (side="images"; None without captions).
        image: the image index (equal to `index` for image hits).
    """

    rank: int
    score: float
    index: int
    id: str
    path: str | None
    caption: str | None
    image: int


@dataclass
class SearchResult:
    """The hits of one query, best first.

    Attributes:
        query: the query text, or a label such as "image:cat.jpg" / "vector 3".
        side: "images" or "captions".
        hits: k hits.
    """

    query: str
    side: str
    hits: list[Hit] = field(default_factory=list)
    searched_with: dict[str, Any] = field(default_factory=lambda: {"kind": "exact"})

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "side": self.side, "searched_with": self.searched_with,
                "hits": [asdict(h) for h in self.hits]}


def check_k(k: int, n: int, side: str) -> None:
    """k must be in [1, n]; one readable error otherwise."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ConfigError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > n:
        raise ConfigError(f"k = {k} is larger than the collection ({n} {side}); use -k {n} or less")


def make_hits(emb: Embeddings, side: str, scores: np.ndarray, index: np.ndarray) -> list[Hit]:
    """`Hit`s of one query's (k,) scores and collection rows, with the records of the collection.

    Raises:
        DataError: a score is NaN or inf: the row it came from is damaged (a sample checked on open missed it).
    """
    bad = ~np.isfinite(scores)
    if bad.any():
        row = int(index[int(np.argmax(bad))])
        raise DataError(f"row {row} of {emb.path / side}.npy holds NaN or inf values; the folder is damaged: embed "
                        "it again (--verify checks every row when it is opened)")
    hits = []
    for r, (s, i) in enumerate(zip(scores.tolist(), index.tolist(), strict=True), start=1):
        if side == "images":
            rec = emb.image(i)
            hits.append(Hit(rank=r, score=float(s), index=i, id=rec["id"], path=rec.get("path"),
                            caption=rec.get("caption"), image=i))
        else:
            cap = emb.caption(i)
            rec = emb.image(cap["image"])
            hits.append(Hit(rank=r, score=float(s), index=i, id=rec["id"], path=rec.get("path"), caption=cap["text"],
                            image=int(cap["image"])))
    return hits


def _query_vectors(target_emb: Embeddings, queries: Any, model: Any) -> tuple[np.ndarray, list[str]]:
    if isinstance(queries, str):
        queries = [queries]
    if isinstance(queries, np.ndarray) or (hasattr(queries, "numpy") and hasattr(queries, "ndim")):
        vectors = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        labels = [f"vector {k}" for k in range(vectors.shape[0])]
    else:
        queries = list(queries)
        if not queries:
            raise ConfigError("no queries given; give at least one text")
        check_texts(queries)
        if model is None:
            raise ConfigError("text queries need a model: search(target, texts, model=vsectl.load(run))")
        check_model(model, target_emb)
        vectors = model.encode_text(queries)
        labels = list(queries)
    if vectors.shape[0] == 0:
        raise ConfigError("no queries given")
    if vectors.ndim != 2 or vectors.shape[1] != target_emb.dim:
        raise ConfigError(f"query vectors are {tuple(vectors.shape)}; these embeddings are {target_emb.dim}-d")
    if not np.isfinite(vectors).all():
        raise ConfigError("query vectors contain NaN or inf")
    return vectors, labels


def check_model(model: Any, emb: Embeddings) -> None:
    """Refuse a model whose weights are not those the embeddings were made with (fingerprint mismatch)."""
    if model.fingerprint != emb.fingerprint:
        raise ConfigError(
            f"{emb.path} was embedded with another model (fingerprint {emb.fingerprint}, run "
            f"{emb.meta.get('run')}, {emb.meta.get('checkpoint')}) than {model.run_dir} {model.checkpoint} "
            f"(fingerprint {model.fingerprint}); query it with that run or embed again with this one")


def search(
    target: Embeddings | Index | str | Path,
    queries: str | Sequence[str] | np.ndarray,
    k: int = 10,
    side: str = "images",
    model: Any = None,
    labels: Sequence[str] | None = None,
    verify: bool = False,
) -> list[SearchResult]:
    """Search a collection: the k nearest images (or captions) of each query, best first.

    Cheap per call once the model and the target are open: suitable for a server's request handler.

    Args:
        target: an `Embeddings` (exact search), an `Index` (its kind decides, and its side must be `side`), or a path
            to either (an embeddings folder, or an index folder made by `vsectl index`).
        queries: one text, a list of texts (encoded with `model`), or (Q, E) / (E,) float32 query vectors: from
            `model.encode_images(paths)` for a new image, or a stored row such as `emb.images[i]` for "more like
            this collection item" (image→image, or image→text with side="captions"; no model needed).
        k: hits per query, 1 ≤ k ≤ the size of the searched side.
        side: "images" (text→image, image→image) or "captions" (text→text, image→text).
        model: a `RetrievalModel`, required for text queries; its fingerprint must equal the embeddings'.
        labels: names for vector queries in the results (default "vector i").
        verify: when `target` is a path, hash the embeddings against meta.json and check every row on opening.

    Returns:
        One `SearchResult` per query, in query order.

    Raises:
        ConfigError: an empty query, a bad k or side, a model of another run, a side the index does not cover.
        DataError: the target is missing or inconsistent (e.g. an index whose embeddings changed).
    """
    if side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; use images or captions")
    index = target if isinstance(target, Index) else None
    if isinstance(target, (str, Path)):
        target = open_target(target, verify=verify)
        index = target if isinstance(target, Index) else None
    emb = index.embeddings if index is not None else target
    if index is not None and index.side != side:
        raise ConfigError(f"index {index.path} covers the {index.side} only; search the embeddings folder {emb.path} "
                          f"(exact) or build an index with `vsectl index {emb.path} --side {side}`")
    n = emb.size(side)
    if n == 0:
        raise ConfigError(f"{emb.path} holds no {side}; search the other side")
    check_k(k, n, side)
    vectors, names = _query_vectors(emb, queries, model)
    if labels is not None:
        names = list(labels)
    if index is not None:
        scores, rows = index.search_vectors(vectors, k)
    else:
        from vsectl.retrieval.exact import topk

        scores, rows = topk(emb.side(side), vectors, k)
    how = index.describe() if index is not None else {"kind": "exact"}
    return [SearchResult(query=name, side=side, hits=make_hits(emb, side, s, r), searched_with=how)
            for name, s, r in zip(names, scores, rows, strict=True)]


def check_texts(texts: Sequence[str], where: str = "query") -> None:
    """At most MAX_QUERIES texts of at most MAX_QUERY_CHARS characters each (a long text costs minutes to encode)."""
    if len(texts) > MAX_QUERIES:
        raise ConfigError(f"{len(texts)} queries given; at most {MAX_QUERIES} per search, split them up")
    for n, text in enumerate(texts, start=1):
        if len(text) > MAX_QUERY_CHARS:
            raise ConfigError(f"{where} {n} is {len(text)} characters long; a query is at most {MAX_QUERY_CHARS}")


def read_queries(path: str | Path) -> list[str]:
    """Queries from a UTF-8 text file, one per line; a blank line between queries is refused (it would be an empty
    query), blank lines at the end are ignored."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"queries file {path} is a folder; give a text file with one query per line")
    if not path.is_file():
        raise ConfigError(f"queries file {path} does not exist")
    limit = MAX_QUERIES * (4 * MAX_QUERY_CHARS + 2)  # UTF-8 takes at most 4 bytes a character
    if path.stat().st_size > limit:
        raise ConfigError(f"queries file {path} is {path.stat().st_size / 1e6:.1f} MB; a search takes at most "
                          f"{MAX_QUERIES} queries of {MAX_QUERY_CHARS} characters")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"queries file {path} is not UTF-8 text ({e})") from None
    while lines and not lines[-1].strip():  # the blank lines an editor leaves at the end
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise ConfigError(f"line {n} of {path} is empty; write one query per line")
    if not lines:
        raise ConfigError(f"queries file {path} is empty")
    check_texts([line.strip() for line in lines], where=f"{path}: line")
    return [line.strip() for line in lines]


def search_collection(
    target: str | Path | Embeddings | Index,
    texts: Sequence[str] = (),
    *,
    images: Sequence[str | Path] = (),
    queries_file: str | Path | None = None,
    k: int = 10,
    side: str = "images",
    run: str | Path | Any = None,
    checkpoint: str | None = None,
    device: str = "auto",
    sheet: str | Path | None = None,
    verify: bool = False,
    exact: bool = False,
) -> list[SearchResult]:
    """Everything `vsectl search` does: open the target, load the run, encode text and image queries, search, draw.

    An embeddings folder is searched through its best index for `side` when it has one (`exact` forces exact search).

    Args:
        target: an embeddings or index folder (or an opened one).
        texts: text queries.
        images: image files used as queries (the run's backbone is replayed on them).
        queries_file: more text queries, one per line.
        k: hits per query.
        side: "images" or "captions".
        run: the run (or a loaded `RetrievalModel`) that encodes the queries; default: the run recorded in the
            embeddings' meta.json. Its fingerprint must equal the embeddings'.
        checkpoint: "best" / "last"; default the one the embeddings were made with.
        device: where the model runs.
        sheet: also write a contact sheet PNG here (a new file, or a sheet vsectl wrote before).
        verify: hash the embeddings against meta.json and check every row for NaN/inf before searching.
        exact: search an embeddings folder exactly even when it holds an index.

    Returns:
        One result per query: the texts first, then the images.
    """
    from vsectl.retrieval.model import RetrievalModel, load

    texts = list(texts) + (read_queries(queries_file) if queries_file is not None else [])
    if not texts and not images:
        raise ConfigError("give a query: a text, --queries FILE or --image FILE")
    check_texts(texts)
    if side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; use images or captions")
    if sheet is not None:
        from vsectl.retrieval.sheet import check_sheet_target

        check_sheet_target(sheet)  # before any work
    target = open_target(target, verify=verify) if isinstance(target, (str, Path)) else target
    emb = target.embeddings if isinstance(target, Index) else target
    if emb.size(side) == 0:
        raise ConfigError(f"{emb.path} holds no {side}; search the other side")
    check_k(k, emb.size(side), side)
    for k_, t in enumerate(texts):
        if not t.strip():
            raise ConfigError(f"query {k_ + 1} is empty; give some words to search for")
    for p in images:
        if not Path(p).is_file():
            raise ConfigError(f"image query {p} does not exist")
    if isinstance(run, RetrievalModel):
        model = run
    else:
        recorded = emb.meta.get("run")
        if run is None and not (recorded and Path(recorded).exists()):
            raise ConfigError(f"the run that embedded {emb.path} ({recorded}) is not there; pass --run RUN")
        model = load(run or recorded, checkpoint=checkpoint or emb.meta.get("checkpoint", "best"), device=device)
    check_model(model, emb)
    vectors = [model.encode_text(texts)] if texts else []
    if images:
        vectors.append(model.encode_images([Path(p) for p in images]))
    labels = texts + [f"image:{Path(p).name}" for p in images]
    if not exact and not isinstance(target, Index):
        from vsectl.retrieval.index import best_index

        target = best_index(emb, side) or target
    results = search(target, np.concatenate(vectors), k=k, side=side, labels=labels)
    if sheet is not None:
        from vsectl.retrieval.sheet import contact_sheet

        contact_sheet(results, sheet, image_file=emb.image_file)
    return results
