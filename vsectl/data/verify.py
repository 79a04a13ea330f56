"""Check a dataset end to end: counts, caption statistics, NaN/inf features, empty captions, split overlap, images.

`verify_path` accepts a feature root (HDF5 stores and/or SCAN precomp), a single `.h5` store, or a raw dataset folder,
and returns a plain-dict report whose "problems" list is empty when the data is clean. It never stops at the first
problem, unlike the loaders, which refuse bad data.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vsectl.data.raw import DATASET_JSON, is_raw_dataset, load_raw_dataset
from vsectl.data.store import open_store
from vsectl.errors import DataError
from vsectl.io import sha256_file

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)

SCAN_ROWS = 1 << 16  # feature rows checked for NaN/inf per read (32 MB at D = 128, fp32)
SPLIT_ORDER = ("train", "dev", "val", "test", "testall")
SAME_IMAGES = {frozenset(("test", "testall"))}  # COCO's test (1k folds) is a subset of testall (5k) by design
WARN_ONLY = {"first caption"}  # common captions ("A man riding a wave on a surfboard.") recur across COCO images
EXAMPLES = 3


def _stats(values: Iterable[float]) -> dict[str, float] | None:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return None
    return {"min": float(arr.min()), "mean": round(float(arr.mean()), 3), "max": float(arr.max())}


def shared_captions(captions: list[str], cap2img: np.ndarray) -> tuple[int, int, list[str]]:
    """Captions that appear, letter case and spacing aside, on two or more different images of one split.

    An image query's own caption then scores exactly what the other image's copy scores (a text encoder cannot tell
    them apart): a tie that the tie rule decides (`vsectl eval --ties`).

    Returns:
        (distinct shared texts, images carrying one, up to EXAMPLES of the texts, most widely shared first).
    """
    images: dict[str, set[int]] = defaultdict(set)
    for text, image in zip(captions, np.asarray(cap2img).tolist(), strict=True):
        key = " ".join(str(text).casefold().split())
        if key:
            images[key].add(int(image))
    shared = {key: owners for key, owners in images.items() if len(owners) > 1}
    carriers = set().union(*shared.values()) if shared else set()
    first = {}
    for text in captions:
        first.setdefault(" ".join(str(text).casefold().split()), str(text).strip())
    examples = [first[key] for key in sorted(shared, key=lambda k: (-len(shared[k]), k))[:EXAMPLES]]
    return len(shared), len(carriers), examples


def _caption_facts(report: dict[str, Any], captions: list[str], cap2img: np.ndarray, n: int) -> None:
    empty = [k for k, text in enumerate(captions) if not str(text).strip()]
    report["captions"] = len(captions)
    report["empty_captions"] = len(empty)
    report["captions_per_image"] = _stats(np.bincount(cap2img, minlength=n)) if n else None
    report["shared_captions"], report["images_with_shared_captions"], report["shared_caption_examples"] = \
        shared_captions(captions, cap2img)
    if empty:
        report["problems"].append(f"{len(empty)} empty caption(s) (first: caption {empty[0]})")


def _count_nonfinite(
    report: dict[str, Any], blocks: Iterable[tuple[int, np.ndarray]], row_image: Any, n_blocks: int, progress: Progress
) -> None:
    # blocks yield (first row index, (r, ...) features); row_image maps row indices to image indices
    values, bad_images = 0, set()
    for start, block in progress.track(blocks, total=n_blocks, description=f"scan {report['name']}"):
        finite = np.isfinite(block)
        if not finite.all():
            values += int((~finite).sum())
            rows = np.flatnonzero(~finite.reshape(block.shape[0], -1).all(axis=1)) + start
            bad_images.update(int(i) for i in row_image(rows))
    report["nonfinite_values"] = values
    report["nonfinite_images"] = len(bad_images)
    if values:
        report["problems"].append(f"{values} NaN/inf feature values in {len(bad_images)} image(s) "
                                  f"(first: image {min(bad_images)})")


def _new_report(name: str, source: Path, kind: str) -> dict[str, Any]:
    return {"name": name, "source": str(source), "kind": kind, "images": 0, "captions": 0, "problems": []}


def verify_store(path: Path, progress: Progress, name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Report on one HDF5 store. Returns (split report, image ids)."""
    report = _new_report(name or path.stem, path, "store")
    with open_store(path) as f:
        rows = f["features/rows"]
        offsets = np.asarray(f["features/offsets"][()], dtype=np.int64)
        ids = list(f["images/ids"].asstr()[()])
        captions = list(f["captions/text"].asstr()[()])
        cap2img = np.asarray(f["captions/image_index"][()], dtype=np.int64)
        n = len(offsets) - 1
        report.update(images=n, feat_dim=int(rows.shape[1]), dtype=str(rows.dtype),
                      set_size=_stats(np.diff(offsets)))
        if len(ids) != n or offsets[0] != 0 or offsets[-1] != rows.shape[0] or (np.diff(offsets) <= 0).any():
            report["problems"].append(
                f"index is inconsistent: {len(ids)} ids, {n} offset ranges, {rows.shape[0]} rows"
            )
        if len(cap2img) and (cap2img.min() < 0 or cap2img.max() >= n):
            report["problems"].append(f"caption image indices fall outside [0, {n})")
            cap2img = np.clip(cap2img, 0, max(n - 1, 0))
        _caption_facts(report, captions, cap2img, n)
        starts = range(0, rows.shape[0], SCAN_ROWS)
        blocks = ((s, rows[s : s + SCAN_ROWS]) for s in starts)
        _count_nonfinite(report, blocks, lambda r: np.searchsorted(offsets, r, side="right") - 1, len(starts),
                         progress)
    return report, ids


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e


def verify_precomp(ims: Path, split: str, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """Report on one SCAN precomp split (`{split}_ims.npy` + caps + ids). Returns (split report, image ids)."""
    report = _new_report(split, ims, "precomp")
    array = np.load(ims, mmap_mode="r")  # (rows, K, D), never read whole
    if array.ndim != 3:
        raise DataError(f"{ims} has shape {array.shape}; precomp features must be (rows, K, D)")
    n_rows, k, d = array.shape
    caps_path, ids_path = ims.with_name(f"{split}_caps.txt"), ims.with_name(f"{split}_ids.txt")
    captions = _read_lines(caps_path) if caps_path.is_file() else []
    stride = 5 if n_rows == len(captions) and n_rows % 5 == 0 else 1  # DATA-5: rows stored once per caption
    n = n_rows // stride
    row_ids = _read_lines(ids_path) if ids_path.is_file() else [str(i) for i in range(n_rows)]
    ids = [str(i).strip() for i in row_ids[::stride]]
    report.update(images=n, feat_dim=d, dtype=str(array.dtype), set_size=_stats([k] * n) if n else None,
                  row_stride=stride)
    if not caps_path.is_file():
        report["problems"].append(f"{caps_path.name} is missing")
    elif len(captions) != 5 * n:
        report["problems"].append(f"{len(captions)} captions for {n} images; precomp needs 5 per image")
    if len(row_ids) != n_rows:
        report["problems"].append(f"{ids_path.name} has {len(row_ids)} ids for {n_rows} feature rows; there must be "
                                  "one id per row")
    cap2img = np.minimum(np.arange(len(captions)) // 5, max(n - 1, 0))
    _caption_facts(report, captions, cap2img, n)
    per_block = max(1, SCAN_ROWS // max(1, k))
    starts = range(0, n, per_block)
    blocks = ((s, np.asarray(array[s * stride : (s + per_block) * stride : stride])) for s in starts)
    _count_nonfinite(report, blocks, lambda r: r, len(starts), progress)
    return report, ids


def _norm_text(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def verify_raw(folder: Path, progress: Progress) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict]]]:
    """Report on a raw dataset folder: captions, missing or unreadable images, checksums.

    Returns:
        (split reports, overlap keys: {"image id" | "image file" | "title" | "first caption": {split: {key: name to
        show}}}).
    """
    from PIL import Image, UnidentifiedImageError

    data = load_raw_dataset(folder)
    recorded = data.manifest.get("checksums", {})
    reports = {s: _new_report(s, folder, "raw") for s in ("train", "dev", "test")}
    keys: dict[str, dict[str, dict[str, str]]] = {"image id": defaultdict(dict), "image file": defaultdict(dict),
                                                   "title": defaultdict(dict), "first caption": defaultdict(dict)}
    if recorded.get(DATASET_JSON) and sha256_file(data.root / DATASET_JSON) != recorded[DATASET_JSON]:
        reports["train"]["problems"].append("dataset.json differs from the sha256 in manifest.json")
    bad: dict[str, dict[str, list[str]]] = {s: defaultdict(list) for s in reports}
    videos = data.manifest.get("modality") == "video_files"
    for im in progress.track(data.images, total=len(data.images), description="check images"):
        split, path = im["split"], im["path"]
        keys["image id"][split][im["id"]] = im["id"]
        by, text = ("title", im["title"]) if im.get("title") else ("first caption", (im["captions"] or [""])[0])
        keys[by][split][_norm_text(text)] = repr(text)
        try:
            blob = path.read_bytes()
        except OSError:
            bad[split]["missing"].append(str(path))
            continue
        digest = hashlib.sha256(blob).hexdigest()
        keys["image file"][split][digest] = im["filename"]  # same bytes under two names count too
        expected = recorded.get("images", {}).get(im["filename"]) or im.get("sha256")
        if expected and expected != digest:
            bad[split]["checksum mismatch"].append(im["filename"])
        if videos:  # video files: demuxed (no decoding), as extraction's first pass does
            if (kind := _video_problem(path)) is not None:
                bad[split]["unreadable"].append(f"{im['filename']} ({kind})")
            continue
        try:
            Image.open(io.BytesIO(blob)).verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            bad[split]["unreadable"].append(f"{im['filename']} ({type(e).__name__})")
    for split, report in reports.items():
        images = data.split(split)
        captions = [c for im in images for c in im["captions"]]
        cap2img = np.repeat(np.arange(len(images)), [len(im["captions"]) for im in images]).astype(np.int64)
        report["images"] = len(images)
        _caption_facts(report, captions, cap2img, len(images))
        report["missing_images"] = len(bad[split].get("missing", []))
        report["unreadable_images"] = len(bad[split].get("unreadable", []))
        for what, names in bad[split].items():
            report["problems"].append(f"{len(names)} {what} image(s) (first: {', '.join(names[:EXAMPLES])})")
    return {s: r for s, r in reports.items() if r["images"] or r["problems"]}, keys


def _video_problem(path: Path) -> str | None:
    """The `UnreadableVideo` kind of a video file (empty, corrupt, truncated, audio_only, ...), None when usable."""
    from vsectl.data.video_files import UnreadableVideo, probe

    try:
        probe(path)
    except UnreadableVideo as e:
        return e.kind
    return None


def _feature_splits(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in (root / "precomp", root):  # the root wins, and a store wins over precomp, as in load_split
        if folder.is_dir():
            found.update({p.name[: -len("_ims.npy")]: p for p in folder.glob("*_ims.npy")})
    found.update({p.stem: p for p in root.glob("*.h5")})
    return dict(sorted(found.items(), key=lambda kv: (SPLIT_ORDER + (kv[0],)).index(kv[0])))


def _overlaps(keys: dict[str, dict[str, dict[str, str]]]) -> list[dict[str, Any]]:
    found = []
    for by, per_split in keys.items():
        for a, b in itertools.combinations(per_split, 2):
            if frozenset((a, b)) in SAME_IMAGES:
                continue
            shared = sorted(set(per_split[a]) & set(per_split[b]) - {""})
            if shared:
                examples = [per_split[a][k] for k in shared[:EXAMPLES]]
                found.append({"splits": [a, b], "by": by, "count": len(shared), "examples": examples})
    return found


def verify_path(path: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Verify a data root, a single `.h5` store or a raw dataset folder.

    Returns:
        {"path", "kind", "splits": {name: report}, "overlaps": [...], "problems": [str], "warnings": [str] (shared
        first captions across splits, which are common in COCO; identical captions on different images within a
        split), "ok": bool}. A split report has images, captions, captions_per_image and set_size ({min, mean, max}),
        feat_dim, dtype, nonfinite_values, nonfinite_images, empty_captions, shared_captions (texts on two or more
        images), images_with_shared_captions, shared_caption_examples, (raw) missing_images and unreadable_images,
        and its own "problems".
    """
    from vsectl.runtime import NullProgress

    path, progress = Path(path), progress or NullProgress()
    keys: dict[str, dict[str, dict[str, str]]] = {"image id": {}}
    if path.is_file():
        if path.suffix != ".h5":
            raise DataError(f"{path} is not a .h5 store; pass a store, a data folder or a raw dataset folder")
        report, ids = verify_store(path, progress)
        kind, splits = "store", {report["name"]: report}
    elif is_raw_dataset(path):
        kind = "raw"
        splits, keys = verify_raw(path, progress)
    elif path.is_dir():
        found = _feature_splits(path)
        if not found:
            raise DataError(f"{path} holds no dataset: expected {{split}}.h5, {{split}}_ims.npy or dataset.json + "
                            "manifest.json")
        kind, splits = "features", {}
        for split, file in found.items():
            report, ids = (verify_store(file, progress, split) if file.suffix == ".h5"
                           else verify_precomp(file, split, progress))
            splits[split] = report
            keys["image id"][split] = {i: i for i in ids}
    else:
        raise DataError(f"{path} does not exist")
    overlaps = _overlaps(keys)
    problems = [f"{name}: {p}" for name, r in splits.items() for p in r["problems"]]
    shared = {id(o): f"{o['splits'][0]} and {o['splits'][1]} share {o['count']} {o['by']}(s) (first: "
                     f"{', '.join(map(str, o['examples']))})" for o in overlaps}
    problems += [shared[id(o)] for o in overlaps if o["by"] not in WARN_ONLY]
    warnings = [shared[id(o)] for o in overlaps if o["by"] in WARN_ONLY]
    warnings += [f"{name}: {r['images']} images and no captions: a search collection (for `vsectl embed`); train and "
                 "eval need captions" for name, r in splits.items() if r.get("images") and not r.get("captions")]
    warnings += [f"{name}: {r['shared_captions']} caption text(s) appear on more than one image "
                 f"({r['images_with_shared_captions']} images carry one; e.g. "
                 f"{', '.join(repr(t) for t in r['shared_caption_examples'])}): such an image's own caption ties "
                 "exactly with another image's copy, and the tie rule decides those queries (vsectl eval --ties)"
                 for name, r in splits.items() if r.get("shared_captions")]
    log.info("verified %s (%s): %d problem(s)", path, kind, len(problems))
    return {"path": str(path), "kind": kind, "splits": splits, "overlaps": overlaps, "problems": problems,
            "warnings": warnings, "ok": not problems}
