"""Raw image-caption datasets on disk: the folder layout shared by `data prepare` and `extract`, and its reader.

A raw dataset folder holds:

    dataset.json    Karpathy-style captions: {"dataset": name, "images": [{"filename": "x.png", "filepath": "sub"
                    (optional), "imgid": int, "split": "train" | "val" | "test", "sentences": [{"raw": str,
                    "tokens": [...]}, ...], ...}]}. Any number of sentences per image; extra keys (e.g. "sha256",
                    "source", "cocoid") are kept. Split names are normalised (Karpathy's "restval" becomes "train").
    manifest.json   {"format": "vsectl-raw", "version": 1, "dataset": name, "image_root": folder of the images
                    (relative to the dataset folder, e.g. "images", or absolute for data left in place), "counts":
                    {...}, "checksums": {"dataset.json": sha256, ...}, ...provenance}.
    images/         only when the images were copied in (openclipart); otherwise `image_root` points elsewhere.

Image i's file is `image_root / filepath / filename` (or `image_root / filename` without a filepath). Readers call the
Karpathy "val" split "dev".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsectl.errors import DataError
from vsectl.io import atomic_write_json, sha256_file

RAW_FORMAT = "vsectl-raw"
RAW_VERSION = 1
DATASET_JSON = "dataset.json"
MANIFEST_JSON = "manifest.json"
SPLITS = ("train", "dev", "test")
JSON_SPLIT = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}  # → dataset.json
READER_SPLIT = {"train": "train", "val": "dev", "test": "test"}  # dataset.json → RawDataset
ID_KEYS = ("cocoid", "imgid", "id", "filename")  # same precedence as captions.load_karpathy


def count_lines(counts: dict[str, Any]) -> list[str]:
    """The "Counts: …" and "Splits: …" lines of a prepared dataset's PROVENANCE.md."""
    return ["Counts: " + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)),
            "Splits: " + ", ".join(f"{s} {v['images']} images / {v['captions']} captions"
                                   for s, v in counts.get("splits", {}).items())]


def write_raw_dataset(out: Path, dataset: str, entries: list[dict[str, Any]], png_sha: dict[str, str], *,
                      counts: dict[str, Any], source: dict[str, Any], params: dict[str, Any], license_text: str,
                      provenance: Callable[[dict[str, Any]], str], seconds: float) -> None:
    """Finish a prepared image dataset in `out`: split counts, stale images removed, then dataset.json, LICENSE.txt,
    PROVENANCE.md (`provenance(counts)`) and, last, manifest.json with every checksum (its presence means finished).

    `counts` gains "splits" (images and captions per dataset.json split).
    """
    from vsectl import __version__
    from vsectl.io import atomic_write_text

    counts["splits"] = {s: {"images": sum(1 for e in entries if e["split"] == s),
                            "captions": sum(len(e["sentences"]) for e in entries if e["split"] == s)}
                        for s in ("train", "val", "test")}
    for stale in (out / "images").glob("*.png"):
        if stale.name not in png_sha:
            stale.unlink()
    dataset_sha = atomic_write_json(out / DATASET_JSON, {"dataset": dataset, "images": entries},
                                    indent=None, ensure_ascii=False)
    atomic_write_text(out / "LICENSE.txt", license_text)
    atomic_write_text(out / "PROVENANCE.md", provenance(counts))
    manifest = {"format": RAW_FORMAT, "version": RAW_VERSION, "dataset": dataset, "image_root": "images",
                "vsectl_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(seconds, 1), "source": source, "params": params, "counts": counts,
                "checksums": {DATASET_JSON: dataset_sha, "images": png_sha}}
    atomic_write_json(out / MANIFEST_JSON, manifest, indent=1, ensure_ascii=False, newline=False)


def finished_dataset(out: Path, same_source: Callable[[dict[str, Any]], bool], params: dict[str, Any]) -> bool:
    """Whether `out` holds a complete dataset written by `write_raw_dataset` from the same source (`same_source` of
    the manifest's "source") with the same params: dataset.json matches its checksum and every image is there."""
    try:
        manifest = json.loads((out / MANIFEST_JSON).read_text(encoding="utf-8"))
        if not same_source(manifest["source"]) or manifest.get("params") != params:
            return False
        if sha256_file(out / DATASET_JSON) != manifest["checksums"][DATASET_JSON]:
            return False
        return all((out / "images" / name).is_file() for name in manifest["checksums"]["images"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError):  # missing, unreadable or of another layout
        return False


def image_id(entry: dict[str, Any]) -> str:
    """The id of a dataset.json entry: cocoid, else imgid, else id, else filename, as a string."""
    for key in ID_KEYS:
        if entry.get(key) is not None:
            return str(entry[key])
    raise DataError(f"an image entry has none of the id fields {ID_KEYS}: {str(entry)[:120]}")


def entry_relpath(entry: dict[str, Any]) -> Path:
    """The image file of a dataset.json entry relative to the image root (`filepath/filename`)."""
    filepath = entry.get("filepath") or ""
    return Path(filepath) / entry["filename"] if filepath else Path(entry["filename"])


def entry_captions(entry: dict[str, Any]) -> list[str]:
    """The stripped raw sentences of a dataset.json entry (tokens joined when "raw" is absent)."""
    out = []
    for sent in entry.get("sentences", []):
        raw = sent.get("raw") if isinstance(sent, dict) else sent
        if raw is None and isinstance(sent, dict):
            raw = " ".join(sent.get("tokens", []))
        out.append(str(raw).strip())
    return out


@dataclass
class RawDataset:
    """A raw image-caption dataset folder, read by `load_raw_dataset`.

    Attributes:
        root: the dataset folder (holding dataset.json and manifest.json).
        image_root: the resolved folder the image paths are relative to.
        images: one dict per image in dataset.json order: "id" (str), "path" (resolved Path), "split" ("train",
            "dev" or "test"), "captions" (list[str], possibly empty), "filename", and "sha256" and "title" when known.
        name: the dataset name from dataset.json.
        manifest: the parsed manifest.json.
    """

    root: Path
    image_root: Path
    images: list[dict[str, Any]]
    name: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[dict[str, Any]]:
        """The images of split `name` ("train", "dev"/"val" or "test"), in dataset order."""
        key = READER_SPLIT.get(name, name)
        if key not in SPLITS:
            raise DataError(f"unknown split {name!r}; a raw dataset has {list(SPLITS)}")
        return [im for im in self.images if im["split"] == key]

    def __len__(self) -> int:
        return len(self.images)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path} does not exist; a raw dataset folder needs {what} (made by `vsectl data prepare`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `vsectl data prepare`") from e


def is_raw_dataset(folder: str | Path) -> bool:
    """True when `folder` holds a dataset.json and a manifest.json."""
    folder = Path(folder)
    return (folder / DATASET_JSON).is_file() and (folder / MANIFEST_JSON).is_file()


def load_raw_dataset(folder: str | Path, check_files: bool = False) -> RawDataset:
    """Read a raw dataset folder (layout in the module docstring).

    Args:
        folder: the dataset folder.
        check_files: also check that every image file exists (one stat per image).

    Returns:
        The dataset, images in dataset.json order with splits named train/dev/test.
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DataError(f"raw dataset folder {folder} does not exist")
    manifest = _read_json(root / MANIFEST_JSON, MANIFEST_JSON)
    data = _read_json(root / DATASET_JSON, DATASET_JSON)
    if not isinstance(manifest, dict) or "image_root" not in manifest:
        raise DataError(f"{root / MANIFEST_JSON} has no 'image_root'; re-run `vsectl data prepare`")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{root / DATASET_JSON} has no 'images' list; it must be a Karpathy-style JSON")
    image_root = (root / manifest["image_root"]).resolve()  # an absolute image_root stays as it is
    images = []
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"{root / DATASET_JSON}: image entry {k} has no 'filename'")
        split = READER_SPLIT.get(JSON_SPLIT.get(entry.get("split", ""), ""))
        if split is None:
            raise DataError(
                f"{root / DATASET_JSON}: image {entry['filename']!r} has unknown split {entry.get('split')!r}"
            )
        item = {"id": image_id(entry), "path": image_root / entry_relpath(entry), "split": split,
                "captions": entry_captions(entry), "filename": entry["filename"]}
        for key in ("sha256", "title"):
            if entry.get(key):
                item[key] = entry[key]
        images.append(item)
    if check_files:
        missing = [str(im["path"]) for im in images if not im["path"].is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(images)} images are missing under {image_root}; first: {missing[:3]}"
            )
    return RawDataset(root=root, image_root=image_root, images=images, name=str(data.get("dataset", "")),
                      manifest=manifest)
