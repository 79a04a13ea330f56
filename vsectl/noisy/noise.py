"""Noisy correspondence: a fraction of the training captions paired with a wrong image; dev and test stay clean.

The noise is an index: the image each training caption is paired with. It is drawn from (ratio, seed) or read from a
saved index file, applied to the training split only, and recorded in the run (`noise.json`: counts, fingerprint and
examples; `noise_index.npy`: the whole index, reusable as `data.noise.index_file`). A resumed run must find the same
index. Index files are 1-D integer .npy arrays in one of the two layouts of the published noisy-correspondence code:
one image index per training caption (NCR and its successors), or one per training image (DECL: caption k is paired
with image index[image of caption k]).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.data.sources import Split
from vsectl.errors import ConfigError, DataError
from vsectl.io import atomic_path, atomic_write_json
from vsectl.noisy.noise_config import NoiseConfig

log = logging.getLogger(__name__)

RECORD_FILE = "noise.json"
INDEX_FILE = "noise_index.npy"
EXAMPLES = 20  # noisy pairs written out in noise.json with their ids and caption text
LAYOUTS = ("generated", "per-caption", "per-image")
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


@dataclass(frozen=True)
class NoisyPairs:
    """The pairing of the training captions under noise.

    Attributes:
        cap2img: (C,) int64 image index each training caption is paired with.
        clean: (C,) int64 its true image.
        source: what drew it ("ratio 0.2, seed 0" or the index file).
        layout: one of ``LAYOUTS``.
    """

    cap2img: np.ndarray
    clean: np.ndarray
    source: str
    layout: str

    @property
    def noisy(self) -> np.ndarray:
        """(C,) bool: captions paired with an image other than their own."""
        return self.cap2img != self.clean

    @property
    def fingerprint(self) -> str:
        """sha256 over the true and the noisy pairing."""
        h = hashlib.sha256(np.ascontiguousarray(self.clean, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.cap2img, dtype=np.int64).tobytes())
        return h.hexdigest()


def draw_noise(clean: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Pair floor(ratio · C) captions, chosen at random, with the images of one another, none keeping its own.

    The chosen captions' images are shuffled among them (so every image keeps its number of training pairs); a caption
    that drew its own image swaps with one whose own image differs and that did not draw this image, which makes both
    wrong. The published code shuffles the same way but lets a caption keep its own image by chance.

    Args:
        clean: (C,) true image of each caption.
        ratio: in [0, 1).
        seed: the generator's seed.

    Returns:
        (C,) int64 image of each caption.

    Raises:
        ConfigError: when the chosen captions cannot all be mismatched (one caption, or all of one image).
    """
    clean = np.asarray(clean, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = int(ratio * clean.size)
    out = clean.copy()
    if n == 0:
        return out
    chosen = rng.choice(clean.size, size=n, replace=False)
    own = clean[chosen]
    given = own[rng.permutation(n)]
    for i in np.flatnonzero(given == own):
        if given[i] != own[i]:  # fixed by an earlier swap
            continue
        partners = np.flatnonzero((own != own[i]) & (given != own[i]))
        if partners.size == 0:
            raise ConfigError(f"data.noise.ratio {ratio}: the {n} chosen caption(s) cannot be paired with wrong "
                              "images by shuffling among them; raise the ratio")
        j = rng.choice(partners)
        given[i], given[j] = given[j], given[i]
    out[chosen] = given
    return out


def read_noise_index(path: str | Path, clean: np.ndarray, n_images: int, row_stride: int = 1
                     ) -> tuple[np.ndarray, str]:
    """Read a saved noise index and turn it into one image per training caption.

    Args:
        path: a 1-D integer .npy array: one image index per caption (NCR layout) or one per image (DECL layout).
        clean: (C,) true image of each training caption.
        n_images: training images.
        row_stride: feature rows per image (5 when a precomp file stores each image once per caption; such an index
            may hold row numbers, which are divided by it).

    Returns:
        ((C,) image of each caption, layout).
    """
    path = Path(path)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"data.noise.index_file {path} {state}")
    try:
        with open(path, "rb") as fh:
            if fh.read(len(NPY_MAGIC)) != NPY_MAGIC:  # np.load would take it for a pickle and say so
                raise DataError(f"{path} is not a .npy noise index (it lacks the .npy header; write one with "
                                "numpy.save)")
        index = np.load(path, allow_pickle=False)
    except OSError as e:
        raise DataError(f"data.noise.index_file {path} cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path} is not a .npy noise index ({e})") from None
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise DataError(f"{path} holds a {index.dtype} array of shape {index.shape}; a noise index is a 1-D integer "
                        "array (one image index per training caption, or one per training image)")
    index = index.astype(np.int64)
    if index.size == clean.size:
        layout = "per-caption"
        if row_stride > 1 and index.max(initial=0) >= n_images:
            index = index // row_stride  # row numbers of a file that stores each image once per caption
        cap2img = index
    elif index.size == n_images:
        layout, cap2img = "per-image", index[clean]
    else:
        raise DataError(f"{path} has {index.size:,} entries, but the training split has {clean.size:,} captions "
                        f"(one entry per caption) and {n_images:,} images (one per image); is it the index of "
                        "another dataset or split?")
    bad = np.flatnonzero((cap2img < 0) | (cap2img >= n_images))
    if bad.size:
        raise DataError(f"{path}: entry {int(bad[0])} names image {int(cap2img[bad[0]])}, outside the {n_images:,} "
                        "training images")
    return cap2img, layout


def noisy_pairs(noise: NoiseConfig, split: Split) -> NoisyPairs | None:
    """The noisy pairing of the training split that `noise` asks for (None when it asks for none)."""
    if not noise.enabled:
        return None
    clean = np.asarray(split.cap2img, dtype=np.int64)
    if noise.index_file:
        stride = int(getattr(split.features, "row_stride", 1))
        cap2img, layout = read_noise_index(noise.index_file, clean, split.n_images, stride)
        return NoisyPairs(cap2img, clean, f"index file {noise.index_file}", layout)
    return NoisyPairs(draw_noise(clean, noise.ratio, noise.seed), clean, f"ratio {noise.ratio:g}, seed {noise.seed}",
                      "generated")


def summary(pairs: NoisyPairs, split: Split) -> dict[str, Any]:
    """What noise.json records: counts, the fingerprint and the first noisy pairs with their ids and captions."""
    noisy = np.flatnonzero(pairs.noisy)
    examples = [{"caption": int(k), "text": split.captions[k], "true_image": split.image_ids[pairs.clean[k]],
                 "given_image": split.image_ids[pairs.cap2img[k]]} for k in noisy[:EXAMPLES]]
    return {"source": pairs.source, "layout": pairs.layout, "split": split.name, "n_captions": int(pairs.clean.size),
            "n_images": split.n_images, "n_noisy": int(noisy.size), "ratio": noisy.size / max(1, pairs.clean.size),
            "noisy_images": int(np.unique(pairs.clean[noisy]).size), "fingerprint": pairs.fingerprint,
            "index_file": INDEX_FILE, "index_layout": "per-caption", "examples": examples}


def record_noise(run_dir: Path, pairs: NoisyPairs, split: Split, resume: bool, write: bool = True) -> dict[str, Any]:
    """Write noise.json and noise_index.npy into a new run, or check a resumed run's record against `pairs`.

    Raises:
        DataError: a resumed run recorded other noisy pairs (its data or its index file changed).
    """
    path = Path(run_dir) / RECORD_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != pairs.fingerprint:
            raise DataError(f"{path} records other noisy pairs (fingerprint {str(old.get('fingerprint'))[:12]}, now "
                            f"{pairs.fingerprint[:12]}): the training data or the noise index changed since the run "
                            "started; start a new run")
        return old
    record = summary(pairs, split)
    if write:
        with atomic_path(Path(run_dir) / INDEX_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, pairs.cap2img)
        atomic_write_json(path, record)
        log.info("noisy correspondence (%s): %d of %d training captions paired with a wrong image (%.1f %%); "
                 "recorded in %s", pairs.source, record["n_noisy"], record["n_captions"], 100 * record["ratio"], path)
    return record


def apply_noise(pairs: NoisyPairs | None, split: Split, run_dir: Path, resume: bool, write: bool = True
                ) -> tuple[Split, NoisyPairs | None]:
    """The training split with its noisy pairing (unchanged without noise), recorded in (or checked against) the run.

    `pairs` comes from `noisy_pairs`, called before the run folder is made: a bad index file is refused with nothing
    written.
    """
    if pairs is None:
        return split, None
    record_noise(run_dir, pairs, split, resume, write)
    return replace(split, cap2img=pairs.cap2img.copy()), pairs
