"""vsectl: image-text retrieval with visual semantic embeddings and learned pooling (VSE∞, CVPR 2021).

The retrieval API is importable from here; each name loads its module (and torch, for the model) on first use, so
`import vsectl` stays cheap:

    model = vsectl.load("runs/demo")                        # a trained run's towers (RetrievalModel)
    emb = vsectl.open_embeddings("emb/clipart")             # written by `vsectl embed`
    hits = vsectl.search(emb, "a red apple", k=5, model=model)[0].hits

See `vsectl.retrieval` for the whole API.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_RETRIEVAL = ("load", "RetrievalModel", "open_embeddings", "Embeddings", "embed", "search", "SearchResult", "Hit",
              "build_index", "open_index", "Index", "topk", "contact_sheet", "run_fingerprint")


def __getattr__(name: str) -> Any:
    if name in _RETRIEVAL:
        from vsectl import retrieval

        value = getattr(retrieval, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vsectl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_RETRIEVAL])
