"""ECCV Caption, CxC and plausible-match ground truth for COCO 5K, keyed by COCO ids and mapped onto a split's order.

The annotations come from the `eccv-caption` package (the `eccv` extra, MIT): its `eccv_caption/data/` folder holds
`{eccv,cxc,original}_{image_to_caption,caption_to_image}.json` ({COCO id: [COCO ids]}) and `coco_test_ids.npy`, the
25,000 caption ids of the COCO 5K `testall` split in its standard order (captions 5j…5j+4 belong to image j). The
plausible-match files (`pm_*.json`, same layout) are not in the package; they are read from a folder the user gives.
The package is only read from, never imported.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.scoring.multi_positive import PositiveSets

log = logging.getLogger(__name__)

EXTRA = "eccv"
PACKAGE = "eccv_caption"
MISSING_EXTRA = (f"ECCV Caption and CxC need the annotations of the '{EXTRA}' extra, which is not installed: "
                 f"pip install 'vsectl[{EXTRA}]'")
ANNOTATIONS = ("eccv", "cxc", "original")  # sets shipped in the package
PLAUSIBLE = "pm"  # plausible-match set, given as a folder
COCO_5K_CAPTIONS = 25_000
CAPTIONS_PER_IMAGE = 5


def annotation_dir() -> Path:
    """The package's data folder; a one-line error naming the extra when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "data" if locations else None
    if folder is None or not (folder / "coco_test_ids.npy").is_file():
        raise ConfigError(MISSING_EXTRA)
    return folder


def read_pairs(path: Path) -> dict[int, list[int]]:
    """{COCO id: [COCO ids]} from one annotation JSON (keys are strings there); parsed once per file version."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    return _read_pairs(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_pairs(path: str, mtime_ns: int, size: int) -> dict[int, list[int]]:
    """The parsed file; the cache key holds its modification time and size, so a changed file is read again."""
    try:
        data = json.loads(Path(path).read_text())
        return {int(k): [int(v) for v in vs] for k, vs in data.items()}
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not an annotation file ({{id: [ids]}} JSON): {e}") from None


@dataclass(frozen=True)
class CocoIds:
    """COCO ids of a split's images and captions, in the split's order.

    Attributes:
        image_ids: (N,) int64.
        caption_ids: (C,) int64.
        source: how the mapping was made (for the result JSON).
    """

    image_ids: np.ndarray
    caption_ids: np.ndarray
    source: str


def standard_ids(folder: Path | None = None) -> CocoIds:
    """The standard COCO 5K `testall` order: the package's caption ids, image j owning captions 5j…5j+4."""
    folder = folder or annotation_dir()
    captions = np.load(folder / "coco_test_ids.npy").astype(np.int64)
    owner = read_pairs(folder / "original_caption_to_image.json")
    images = np.array([owner[int(c)][0] for c in captions[::CAPTIONS_PER_IMAGE]], dtype=np.int64)
    return CocoIds(images, captions, "standard COCO 5K order (eccv-caption's coco_test_ids.npy)")


def read_id_file(path: Path, what: str) -> np.ndarray:
    """One integer id per line (or a .npy array)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    if path.suffix == ".npy":
        return np.asarray(np.load(path), dtype=np.int64).reshape(-1)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        return np.array([int(line) for line in lines], dtype=np.int64)
    except ValueError:
        bad = next(line for line in lines if not line.lstrip("-").isdigit())
        raise ConfigError(f"{path}: '{bad}' is not an integer COCO {what}; give one per line") from None


def _captions_by_image(std: CocoIds) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for k, cid in enumerate(std.caption_ids):
        out.setdefault(int(std.image_ids[k // CAPTIONS_PER_IMAGE]), []).append(int(cid))
    return out


def _from_caption_ids(caption_ids: np.ndarray, cap2img: np.ndarray, n_images: int, image_ids: np.ndarray | None,
                      folder: Path, where: str) -> CocoIds:
    owner = read_pairs(folder / "original_caption_to_image.json")
    unknown = [int(c) for c in caption_ids if int(c) not in owner]
    if unknown:
        raise ConfigError(f"{where}: {len(unknown)} caption ids are not COCO 5K test captions (first: {unknown[0]})")
    coco_image = np.array([owner[int(c)][0] for c in caption_ids], dtype=np.int64)
    if image_ids is None:
        image_ids = np.zeros(n_images, dtype=np.int64)
        image_ids[cap2img] = coco_image
    bad = np.flatnonzero(image_ids[cap2img] != coco_image)
    if bad.size:
        k = int(bad[0])
        raise ConfigError(f"{where}: caption {k} (COCO caption {int(caption_ids[k])}) belongs to COCO image "
                          f"{int(coco_image[k])}, but the split gives it image {int(image_ids[cap2img[k]])}")
    return CocoIds(image_ids, caption_ids.astype(np.int64), f"caption ids from {where}")


def split_ids(n_images: int, cap2img: np.ndarray, split_image_ids: list[str], caption_ids_file: Path | None = None,
              image_ids_file: Path | None = None, folder: Path | None = None) -> CocoIds:
    """COCO ids of a split's images and captions.

    In order of preference: an explicit caption-id file (one COCO caption id per caption, in the split's order; the
    images follow from it or from `image_ids_file`); the split's own image ids (or `image_ids_file`) when they are COCO
    image ids, each image's captions taking its standard caption ids in order; else the standard order itself.

    Raises:
        ConfigError: when the split cannot be the COCO 5K test split, or an id file disagrees with it.
    """
    folder = folder or annotation_dir()
    cap2img = np.asarray(cap2img, dtype=np.int64)
    image_ids = read_id_file(image_ids_file, "image id") if image_ids_file is not None else None
    if image_ids is not None and image_ids.size != n_images:
        raise ConfigError(f"{image_ids_file} has {image_ids.size} image ids for {n_images:,} images")
    if caption_ids_file is not None:
        caption_ids = read_id_file(caption_ids_file, "caption id")
        if caption_ids.size != cap2img.size:
            raise ConfigError(f"{caption_ids_file} has {caption_ids.size} caption ids for {cap2img.size:,} captions")
        return _from_caption_ids(caption_ids, cap2img, n_images, image_ids, folder, str(caption_ids_file))
    std = standard_ids(folder)
    if image_ids is None and all(i.isdigit() for i in split_image_ids):
        own = np.array([int(i) for i in split_image_ids], dtype=np.int64)
        image_ids = own if set(own.tolist()) == set(std.image_ids.tolist()) else None
    if image_ids is not None:
        by_image = _captions_by_image(std)
        caption_ids = np.zeros(cap2img.size, dtype=np.int64)
        for j, coco in enumerate(image_ids):
            mine = np.flatnonzero(cap2img == j)
            theirs = by_image.get(int(coco), [])
            if len(mine) != len(theirs):
                raise ConfigError(f"image {j} (COCO image {int(coco)}) has {len(mine)} captions in the split and "
                                  f"{len(theirs)} in the COCO 5K test split; give the caption ids (--caption-ids)")
            caption_ids[mine] = theirs
        return CocoIds(image_ids, caption_ids, "the split's COCO image ids, captions in standard order")
    if n_images != std.image_ids.size or not np.array_equal(cap2img, np.arange(cap2img.size) // CAPTIONS_PER_IMAGE) \
            or cap2img.size != COCO_5K_CAPTIONS:
        raise ConfigError(f"the split's image ids are not COCO ids and its {n_images:,} images × {cap2img.size:,} "
                          "captions are not in the standard COCO 5K order; give --caption-ids (one COCO caption id "
                          "per caption, in the split's order)")
    log.info("COCO ids: the split is taken to be in the standard COCO 5K order (its image ids are not COCO ids)")
    return std


def positive_sets(pairs_i2t: dict[int, list[int]], pairs_t2i: dict[int, list[int]], ids: CocoIds, name: str
                  ) -> tuple[PositiveSets, PositiveSets]:
    """Map one annotation set onto split indices: (image queries over captions, caption queries over images).

    A positive absent from the split still counts in its query's R. A query absent from the split is refused: the
    split is then not the one the annotations describe.
    """
    image_index = {int(c): j for j, c in enumerate(ids.image_ids)}
    caption_index = {int(c): k for k, c in enumerate(ids.caption_ids)}
    out = []
    for pairs, queries, targets in ((pairs_i2t, image_index, caption_index), (pairs_t2i, caption_index, image_index)):
        missing = [q for q in pairs if q not in queries]
        if missing:
            raise ConfigError(f"{name}: {len(missing)} of its {len(pairs)} queries are not in the split (first: COCO "
                              f"id {missing[0]}); it is not the COCO 5K test split")
        positives = {queries[q]: sorted({targets[t] for t in set(ts) if t in targets}) for q, ts in pairs.items()}
        relevant = {queries[q]: len(set(ts)) for q, ts in pairs.items()}
        out.append(PositiveSets.from_lists(positives, relevant))
    return out[0], out[1]


def load_annotation(name: str, ids: CocoIds, folder: Path | None = None) -> tuple[PositiveSets, PositiveSets]:
    """The positive sets of `name` ("eccv", "cxc", "original" from the package; a folder path for "pm" files)."""
    if name == PLAUSIBLE or name not in ANNOTATIONS:
        raise ValueError(f"unknown annotation set {name!r}; the package has {', '.join(ANNOTATIONS)}")
    folder = folder or annotation_dir()
    return positive_sets(read_pairs(folder / f"{name}_image_to_caption.json"),
                         read_pairs(folder / f"{name}_caption_to_image.json"), ids, name)


def load_plausible(pm_dir: Path, ids: CocoIds) -> tuple[PositiveSets, PositiveSets]:
    """Plausible-match positives from `pm_dir`/pm_{image_to_caption,caption_to_image}.json."""
    pm_dir = Path(pm_dir)
    files = [pm_dir / f"{PLAUSIBLE}_{d}.json" for d in ("image_to_caption", "caption_to_image")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{pm_dir} lacks {' and '.join(missing)} (the plausible-match files, not in the "
                          f"'{EXTRA}' package)")
    return positive_sets(read_pairs(files[0]), read_pairs(files[1]), ids, "plausible match")
