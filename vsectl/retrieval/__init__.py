"""Use a trained run as a retrieval engine: encode text and images, embed a collection, index it, search it.

The public API (also re-exported, lazily, from `vsectl`):

    model = vsectl.load("runs/demo")                      # RetrievalModel: the run's towers, eval mode
    emb = vsectl.open_embeddings("emb/clipart")           # Embeddings written by `vsectl embed` (memory-mapped)
    [result] = vsectl.search(emb, "a red apple", k=5, model=model)
    for hit in result.hits: print(hit.rank, hit.score, hit.id, hit.path, hit.caption)

- `load(run, checkpoint="best", device="auto") -> RetrievalModel`: `.encode_text(list[str])` and
  `.encode_images(paths or feature sets)` return (N, E) float32 unit rows; `.fingerprint` names the weights.
- `embed(run, out, images=DIR | data=RAW | features=STORE | shards=TARS)`: a collection to an embeddings folder
  (sharded, resumable, split over torchrun ranks), `open_embeddings(path) -> Embeddings`.
- `build_index(emb, kind="auto", max_memory="4GB")`, `open_index(path) -> Index`: a faiss layout chosen under the
  budget (or flat, hnsw, ivf, ivf-sq8, ivf-pq by name; all but flat need faiss) and its card (`Index.card`).
- `search(target, queries, k=10, side="images" | "captions", model=None) -> list[SearchResult]`: one result per
  query; queries are texts (encoded with `model`, whose fingerprint must match the embeddings') or (Q, E) vectors.
- `topk(matrix, queries, k)`: exact blocked top-k over a memory-mapped (N, E) matrix.
- `contact_sheet(result, out)`: a PNG of the hits with their scores and captions.

Importing this package is cheap; each name loads its module (and torch, for the model side) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load": "model", "RetrievalModel": "model", "run_fingerprint": "model",
    "FeatureRecipe": "recipe", "feature_recipe": "recipe",
    "Embeddings": "embeddings", "open_embeddings": "embeddings", "EMBEDDINGS_FORMAT": "embeddings",
    "embed": "collection",
    "topk": "exact",
    "Index": "index", "build_index": "index", "open_index": "index", "open_target": "index",
    "INDEX_KINDS": "index_files",
    "Hit": "query", "SearchResult": "query", "search": "query",
    "contact_sheet": "sheet",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vsectl.retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vsectl.retrieval.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
