"""Bring your own data: a Karpathy JSON + image folder as a raw dataset, and SCAN precomp features as HDF5 stores.

`prepare_karpathy` writes the raw-dataset layout of `vsectl.data.raw` without copying images; `import_precomp`
streams `{split}_ims.npy` memmaps into `{split}.h5` stores (`vsectl.data.store`) a chunk of images at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vsectl import __version__
from vsectl.data.raw import (
    DATASET_JSON,
    JSON_SPLIT,
    MANIFEST_JSON,
    RAW_FORMAT,
    RAW_VERSION,
    entry_captions,
)
from vsectl.data.sources import load_split
from vsectl.data.splits import canonical_split, split_file_names
from vsectl.data.store import StoreWriter
from vsectl.data.tokenize import word_tokenize
from vsectl.errors import DataError
from vsectl.io import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)

PRECOMP_SPLITS = ("train", "dev", "test", "testall")
CHUNK_IMAGES = 256  # images read from the memmap at a time: 256 × 36 × 2048 fp32 ≈ 75 MB for BUTD features
HEAD_BYTES = 1 << 20  # provenance hashes the first MiB of each source file (and records its size)
MAX_LISTED = 5  # missing files named in an error


def _null_progress() -> Progress:
    from vsectl.runtime import NullProgress

    return NullProgress()


# ---------------------------------------------------------------------------------------------------------- karpathy


def _read_karpathy(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"caption JSON {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise DataError(f"{path} has no 'images' list; expected a Karpathy dataset_*.json")
    return data


def _normalise_entry(entry: Any, k: int, path: Path) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
        raise DataError(f"{path}: image entry {k} has no 'filename'")
    name = entry["filename"]
    split = JSON_SPLIT.get(str(entry.get("split")))
    if split is None:
        raise DataError(f"{path}: image {name!r} has split {entry.get('split')!r}; use train, restval, val or test")
    sentences = entry.get("sentences", [])
    if not isinstance(sentences, list):
        raise DataError(f"{path}: 'sentences' of image {name!r} is not a list")
    captions = entry_captions(entry)
    for j, text in enumerate(captions):
        if not text:
            raise DataError(f"{path}: sentence {j} of image {name!r} is empty; remove it or fix the JSON")
    out = {key: value for key, value in entry.items() if key not in ("sentences", "split")}
    out["split"] = split
    out["imgid"] = entry.get("imgid", k)
    out["sentences"] = [
        {"raw": text, "tokens": list(s.get("tokens") or word_tokenize(text)) if isinstance(s, dict)
         else word_tokenize(text)}
        for s, text in zip(sentences, captions, strict=True)
    ]
    return out


def _locate(image_root: Path, entry: dict[str, Any], video: bool = False) -> str | None:
    # COCO's JSON names a subfolder (val2014/); accept it, or a flat folder holding every file.
    exists = Path.is_dir if video else Path.is_file
    filepath = entry.get("filepath") or ""
    if filepath and exists(image_root / filepath / entry["filename"]):
        return filepath
    return "" if exists(image_root / entry["filename"]) else None


def prepare_karpathy(
    json_path: str | Path, images: str | Path, out: str | Path, progress: Progress | None = None, video: bool = False
) -> Path:
    """Validate a Karpathy JSON against its image folder and write a raw dataset (images are not copied).

    Splits are normalised to train/val/test (restval → train); every sentence keeps its "raw" text and gets
    "tokens" when it has none; an image is found at `images/<filepath>/<filename>` or `images/<filename>`.

    Args:
        json_path: `dataset_<name>.json` with {"images": [{"filename", "split", "sentences", ...}]}.
        images: the image folder.
        out: output folder for dataset.json and manifest.json (whose "image_root" is `images`, absolute).
        progress: progress reporting.
        video: each entry's filename names a folder of frame images (one video), for `vsectl extract --video`.

    Returns:
        `out`.
    """
    json_path, image_root, out = Path(json_path), Path(images).resolve(), Path(out)
    progress = progress or _null_progress()
    if not image_root.is_dir():
        raise DataError(f"image folder {images} does not exist")
    data = _read_karpathy(json_path)
    entries = [_normalise_entry(e, k, json_path) for k, e in enumerate(data["images"])]
    missing, seen = [], set()
    for entry in progress.track(entries, total=len(entries), description="check images"):
        where = _locate(image_root, entry, video)
        if where is None:
            missing.append(str(Path(entry.get("filepath") or "") / entry["filename"]))
            continue
        entry["filepath"] = where
        key = f"{where}/{entry['filename']}"
        if key in seen:
            raise DataError(f"{json_path}: image {key!r} is listed twice; each image needs one entry")
        seen.add(key)
    if missing:
        what = "video frame folders" if video else "images"
        raise DataError(f"{len(missing)} of {len(entries)} {what} are missing under {image_root}; first: "
                        f"{', '.join(missing[:MAX_LISTED])}")
    splits = {s: {"images": sum(e["split"] == s for e in entries),
                  "captions": sum(len(e["sentences"]) for e in entries if e["split"] == s)} for s in ("train", "val",
                                                                                                      "test")}
    restval = sum(1 for e in data["images"] if e.get("split") == "restval")
    out.mkdir(parents=True, exist_ok=True)
    name = str(data.get("dataset") or json_path.stem.removeprefix("dataset_"))
    dataset_sha = atomic_write_json(out / DATASET_JSON, {"dataset": name, "images": entries},
                                    indent=None, ensure_ascii=False)
    manifest = {"format": RAW_FORMAT, "version": RAW_VERSION, "dataset": name, "image_root": str(image_root),
                "vsectl_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": {"json": str(json_path.resolve()), "json_sha256": sha256_file(json_path)},
                "counts": {"images": len(entries), "captions": sum(len(e["sentences"]) for e in entries),
                           "restval_to_train": restval, "splits": splits},
                "checksums": {DATASET_JSON: dataset_sha}, "modality": "video" if video else "image"}
    atomic_write_json(out / MANIFEST_JSON, manifest, indent=1, ensure_ascii=False, newline=False)
    log.info("%s: %d images (%s) from %s", out, len(entries),
             ", ".join(f"{canonical_split(s)} {v['images']}" for s, v in splits.items()), json_path)
    return out


# ---------------------------------------------------------------------------------------------------------- precomp


def _find_precomp(src: Path, split: str) -> Path | None:
    for name in split_file_names(split):  # SCAN calls it dev; a folder may still say val
        for folder in (src, src / "precomp"):
            if (folder / f"{name}_ims.npy").is_file():
                return folder / f"{name}_ims.npy"
    return None


def _file_facts(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256_first_mib": sha256_file(path, limit=HEAD_BYTES)}


def import_precomp_split(
    ims: Path, split: str, dst: Path, dtype: str, chunk_images: int, progress: Progress
) -> Path:
    """Copy one precomp split into the store `dst`, reading `chunk_images` images at a time through the memmap."""
    src = ims.parent
    data = load_split(src, split)  # validates the DATA-5/6 caption and row invariants
    features = data.features
    stride = features.row_stride
    array = features.array  # (rows, K, D) memmap; only the slices below are read
    n = data.n_images
    stem = ims.name[: -len("_ims.npy")]
    sources = {p.name: _file_facts(p) for p in (ims, src / f"{stem}_caps.txt", src / f"{stem}_ids.txt")
               if p.is_file()}
    attrs = {"source": str(src.resolve()), "source_files": sources, "split": split, "row_stride": stride,
             "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "vsectl_version": __version__,
             "source_dtype": str(array.dtype)}
    starts = range(0, n, chunk_images)
    with StoreWriter(dst, feat_dim=features.feat_dim, dtype=dtype, attrs=attrs) as writer:
        for start in progress.track(starts, total=len(starts), description=f"import {split}"):
            stop = min(n, start + chunk_images)
            block = np.asarray(array[start * stride : stop * stride : stride], dtype=np.float32)  # (b, K, D)
            for j in range(block.shape[0]):
                writer.add_image(data.image_ids[start + j], block[j])
        for text, index in zip(data.captions, data.cap2img, strict=True):
            writer.add_caption(text, int(index))
        if writer.n_images != n:
            raise DataError(f"{ims}: read {writer.n_images} images but expected {n}")
    log.info("imported %s: %d images, %d captions → %s", split, n, data.n_captions, dst)
    return dst


def import_precomp(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    splits: Sequence[str] | None = None,
    force: bool = False,
    chunk_images: int = CHUNK_IMAGES,
    progress: Progress | None = None,
) -> list[Path]:
    """Convert SCAN precomp splits in `src` into `out/{split}.h5` stores; a finished split is skipped.

    Args:
        src: folder with `{split}_ims.npy`, `{split}_caps.txt` and optional `{split}_ids.txt` (or a `precomp/`
            subfolder).
        out: store folder.
        dtype: on-disk feature dtype, "float16" or "float32".
        splits: splits to import; None imports those of train/dev/test/testall that exist.
        force: re-import splits whose store already exists.
        chunk_images: images read from the memmap at a time.
        progress: progress reporting.

    Returns:
        The store paths, one per imported or already present split.
    """
    src, out = Path(src), Path(out)
    progress = progress or _null_progress()
    if dtype not in ("float16", "float32"):
        raise DataError(f"--dtype must be float16 or float32, got {dtype!r}")
    if chunk_images < 1:
        raise ValueError(f"chunk_images must be ≥ 1, got {chunk_images}")
    if not src.is_dir():
        raise DataError(f"precomp folder {src} does not exist")
    found = {s: _find_precomp(src, s) for s in dict.fromkeys(canonical_split(s) for s in (splits or PRECOMP_SPLITS))}
    absent = [s for s, p in found.items() if p is None]
    if splits is not None and absent:
        raise DataError(f"split(s) {absent} not found in {src}: expected {absent[0]}_ims.npy there or in precomp/")
    if all(p is None for p in found.values()):
        raise DataError(f"no precomp splits in {src}: expected files like train_ims.npy and train_caps.txt")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, ims in found.items():
        if ims is None:
            continue
        dst = out / f"{split}.h5"
        if dst.is_file() and not force:
            log.info("%s exists; skipping split %s (use --force to redo it)", dst, split)
        else:
            import_precomp_split(ims, split, dst, dtype, chunk_images, progress)
        written.append(dst)
    return written
