"""MSR-VTT and VATEX annotation files → a raw video dataset over the user's video files (nothing is copied).

The published layouts read here:
- MSR-VTT: `train_val_videodatainfo.json` / `test_videodatainfo.json` (or `MSRVTT_data.json`, all 10,000 videos):
  {"videos": [{"video_id": "video0", "split": "train" | "validate" | "test", ...}], "sentences": [{"video_id",
  "caption", "sen_id"}]}; and the 1k-A split lists: `MSRVTT_train.9k.csv` (or .7k: a `video_id` column) and
  `MSRVTT_JSFUSION_test.csv` (columns key, vid_key, video_id, sentence: one caption per test video).
- VATEX: `vatex_training_v1.0.json`, `vatex_validation_v1.0.json` (and the public test's English JSON): a list of
  {"videoID": "<youtube id>_<start>_<end>", "enCap": [10 English captions], "chCap": [...]}.
Each video is found as `<id>.<ext>` anywhere under the video folder (ext one of `VIDEO_SUFFIXES`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vsectl.data.raw import DATASET_JSON, MANIFEST_JSON, RAW_FORMAT, RAW_VERSION
from vsectl.data.tokenize import word_tokenize
from vsectl.data.video_files import MODALITY, VIDEO_SUFFIXES
from vsectl.errors import DataError
from vsectl.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MAX_LISTED = 5  # missing videos named in a warning
MSRVTT_EXPECTED = ("an MSR-VTT annotation JSON: an object with 'videos' [{'video_id', 'split'}, ...] and 'sentences' "
                   "[{'video_id', 'caption'}, ...] (train_val_videodatainfo.json, test_videodatainfo.json or "
                   "MSRVTT_data.json)")
LIST_EXPECTED = ("a split list: a CSV with a 'video_id' column (MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv) or "
                 "one video id per line")
VATEX_EXPECTED = ("a VATEX annotation JSON: a list of {'videoID', 'enCap': [English captions]} "
                  "(vatex_training_v1.0.json, vatex_validation_v1.0.json)")
MSRVTT_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _load_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not JSON; expected {expected}") from None


# ------------------------------------------------------------------------------------------------------ MSR-VTT


def read_msrvtt_json(path: str | Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An MSR-VTT annotation JSON → ({video_id: "train" | "val" | "test"}, {video_id: captions in sen_id order})."""
    path = Path(path)
    data = _load_json(path, MSRVTT_EXPECTED)
    videos, sentences = (data.get("videos"), data.get("sentences")) if isinstance(data, dict) else (None, None)
    if not isinstance(videos, list) or not isinstance(sentences, list):
        raise DataError(f"{path} has an unknown layout; expected {MSRVTT_EXPECTED}")
    splits: dict[str, str] = {}
    for v in videos:
        if not isinstance(v, dict) or not isinstance(v.get("video_id"), str) or v.get("split") not in MSRVTT_SPLITS:
            raise DataError(f"{path}: video entry {str(v)[:80]} lacks 'video_id' or a split of train, validate or "
                            f"test; expected {MSRVTT_EXPECTED}")
        splits[v["video_id"]] = MSRVTT_SPLITS[v["split"]]
    ordered: dict[str, list[tuple[int, str]]] = {}
    for k, s in enumerate(sentences):
        if not isinstance(s, dict) or not isinstance(s.get("video_id"), str) or not isinstance(s.get("caption"), str):
            raise DataError(f"{path}: sentence entry {str(s)[:80]} lacks 'video_id' or 'caption'; expected "
                            f"{MSRVTT_EXPECTED}")
        ordered.setdefault(s["video_id"], []).append((int(s.get("sen_id", k)), s["caption"].strip()))
    return splits, {v: [c for _, c in sorted(caps) if c] for v, caps in ordered.items()}


def read_id_list(path: str | Path) -> list[tuple[str, str | None]]:
    """A split list → [(video_id, sentence or None)]: a CSV with a `video_id` column (and `sentence` for the
    JSFusion test), or one id per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected {LIST_EXPECTED}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError(f"{path} is empty; expected {LIST_EXPECTED}")
    header = next(csv.reader([lines[0]]))
    if "video_id" in header:
        rows = list(csv.DictReader(lines))
        return [(r["video_id"].strip(), (r.get("sentence") or "").strip() or None) for r in rows if r["video_id"]]
    if "," in lines[0] or " " in lines[0].strip():
        raise DataError(f"{path} has no 'video_id' column (first line {lines[0][:60]!r}); expected {LIST_EXPECTED}")
    return [(line.strip(), None) for line in lines if line.strip()]


def msrvtt_entries(annotations: Iterable[str | Path], train_list: str | Path | None = None,
                   test_list: str | Path | None = None) -> list[dict[str, Any]]:
    """MSR-VTT videos with split and captions: the official split, or 1k-A when the lists are given.

    Test: the `test_list` videos (each with its list sentence when the list has one, as JSFusion's 1k-A test does),
    else the official test videos. Dev: the official "validate" videos that are not test. Train: the `train_list`
    videos (else the official train videos) that are neither dev nor test.

    Returns:
        [{"id", "split" ("train" | "val" | "test"), "captions"}] in annotation order.
    """
    splits: dict[str, str] = {}
    captions: dict[str, list[str]] = {}
    for path in annotations:
        s, c = read_msrvtt_json(path)
        splits.update(s)
        for v, caps in c.items():
            captions.setdefault(v, []).extend(caps)
    if not splits:
        raise DataError("no MSR-VTT videos in the annotation files; expected " + MSRVTT_EXPECTED)
    tests = read_id_list(test_list) if test_list else [(v, None) for v, s in splits.items() if s == "test"]
    test_caption = {v: sentence for v, sentence in tests}
    dev = [v for v, s in splits.items() if s == "val" and v not in test_caption]
    train_ids = [v for v, _ in read_id_list(train_list)] if train_list else [v for v, s in splits.items()
                                                                              if s == "train"]
    split_of = {**{v: "train" for v in train_ids}, **{v: "val" for v in dev}, **{v: "test" for v in test_caption}}
    unknown = [v for v in split_of if v not in splits]
    if unknown:
        raise DataError(f"{len(unknown)} listed videos are not in the annotation JSON(s), e.g. {unknown[0]}; give "
                        "every annotation file (train_val_videodatainfo.json and test_videodatainfo.json)")
    order = [v for v in splits if v in split_of]
    return [{"id": v, "split": split_of[v],
             "captions": [test_caption[v]] if test_caption.get(v) else captions.get(v, [])} for v in order]


# ------------------------------------------------------------------------------------------------------ VATEX


def read_vatex_json(path: str | Path) -> list[tuple[str, list[str]]]:
    """A VATEX annotation JSON → [(videoID, English captions)] in file order."""
    path = Path(path)
    data = _load_json(path, VATEX_EXPECTED)
    if not isinstance(data, list):
        raise DataError(f"{path} has an unknown layout; expected {VATEX_EXPECTED}")
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("videoID"), str) or not isinstance(
                item.get("enCap", []), list):
            raise DataError(f"{path}: entry {str(item)[:80]} lacks 'videoID' or an 'enCap' list; expected "
                            f"{VATEX_EXPECTED}")
        out.append((item["videoID"], [str(c).strip() for c in item.get("enCap", []) if str(c).strip()]))
    return out


def vatex_entries(train: str | Path, val: str | Path, test: str | Path | None = None,
                  test_list: str | Path | None = None) -> list[dict[str, Any]]:
    """VATEX videos with split and English captions.

    Train: the training JSON. Test: the `test` JSON when given (dev is then the whole validation JSON); else the
    validation videos named in `test_list`; else the second half of the validation JSON in file order. Dev: the
    validation videos that are not test.
    """
    entries = [{"id": v, "split": "train", "captions": c} for v, c in read_vatex_json(train)]
    val_items = read_vatex_json(val)
    if test is not None:
        entries += [{"id": v, "split": "val", "captions": c} for v, c in val_items]
        entries += [{"id": v, "split": "test", "captions": c} for v, c in read_vatex_json(test)]
        return entries
    if test_list is not None:
        listed = {v for v, _ in read_id_list(test_list)}
        is_test = [v in listed for v, _ in val_items]
    else:
        is_test = [k >= len(val_items) // 2 for k in range(len(val_items))]
    entries += [{"id": v, "split": "test" if t else "val", "captions": c}
                for (v, c), t in zip(val_items, is_test, strict=True)]
    return entries


# ------------------------------------------------------------------------------------------------------ writing


def index_videos(folder: Path) -> dict[str, Path]:
    """{file stem: path relative to `folder`} of every video file under it (the first of equal stems wins)."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.suffix.lower() in VIDEO_SUFFIXES:
                found.setdefault(p.stem, p.relative_to(folder))
    return found


def write_video_dataset(out: str | Path, name: str, entries: list[dict[str, Any]], videos: str | Path,
                        source: dict[str, Any]) -> Path:
    """Write dataset.json and (last) manifest.json for `entries` whose videos are under `videos`.

    Videos not found are left out and counted (warned, with the first few ids); none found is an error.
    """
    out, root = Path(out), Path(videos).resolve()
    if not root.is_dir():
        raise DataError(f"video folder {videos} does not exist")
    found = index_videos(root)
    kept, missing = [], []
    for e in entries:
        rel = found.get(e["id"])
        if rel is None:
            missing.append(e)
            continue
        if not e["captions"]:
            raise DataError(f"video {e['id']} has no caption in the annotations")
        kept.append({"filename": rel.name, "filepath": rel.parent.as_posix() if rel.parent != Path(".") else "",
                     "id": e["id"], "split": e["split"],
                     "sentences": [{"raw": c, "tokens": word_tokenize(c)} for c in e["captions"]]})
    if not kept:
        raise DataError(f"none of the {len(entries)} annotated videos is under {root}; expected files named "
                        f"<video id>.mp4 (or {', '.join(sorted(VIDEO_SUFFIXES - {'.mp4'}))}), e.g. "
                        f"{entries[0]['id']}.mp4")
    counts = {s: {"images": sum(e["split"] == s for e in kept),
                  "captions": sum(len(e["sentences"]) for e in kept if e["split"] == s),
                  "missing": sum(e["split"] == s for e in missing)} for s in ("train", "val", "test")}
    if missing:
        log.warning("%d of %d annotated videos are not under %s and were left out (per split: %s); first: %s",
                    len(missing), len(entries), root, ", ".join(f"{s} {v['missing']}" for s, v in counts.items()),
                    ", ".join(e["id"] for e in missing[:MAX_LISTED]))
    out.mkdir(parents=True, exist_ok=True)
    from vsectl import __version__

    dataset_sha = atomic_write_json(out / DATASET_JSON, {"dataset": name, "images": kept}, indent=None,
                                    ensure_ascii=False)
    manifest = {"format": RAW_FORMAT, "version": RAW_VERSION, "dataset": name, "image_root": str(root),
                "modality": MODALITY, "vsectl_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": source, "counts": {"videos": len(kept), "missing_videos": len(missing), "splits": counts},
                "checksums": {DATASET_JSON: dataset_sha}}
    atomic_write_json(out / MANIFEST_JSON, manifest, indent=1, ensure_ascii=False, newline=False)
    log.info("%s: %d videos (%s)", out, len(kept), ", ".join(f"{s} {v['images']}" for s, v in counts.items()))
    return out


def _sources(**files: str | Path | list | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in files.items():
        for k, p in enumerate(value if isinstance(value, list) else [value]):
            if p is not None:
                out[f"{key}{k if isinstance(value, list) else ''}"] = {"path": str(Path(p).resolve()),
                                                                       "sha256": sha256_file(p)}
    return out


def prepare_msrvtt(annotations: list[str | Path], videos: str | Path, out: str | Path, *,
                   train_list: str | Path | None = None, test_list: str | Path | None = None) -> Path:
    """MSR-VTT annotation JSON(s) (+ the 1k-A lists) and the video folder → a raw video dataset in `out`."""
    if not annotations:
        raise DataError("give the MSR-VTT annotation JSON(s) with --json (train_val_videodatainfo.json and "
                        "test_videodatainfo.json, or MSRVTT_data.json)")
    entries = msrvtt_entries(annotations, train_list, test_list)
    source = _sources(json=list(annotations), train_list=train_list, test_list=test_list)
    source["scheme"] = "1k-A lists" if test_list else "official splits"
    return write_video_dataset(out, "msrvtt", entries, videos, source)


def prepare_vatex(train: str | Path, val: str | Path, videos: str | Path, out: str | Path, *,
                  test: str | Path | None = None, test_list: str | Path | None = None) -> Path:
    """VATEX training and validation JSONs (+ a test JSON or test id list) and the video folder → a raw dataset."""
    if test is not None and test_list is not None:
        raise DataError("give --test (a VATEX JSON) or --test-list (video ids from the validation JSON), not both")
    entries = vatex_entries(train, val, test, test_list)
    source = _sources(train=train, val=val, test=test, test_list=test_list)
    return write_video_dataset(out, "vatex", entries, videos, source)
