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
        kind: "images" (a plain folder), "data" (a raw dataset) or "features" (extracted stores).
        path: the folder or store, resolved.
        items: one {"id", "path"} per item, in collection order.
        captions: (text, item position) pairs.
        identity: what decides whether finished shards can be reused (a hash of the listing or the source files).
        backbone: the feature provenance recorded in meta.json.
        store: the (first) store for "features" (its feature sets are read one image at a time).
        stores: every store of "features", in collection order (one file, or a feature folder's splits).
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
    stores: list[Path] = field(default_factory=list)
    root: Path | None = None  # the folder every image file lies under (what `serve` may show), None if unknown


def list_images(folder: Path) -> list[Path]:
    """Image files (by suffix) under `folder`, recursively, in sorted relative-path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _folder_items(folder: str | Path, what: str, files: str, files_of: Any, suffixes: Any
                  ) -> tuple[Path, list[dict[str, Any]]]:
    """A plain folder's `files` (e.g. "video files") of one kind (`what`: "video") as items: ids are the paths relative
    to the folder (refused when there are none)."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    found = files_of(folder)
    if not found:
        raise DataError(f"{folder} holds no {files} ({', '.join(sorted(suffixes))}); give a folder of {what}s")
    return folder, [{"id": p.relative_to(folder).as_posix(), "path": str(p)} for p in found]


def folder_source(folder: str | Path) -> Source:
    """A plain folder of images (no captions); ids are the paths relative to the folder."""
    folder, items = _folder_items(folder, "image", "images", list_images, IMAGE_SUFFIXES)
    listing = hashlib.sha256("\n".join(i["id"] for i in items).encode("utf-8")).hexdigest()
    return Source(kind="images", path=folder, items=items, captions=[], identity={"listing_sha256": listing},
                  root=folder)


def data_source(data: str | Path, split: str) -> Source:
    """A prepared raw dataset (dataset.json + manifest.json): its images and captions, one split or all."""
    from vsectl.data.raw import load_raw_dataset
    from vsectl.io import sha256_file

    raw = load_raw_dataset(data)
    if raw.manifest.get("modality") == "video":
        raise ConfigError(f"{raw.root} holds videos (folders of frames); embed an extracted store with --features")
    videos = raw.manifest.get("modality") == "video_files"
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
    return Source(kind="data", path=raw.root, items=items, captions=captions, identity=identity, split=split,
                  extra={"videos": videos}, root=Path(raw.image_root))


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


def precomp_source(ims: Path) -> Source:
    """SCAN precomp features (`<split>_ims.npy` with `<split>_caps.txt`, optional `_ids.txt`), as training reads them.

    No backbone is recorded with such files, so only their width is checked against the run.
    """
    from vsectl.data.sources import load_split

    name = ims.name
    if not name.endswith("_ims.npy"):
        raise DataError(f"{ims} is not a precomp feature file (<split>_ims.npy with <split>_caps.txt beside it)")
    split = load_split(ims.parent, name[: -len("_ims.npy")])
    items = [{"id": i, "path": None} for i in split.image_ids]
    captions = [(t, int(j)) for t, j in zip(split.captions, split.cap2img.tolist(), strict=True)]
    st = ims.stat()
    identity = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "captions_sha256": hashlib.sha256(
        "\n".join(split.captions).encode("utf-8")).hexdigest()}
    return Source(kind="features", path=ims, items=items, captions=captions, identity=identity, store=ims,
                  extra={"feat_dim": split.features.feat_dim, "recipe": None, "open": lambda: split.features})


def store_source(store: str | Path) -> Source:
    """An extracted (or imported) feature store, a folder of them (its splits one after the other), or a precomp
    `<split>_ims.npy`; image paths come from the raw dataset each store was extracted from."""
    store = Path(store).resolve()
    if store.suffix == ".npy":
        return precomp_source(store)
    if store.is_dir():
        return folder_store_source(store)
    return _one_store_source(store)


def folder_store_source(folder: Path) -> Source:
    """Every `<split>.h5` of a feature folder as one collection (train, dev, test, then the others)."""
    from vsectl.retrieval.stored import folder_stores

    parts = [_one_store_source(path) for path in folder_stores(folder)]
    dims = {p.extra["feat_dim"] for p in parts}
    if len(dims) > 1:
        raise DataError(f"the stores in {folder} hold features of different sizes ({sorted(dims)}); embed one store")
    recipes = {p.path.name: p.extra["recipe"] for p in parts}
    first = parts[0].extra["recipe"]
    differ = [name for name, r in recipes.items() if (r is None) != (first is None) or r and r.differences(first)]
    if differ:
        raise DataError(f"the stores in {folder} were made with different feature recipes ({', '.join(differ)} "
                        f"differ from {parts[0].path.name}); embed them one store at a time")
    items, captions = [], []
    for part in parts:
        captions.extend((text, pos + len(items)) for text, pos in part.captions)
        items.extend(part.items)
    identity = {"stores": [{"file": p.path.name, **p.identity} for p in parts]}
    return Source(kind="features", path=folder, items=items, captions=captions, identity=identity,
                  backbone=parts[0].backbone, store=parts[0].store, stores=[p.path for p in parts],
                  extra={"feat_dim": dims.pop(), "recipe": first}, root=_common_root([p.root for p in parts]))


def _one_store_source(store: Path) -> Source:
    from vsectl.data.store import read_store_attrs, read_store_captions
    from vsectl.io import sha256_file
    from vsectl.retrieval.recipe import FeatureRecipe

    attrs = read_store_attrs(store)
    texts, cap2img, ids = read_store_captions(store)
    paths = _store_paths(attrs, ids)
    items = [{"id": i, "path": p} for i, p in zip(ids, paths, strict=True)]
    captions = [(t, int(j)) for t, j in zip(texts, cap2img.tolist(), strict=True)]
    recipe = FeatureRecipe.from_attrs(attrs, str(store))
    st = store.stat()
    identity = {"store_fingerprint": attrs.get("fingerprint"), "bytes": st.st_size,
                "sha256_head": sha256_file(store, limit=1 << 20)}
    folders = [os.path.dirname(p) for p in paths if p]
    return Source(kind="features", path=store, items=items, captions=captions, identity=identity,
                  backbone=recipe.provenance() if recipe else None, store=store, stores=[store],
                  extra={"feat_dim": int(attrs["feat_dim"]), "recipe": recipe},
                  root=_common_root(folders))


def _common_root(folders: list[Any]) -> Path | None:
    """The folder all of `folders` lie under; None when one is unknown or there are none."""
    if not folders or any(f is None for f in folders):
        return None
    return Path(os.path.commonpath([str(f) for f in folders]))


def video_folder_source(folder: str | Path) -> Source:
    """A plain folder of video files (no captions); ids are the paths relative to the folder."""
    from vsectl.data.video_files import VIDEO_SUFFIXES, list_videos

    folder, items = _folder_items(folder, "video", "video files", list_videos, VIDEO_SUFFIXES)
    names = "\n".join(f"{i['id']}:{Path(i['path']).stat().st_size}" for i in items)
    listing = hashlib.sha256(names.encode("utf-8")).hexdigest()
    return Source(kind="videos", path=folder, items=items, captions=[], identity={"listing_sha256": listing},
                  extra={"videos": True}, root=folder)


def resolve_source(images: str | Path | None, data: str | Path | None, features: str | Path | None,
                   split: str, videos: str | Path | None = None, shards: str | Path | None = None) -> Source:
    """The one source among --images / --videos / --data / --features / --shards."""
    given = [(k, v) for k, v in (("images", images), ("videos", videos), ("data", data), ("features", features),
                                 ("shards", shards)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --images DIR, --videos DIR, --data RAW, --features STORE or "
                          "--shards TARS")
    from vsectl.data.splits import canonical_split

    split = canonical_split(split)  # val is dev, as everywhere
    if split not in ("all", "train", "dev", "test"):
        raise ConfigError(f"unknown split {split!r}; use all, train, dev (or val) or test")
    kind, path = given[0]
    if kind == "images":
        return folder_source(path)
    if kind == "videos":
        return video_folder_source(path)
    if kind == "data":
        return data_source(path, split)
    if kind == "shards":
        return tar_source(path)
    return store_source(path)


def tar_source(spec: str | Path) -> Source:
    """Tar shards as an embed source; identity: each shard's name, size and modification time."""
    from vsectl.data.tar_shards import resolve_shards

    shards = resolve_shards(spec)
    listing = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in shards)
    identity = {"shards": len(shards), "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return Source(kind="shards", path=shards[0].parent, items=[], captions=[], identity=identity,
                  extra={"shards": shards, "pattern": str(spec)},
                  root=Path(os.path.commonpath([str(p.resolve().parent) for p in shards])))
