"""A generated, learnable toy image–caption dataset for tests and the demo (not real data).

Each concept word owns a random direction in feature space. An image shows 2–3 concepts: a few of its regions are
concept directions plus noise, the rest are background noise, so the signal sits in a few rows and max-like pooling
beats the mean. Its captions name the concepts in varied orders with filler words.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from vsectl.data.store import StoreWriter

log = logging.getLogger(__name__)

CONCEPTS = (
    "dog",
    "cat",
    "horse",
    "bird",
    "cow",
    "sheep",
    "elephant",
    "giraffe",
    "zebra",
    "bear",
    "ball",
    "kite",
    "frisbee",
    "umbrella",
    "bicycle",
    "car",
    "bus",
    "train",
    "boat",
    "plane",
    "tree",
    "flower",
    "bench",
    "chair",
    "table",
    "clock",
    "vase",
    "lamp",
    "book",
    "cup",
    "pizza",
    "banana",
    "apple",
    "cake",
    "sandwich",
    "bottle",
    "laptop",
    "phone",
    "surfboard",
    "skateboard",
)
TEMPLATES_2 = (
    "a {0} next to a {1}",
    "there is a {0} and a {1}",
    "a photo of a {0} with a {1}",
    "a {0} near the {1}",
    "the {0} is beside a {1}",
    "an image showing a {0} and a {1}",
)
TEMPLATES_3 = (
    "a {0}, a {1} and a {2}",
    "there is a {0} near a {1} and a {2}",
    "a photo of a {0} with a {1} and a {2}",
    "the {0} is next to a {1} and the {2}",
    "an image showing a {0}, a {1} and a {2}",
)
CONCEPT_SCALE = 3.0  # concept regions stand out of unit-variance background noise
CONCEPT_NOISE = 0.5
MIN_REGIONS = 4  # store format: set sizes vary in [MIN_REGIONS, n_regions]
SPLIT_NAMES = ("train", "dev", "test")
README = """Generated toy data (vsectl.data.toy.make_toy_dataset), NOT a real dataset.

{n} concept words each own a random {d}-d direction. Every image shows 2-3 concepts: a few regions are concept
directions plus noise, the others are background noise. Its {c} captions name the concepts with filler words.
Format: {fmt}. Seed: {seed}. Results on it say nothing about real retrieval quality.
"""


def _image(rng: np.random.Generator, directions: np.ndarray, n_regions: int) -> tuple[np.ndarray, list[int]]:
    concepts = rng.choice(len(directions), size=int(rng.integers(2, 4)), replace=False).tolist()
    feat_dim = directions.shape[1]
    rows = rng.normal(size=(n_regions, feat_dim))  # (K, D) background
    slots = rng.permutation(n_regions)
    for slot, concept in zip(slots, concepts, strict=False):  # one region per concept, at random positions
        rows[slot] = CONCEPT_SCALE * directions[concept] + CONCEPT_NOISE * rng.normal(size=feat_dim)
    return rows.astype(np.float32), concepts


def _captions(rng: np.random.Generator, concepts: list[int], n: int) -> list[str]:
    templates = TEMPLATES_2 if len(concepts) == 2 else TEMPLATES_3
    out = []
    for _ in range(n):
        words = [CONCEPTS[c] for c in rng.permutation(concepts)]
        out.append(templates[int(rng.integers(len(templates)))].format(*words))
    return out


def make_toy_dataset(
    root: str | Path,
    n_train: int = 400,
    n_dev: int = 100,
    n_test: int = 100,
    feat_dim: int = 32,
    n_regions: int = 12,
    captions_per_image: int = 5,
    seed: int = 0,
    fmt: str = "precomp",
    n_concepts: int = len(CONCEPTS),
) -> Path:
    """Write the toy dataset's train/dev/test splits into `root`.

    Args:
        root: output folder (created).
        n_train: images in train; likewise `n_dev`, `n_test`.
        feat_dim: D.
        n_regions: K for "precomp"; the largest set size for "store" (sizes vary in [4, K]).
        captions_per_image: captions per image; "precomp" requires 5 (DATA-6).
        seed: makes the output deterministic.
        fmt: "precomp" (SCAN `{split}_ims.npy` (N, K, D), `_caps.txt`, `_ids.txt`) or "store" (`{split}.h5`).
        n_concepts: how many of the concept words are used (fewer = easier).

    Returns:
        `root`.
    """
    if fmt not in ("precomp", "store"):
        raise ValueError(f"fmt must be 'precomp' or 'store', got {fmt!r}")
    if fmt == "precomp" and captions_per_image != 5:
        raise ValueError("the precomp format groups exactly 5 captions per image")
    if n_regions < 3:
        raise ValueError(f"n_regions must be at least 3 to hold an image's concepts, got {n_regions}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not 3 <= n_concepts <= len(CONCEPTS):
        raise ValueError(f"n_concepts must be in [3, {len(CONCEPTS)}], got {n_concepts}")
    directions = np.random.default_rng([seed, 0]).normal(size=(n_concepts, feat_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)  # (V_c, D) unit concept directions
    first_id = 0
    for s, (split, n) in enumerate(zip(SPLIT_NAMES, (n_train, n_dev, n_test), strict=True)):
        rng = np.random.default_rng([seed, s + 1])  # each split depends only on the seed, not on the others' sizes
        ids = [str(first_id + k) for k in range(n)]
        first_id += n
        if fmt == "precomp":
            # written in place through a memory map: a Flickr30K-size split (29,000 × 36 × 2048) is 8.5 GB
            tmp = root / f".{split}_ims.npy.partial"
            captions: list[str] = []
            try:
                feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, n_regions, feat_dim))
                for k in range(n):
                    feats[k], concepts = _image(rng, directions, n_regions)
                    captions += _captions(rng, concepts, captions_per_image)
                feats.flush()
                del feats
                os.replace(tmp, root / f"{split}_ims.npy")
            finally:
                tmp.unlink(missing_ok=True)
            (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
            (root / f"{split}_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
        else:
            attrs = {"source": "vsectl toy dataset (generated, not real)", "seed": seed, "split": split}
            with StoreWriter(root / f"{split}.h5", feat_dim, attrs=attrs) as writer:
                for image_id in ids:
                    k = int(rng.integers(min(MIN_REGIONS, n_regions), n_regions + 1))
                    rows, concepts = _image(rng, directions, k)
                    index = writer.add_image(image_id, rows)
                    for caption in _captions(rng, concepts, captions_per_image):
                        writer.add_caption(caption, index)
    (root / "README.txt").write_text(
        README.format(n=n_concepts, d=feat_dim, c=captions_per_image, fmt=fmt, seed=seed), encoding="utf-8"
    )
    log.info("wrote toy dataset (%s) to %s", fmt, root)
    return root
