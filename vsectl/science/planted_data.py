"""Planted-pooling retrieval data: feature sets whose captions describe a chosen pooling of the set (ours).

Every set element is x ~ N(0, I) in `feat_dim` dimensions. A fixed random projection P with orthonormal rows gives
z = P x in `caption_dims` dimensions; the set's target is y_j = Σ_k θ*_k(N) · sort_k(z_j), with θ* a pattern of
`science.patterns` (M-K = mean of the top K, A = mean, T-P% = mean of the top P %). The caption is y plus Gaussian
noise, quantised per dimension into `bins` equally filled levels: one word `d<j>q<level>` per dimension. Retrieval can
only succeed as far as the image side reproduces the planted pooling. Choices are explained in docs/planted.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsectl.data.store import StoreWriter
from vsectl.errors import ConfigError
from vsectl.io import atomic_write_json
from vsectl.science.patterns import pattern_weights

log = logging.getLogger(__name__)

MANIFEST = "planted.json"  # the generator's settings and the planted θ, beside the store files


@dataclass(frozen=True)
class PlantedSplit:
    """One split to generate: how many sets, and the inclusive range their sizes are drawn from (uniformly)."""

    name: str
    n_sets: int
    min_size: int
    max_size: int


def projection(feat_dim: int, caption_dims: int, rng: np.random.Generator) -> np.ndarray:
    """(caption_dims, feat_dim) with orthonormal rows: every z_j = P_j · x is N(0, 1), independent of the others."""
    if caption_dims > feat_dim:
        raise ConfigError(f"planted: caption_dims ({caption_dims}) cannot exceed feat_dim ({feat_dim})")
    q, _ = np.linalg.qr(rng.normal(size=(feat_dim, caption_dims)))
    return q.T.astype(np.float64)


def planted_target(z: np.ndarray, pattern: str) -> np.ndarray:
    """(N, d) projected set → (d,) target: per dimension, Σ_k θ*_k(N) · (k-th largest value)."""
    ranked = -np.sort(-z, axis=0)                                   # (N, d), largest first in every column
    theta = pattern_weights(pattern, z.shape[0]).double().numpy()   # (N,)
    return theta @ ranked


def caption_words(y: np.ndarray, edges: np.ndarray) -> str:
    """(d,) noisy target and (d, bins − 1) level edges → 'd0q3 d1q0 …', one word per dimension, in dimension order."""
    levels = [int(np.searchsorted(edges[j], y[j])) for j in range(y.shape[0])]
    return " ".join(f"d{j}q{level}" for j, level in enumerate(levels))


def _draw(rng: np.random.Generator, split: PlantedSplit, proj: np.ndarray, pattern: str
          ) -> tuple[list[np.ndarray], np.ndarray]:
    sets, targets = [], []
    for _ in range(split.n_sets):
        n = int(rng.integers(split.min_size, split.max_size + 1))
        x = rng.normal(size=(n, proj.shape[1])).astype(np.float32)  # (N, feat_dim)
        sets.append(x)
        targets.append(planted_target(x.astype(np.float64) @ proj.T, pattern))  # (d,)
    return sets, np.stack(targets)                                  # (S, d) clean targets


def make_planted_data(
    root: str | Path,
    pattern: str,
    splits: list[PlantedSplit],
    feat_dim: int = 16,
    caption_dims: int = 8,
    bins: int = 8,
    noise: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write one planted dataset as an ordinary feature store: `<root>/<split>.h5` per split, plus `planted.json`.

    The first split must be the training split: the noise scale (a fraction of each dimension's target std) and the
    quantisation edges (equally filled levels) are measured on it and reused unchanged for every other split, so a
    word means the same value everywhere, at unseen set sizes too.

    Args:
        root: output folder (created).
        pattern: the planted pooling, a `vsectl.science.patterns` pattern name (M-1, M-4, A, T-25%, …).
        splits: the splits to write, training split first.
        feat_dim: D of every set element.
        caption_dims: d, the projected dimensions a caption describes.
        bins: quantisation levels per dimension (the caption vocabulary is caption_dims × bins words).
        noise: caption noise std, as a fraction of the target's std on the training split.
        seed: the projection and every split derive from it (and from the split's name, not its position).

    Returns:
        `root`.
    """
    pattern_weights(pattern, 1)  # validates the name
    if bins < 2 or noise < 0 or not splits:
        raise ConfigError("planted: need bins >= 2, noise >= 0 and at least one split")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    proj = projection(feat_dim, caption_dims, np.random.default_rng([seed, 0]))
    edges = noise_std = None
    for split in splits:
        rng = np.random.default_rng([seed, 1, *split.name.encode()])
        sets, clean = _draw(rng, split, proj, pattern)
        if noise_std is None:  # the training split
            noise_std = noise * clean.std(axis=0)                   # (d,)
        targets = clean + noise_std * rng.normal(size=clean.shape)
        if edges is None:
            edges = np.quantile(targets, np.arange(1, bins) / bins, axis=0).T  # (d, bins − 1)
        attrs = {"source": "vsectl planted-pooling benchmark (generated, not real)", "pattern": pattern,
                 "seed": seed, "split": split.name}
        with StoreWriter(root / f"{split.name}.h5", feat_dim, attrs=attrs) as writer:
            for i, (x, y) in enumerate(zip(sets, targets, strict=True)):
                index = writer.add_image(f"{split.name}-{i}", x)
                writer.add_caption(caption_words(y, edges), index)
    manifest = {"pattern": pattern, "feat_dim": feat_dim, "caption_dims": caption_dims, "bins": bins, "noise": noise,
                "seed": seed, "splits": [vars(s) for s in splits], "noise_std": noise_std.tolist(),
                "edges": edges.tolist(), "projection": proj.tolist()}
    atomic_write_json(root / MANIFEST, manifest)
    log.info("wrote planted data (%s) to %s", pattern, root)
    return root
