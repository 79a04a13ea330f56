"""What `embed` reads: a plain image folder, a prepared raw dataset or a feature store, as ids, paths and captions."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsectl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})


@dataclass
class Source:
    """What to embed: N items (id, file path or None) and C captions (text, item position).

    Attributes:
        kind: "images" (a plain folder), "data" (a raw dataset) or "features" (an extracted store).
        path: the folder or store, resolved.
        items: one {"id", "path"} per item, in collection order.
        captions: (text, item position) pairs.
        identity: what decides whether finished shards can be reused (a hash of the listing or the source files).
        backbone: the feature provenance recorded in meta.json.
        store: the store path for "features" (its feature sets are read one image at a time).
    """

    kind: str
    path: Path
    items: list[dict[str, Any]]
    captions: list[tuple[str, int]]
    identity: dict[str, Any]
    backbone: dict[str, Any] | None = None
    store: Path | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def list_images(folder: Path) -> list[Path]:
    """Image files (by suffix) under `folder`, recursively, in sorted relative-path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def folder_source(folder: str | Path) -> Source:
    """A plain folder of images (no captions); ids are the paths relative to the folder."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = list_images(folder)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of images")
    items = [{"id": p.relative_to(folder).as_posix(), "path": str(p)} for p in files]
    listing = hashlib.sha256("\n".join(i["id"] for i in items).encode("utf-8")).hexdigest()
    return Source(kind="images", path=folder, items=items, captions=[], identity={"listing_sha256": listing})


def data_source(data: str | Path, split: str) -> Source:
    """A prepared raw dataset (dataset.json + manifest.json): its images and captions, one split or all."""
    from vsectl.data.raw import load_raw_dataset
    from vsectl.io import sha256_file

    raw = load_raw_dataset(data)
    if raw.manifest.get("modality") == "video":
        raise ConfigError(f"{raw.root} holds videos (folders of frames); embed an extracted store with --features")
    if split == "all":
        entries = raw.images
    else:
        entries = raw.split(split)
    if not entries:
        raise DataError(f"{raw.root} has no images in split {split!r}")
    items, captions = [], []
    for pos, entry in enumerate(entries):
        items.append({"id": entry["id"], "path": str(entry["path"])})
        captions.extend((t, pos) for t in entry["captions"] if t.strip())  # as extract stores them
    identity = {"dataset_sha256": sha256_file(raw.root / "dataset.json"), "split": split}
    return Source(kind="data", path=raw.root, items=items, captions=captions, identity=identity, split=split)


def _store_paths(attrs: dict[str, Any], ids: list[str]) -> list[str | None]:
    """Image files of a store's ids, from the raw dataset its attrs name (None where unknown)."""
    from vsectl.data.raw import is_raw_dataset, load_raw_dataset

    folder = attrs.get("source_dataset")
    if not folder or not is_raw_dataset(folder):
        return [None] * len(ids)
    try:
        raw = load_raw_dataset(folder)
    except DataError as e:
        log.warning("image paths unknown: %s", e)
        return [None] * len(ids)
    split = attrs.get("split")
    entries = raw.split(split) if split in ("train", "dev", "test") else raw.images
    by_id = {e["id"]: str(e["path"]) for e in entries}
    return [by_id.get(i) for i in ids]


def store_source(store: str | Path) -> Source:
    """An extracted (or imported) feature store; image paths come from the raw dataset it was extracted from."""
    from vsectl.data.store import read_store_attrs, read_store_captions
    from vsectl.io import sha256_file
    from vsectl.retrieval.recipe import FeatureRecipe

    store = Path(store).resolve()
    if store.is_dir():
        raise DataError(f"{store} is a folder; --features takes one store file, e.g. {store / 'test.h5'}")
    attrs = read_store_attrs(store)
    texts, cap2img, ids = read_store_captions(store)
    paths = _store_paths(attrs, ids)
    items = [{"id": i, "path": p} for i, p in zip(ids, paths, strict=True)]
    captions = [(t, int(j)) for t, j in zip(texts, cap2img.tolist(), strict=True)]
    recipe = FeatureRecipe.from_attrs(attrs, str(store))
    st = store.stat()
    identity = {"store_fingerprint": attrs.get("fingerprint"), "bytes": st.st_size,
                "sha256_head": sha256_file(store, limit=1 << 20)}
    return Source(kind="features", path=store, items=items, captions=captions, identity=identity,
                  backbone=recipe.provenance() if recipe else None, store=store,
                  extra={"feat_dim": int(attrs["feat_dim"]), "recipe": recipe})


def resolve_source(images: str | Path | None, data: str | Path | None, features: str | Path | None,
                   split: str) -> Source:
    """The one source among --images / --data / --features."""
    given = [(k, v) for k, v in (("images", images), ("data", data), ("features", features)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --images DIR, --data RAW or --features STORE")
    if split not in ("all", "train", "dev", "test"):
        raise ConfigError(f"unknown split {split!r}; use all, train, dev or test")
    kind, path = given[0]
    if kind == "images":
        return folder_source(path)
    if kind == "data":
        return data_source(path, split)
    return store_source(path)
