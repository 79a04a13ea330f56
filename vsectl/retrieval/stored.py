"""Stored feature sets for `embed`: a whole feature folder read as one collection, and the sets an embed of a raw
dataset can take from the stores its run was trained on instead of running the backbone again.

A stored set is used in place of a replayed one only when the store was extracted from the same dataset (the sha256
of its dataset.json) with the run's feature recipe (backbone, weights, input size, normalisation, precision, layout
and on-disk dtype): replaying the backbone would give the same numbers, only slower.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.retrieval.recipe import FeatureRecipe

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "dev", "test", "testall")  # a folder's stores in this order, others after by name
SAME_NUMBERS = ("precision", "channels_last", "dtype")  # beyond FeatureRecipe.MATCH_KEYS: what changes the values


def folder_stores(folder: Path) -> list[Path]:
    """The `<split>.h5` stores of a feature folder, train/dev/test/testall first."""
    stores = sorted(folder.glob("*.h5"), key=lambda p: (SPLIT_ORDER.index(p.stem) if p.stem in SPLIT_ORDER
                                                        else len(SPLIT_ORDER), p.name))
    if not stores:
        raise DataError(f"{folder} holds no feature stores (<split>.h5); give a folder made by `vsectl extract` or "
                        "one store file")
    return stores


class StoreSets:
    """Feature sets by collection position, read from one or more stores one set at a time.

    Args:
        stores: the store files.
        rows: position → (store number, row); None means the stores one after the other.
    """

    def __init__(self, stores: list[Path], rows: dict[int, tuple[int, int]] | None = None) -> None:
        from vsectl.data.features import H5Features

        self.readers = [H5Features(path) for path in stores]
        self.rows = rows
        self.starts = np.cumsum([0] + [len(r) for r in self.readers]).tolist()

    def __contains__(self, position: int) -> bool:
        return position in self.rows if self.rows is not None else 0 <= position < self.starts[-1]

    def get(self, position: int) -> np.ndarray:
        """The (n, D) float set stored for `position`."""
        if self.rows is not None:
            store, row = self.rows[position]
        else:
            store = bisect.bisect_right(self.starts, position) - 1
            row = position - self.starts[store]
        return self.readers[store].get(row)

    @property
    def feat_dim(self) -> int:
        return self.readers[0].feat_dim

    def block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions a..b-1 of the stores one after the other: their (R, D) rows and (b − a,) set sizes, one read
        per store the block touches."""
        if self.rows is not None:
            raise ValueError("block reads the stores one after the other, not a chosen set of rows")
        rows, sizes = [], []
        for store, reader in enumerate(self.readers):
            lo, hi = max(a, self.starts[store]), min(b, self.starts[store + 1])
            if lo < hi:
                r, n = reader.block(lo - self.starts[store], hi - self.starts[store])
                rows.append(r)
                sizes.append(n)
        return np.concatenate(rows), np.concatenate(sizes)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _same_numbers(found: FeatureRecipe, recipe: FeatureRecipe) -> bool:
    return not found.video and not found.differences(recipe) and all(
        getattr(found, key) == getattr(recipe, key) for key in SAME_NUMBERS)


def reusable_sets(items: list[dict[str, Any]], dataset_sha256: str, recipe: FeatureRecipe | None,
                  root: Path) -> StoreSets | None:
    """The stored sets under `root` (a run's data.root) for the items of a raw dataset, or None when there are none.

    Args:
        items: the collection's items ({"id", "path"}), in order.
        dataset_sha256: sha256 of the raw dataset's dataset.json.
        recipe: the run's feature recipe (None: nothing can be reused).
        root: the folder of the stores the run was trained on.
    """
    from vsectl.data.store import read_store_attrs, read_store_captions

    if recipe is None or not Path(root).is_dir():
        return None
    stores: list[Path] = []
    by_id: dict[str, tuple[int, int]] = {}
    for path in folder_stores(Path(root)) if any(Path(root).glob("*.h5")) else []:
        try:
            attrs = read_store_attrs(path)
            found = FeatureRecipe.from_attrs(attrs, str(path))
            if attrs.get("source_dataset_sha256") != dataset_sha256 or found is None or not _same_numbers(found,
                                                                                                          recipe):
                continue
            ids = read_store_captions(path)[2]
        except (DataError, OSError, KeyError, ValueError) as e:  # an unreadable store is simply not reused
            log.debug("not reusing %s: %s", path, e)
            continue
        stores.append(path)
        for row, image_id in enumerate(ids):
            by_id.setdefault(image_id, (len(stores) - 1, row))
    rows = {pos: by_id[item["id"]] for pos, item in enumerate(items) if item["id"] in by_id}
    return StoreSets(stores, rows) if rows else None


def check_store(model: Any, source: Any) -> None:
    """A feature store fits the run: it does not train its own backbone, the width and the feature recipe match."""
    feat_dim, recipe = source.extra["feat_dim"], source.extra["recipe"]
    if model.end_to_end:
        raise ConfigError(f"run {model.run_dir} trains its own image backbone, so stored features do not fit it; "
                          "embed the images with --images DIR or --data RAW")
    if feat_dim != model.feat_dim:
        raise ConfigError(f"{source.path} holds {feat_dim}-d features but run {model.run_dir} takes "
                          f"{model.feat_dim}-d; embed features made with the run's backbone")
    if recipe is not None and model.recipe is not None and (diff := recipe.differences(model.recipe)):
        raise ConfigError(f"{source.path} was extracted with another feature recipe than run {model.run_dir} was "
                          f"trained on (differs in {', '.join(diff)}); extract it with the run's recipe "
                          f"({model.recipe.backbone}, {model.recipe.input_size} px)")


def reusable_sets_of(model: Any, source: Any) -> StoreSets | None:
    """The stored sets of the run's own stores that a raw-dataset embed can use instead of the backbone (logged)."""
    from vsectl.retrieval.model import _data_root

    if source.kind != "data" or model.end_to_end:
        return None
    root = _data_root(model.config.data.root, model.run_dir)
    stored = reusable_sets(source.items, source.identity["dataset_sha256"], model.recipe, root)
    if stored is not None:
        log.info("%d of %d images have their features stored in %s (the run's feature recipe, this dataset): "
                 "reused; the backbone runs on the other %d", len(stored.rows), len(source.items), root,
                 len(source.items) - len(stored.rows))
    return stored
