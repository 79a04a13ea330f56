"""Splits by title group: no title in two splits, in a stable hash order."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

log = logging.getLogger(__name__)


def assign_splits(groups: list[str], min_test: int, n_dev: int, seed: int = 0) -> list[str]:
    """Assign each image to "train", "val" or "test", keeping images of one group in one split.

    Groups are ordered by sha256(seed:group), a stable pseudo-random order; whole groups go to test until it holds at
    least `min_test` images, then to val until it holds at least `n_dev`, the rest to train.

    Args:
        groups: the group key of each image.
        min_test: least number of test images.
        n_dev: least number of val images (0 for none).
        seed: changes the order.

    Returns:
        The split of each image.
    """
    sizes = Counter(groups)
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    split_of: dict[str, str] = {}
    n_test = n_val = 0
    for g in order:
        if n_test < min_test:
            split_of[g], n_test = "test", n_test + sizes[g]
        elif n_val < n_dev:
            split_of[g], n_val = "val", n_val + sizes[g]
        else:
            split_of[g] = "train"
    return [split_of[g] for g in groups]


def _split_sizes(n: int, min_test: int, n_dev: int) -> tuple[int, int]:
    if min_test + n_dev <= n // 2:
        return min_test, n_dev
    scale = (n // 2) / max(1, min_test + n_dev)  # too few images: test and dev share half of them
    log.warning("only %d images: test/dev reduced from %d/%d", n, min_test, n_dev)
    return max(1, int(min_test * scale)), int(n_dev * scale)
