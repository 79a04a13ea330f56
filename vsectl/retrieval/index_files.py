"""The files of an index folder: their names, and reading `index.json` and `card.json` back with every field checked
(a damaged file is one line naming it, never a KeyError)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vsectl.errors import DataError
from vsectl.retrieval import index_build
from vsectl.retrieval.embeddings import SIDES
from vsectl.retrieval.index_plan import PLAN_KINDS

log = logging.getLogger(__name__)

INDEX_KINDS = PLAN_KINDS
INDEX_FORMAT = "vsectl-index"
INDEX_VERSION = 2
INDEX_META = "index.json"
CARD = "card.json"
FAISS_FILE = "index.faiss"


def earlier_index(folder: Path) -> set[str]:
    """The files of an index folder written before vsectl listed them (`.vsectl-owned.json`)."""
    try:
        meta = json.loads((folder / INDEX_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        return set()
    return {INDEX_META, FAISS_FILE, CARD}


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / INDEX_META
    if not meta_path.is_file():
        raise DataError(f"{path} is not an index folder (no {INDEX_META}); make one with `vsectl index EMB`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path} is not valid JSON ({str(e)[:120]}); rebuild the index") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("kind") not in INDEX_KINDS:
        raise DataError(f"{path} is not a vsectl index ({INDEX_META} format/kind unknown)")
    check_index_meta(path, meta)
    return meta


IDENTITY_KEYS = {"sha256": str, "rows": int, "dim": int, "bytes": int, "mtime_ns": int, "fingerprint": str}


def check_index_meta(path: Path, meta: dict[str, Any]) -> None:
    """Every field `open_index` reads, present and of its type: a damaged index.json is one line, not a KeyError."""
    def bad(what: str) -> DataError:
        return DataError(f"{path / INDEX_META} is damaged ({what}); rebuild the index with `vsectl index`")

    if meta.get("side") not in SIDES:
        raise bad("side is missing" if "side" not in meta else f"side is {str(meta['side'])[:40]!r}")
    params, built = meta.get("params"), meta.get("embeddings")
    if not isinstance(params, dict):
        raise bad("no params")
    for key, (low, high) in index_build.PARAM_BOUNDS[meta["kind"]].items():
        value = params.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise bad(f"params.{key} is missing" if key not in params else f"params.{key} is {str(value)[:40]!r}")
    if not isinstance(built, dict):
        raise bad("no record of its embeddings")
    for key, kind in IDENTITY_KEYS.items():
        if not isinstance(built.get(key), kind) or isinstance(built.get(key), bool):
            raise bad(f"embeddings.{key} is {str(built.get(key))[:40]!r}")


def read_card(path: str | Path) -> dict[str, Any]:
    """The card of an index folder ({} when it has none)."""
    card = Path(path) / CARD
    try:
        found = json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}
    except (OSError, ValueError):
        log.warning("%s is not readable JSON; the index is used without its card", card)
        return {}
    return found if isinstance(found, dict) else {}
