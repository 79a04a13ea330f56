"""Vectors that behave like a model's embeddings, at any count: a low-rank Gaussian mixture fitted to real ones.

The fit: the real unit vectors' mean, their top `RANK` principal directions, a k-means mixture of `COMPONENTS`
diagonal Gaussians in those coordinates, and isotropic noise in every direction with the variance the principal
directions leave unexplained. Drawn vectors are normalised, as the model's are. `compare` reports how the drawn
vectors match the real ones at the real count: the spectrum's top share and the nearest-neighbour similarity.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

RANK = 64
COMPONENTS = 32
KMEANS_ITERS = 25


@dataclass
class Mixture:
    mean: np.ndarray        # (E,)
    basis: np.ndarray       # (RANK, E) principal directions
    weights: np.ndarray     # (K,)
    centres: np.ndarray     # (K, RANK)
    scales: np.ndarray      # (K, RANK) per-component standard deviations
    noise: float            # isotropic standard deviation of the unexplained part, per dimension


def _kmeans(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = z[rng.choice(len(z), size=k, replace=False)]
    for _ in range(KMEANS_ITERS):
        labels = np.argmin(((z[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        for c in range(k):
            if (labels == c).any():
                centres[c] = z[labels == c].mean(0)
    return labels


def fit(real: np.ndarray, rank: int = RANK, components: int = COMPONENTS, seed: int = 0) -> Mixture:
    """Fit the mixture to (N, E) real unit vectors."""
    rng = np.random.default_rng(seed)
    real = np.asarray(real, dtype=np.float64)
    mean = real.mean(0)
    centred = real - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:rank]
    z = centred @ basis.T                                     # (N, rank)
    residual = centred - z @ basis                            # what the principal directions leave
    noise = float(np.sqrt((residual**2).sum() / (len(real) * (real.shape[1] - rank))))
    labels = _kmeans(z, components, rng)
    weights, centres, scales = [], [], []
    for c in range(components):
        members = z[labels == c]
        if len(members) < 2:
            continue
        weights.append(len(members))
        centres.append(members.mean(0))
        scales.append(members.std(0) + 1e-6)
    w = np.asarray(weights, dtype=np.float64)
    return Mixture(mean, basis, w / w.sum(), np.asarray(centres), np.asarray(scales), noise)


def draw(mix: Mixture, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, E) float32 unit vectors from the mixture."""
    comp = rng.choice(len(mix.weights), size=n, p=mix.weights)
    z = mix.centres[comp] + rng.standard_normal((n, mix.basis.shape[0])) * mix.scales[comp]
    x = (mix.mean + z @ mix.basis).astype(np.float32)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(mix.noise)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def blocks(mix: Mixture, n: int, seed: int, block: int = 65536) -> Iterator[np.ndarray]:
    """n vectors in blocks (each block its own generator: any block can be redrawn alone)."""
    for b, a in enumerate(range(0, n, block)):
        yield draw(mix, min(block, n - a), np.random.default_rng([seed, b]))


def compare(real: np.ndarray, drawn: np.ndarray) -> dict[str, float]:
    """How alike two sets of unit vectors of the same count are: spectrum and nearest-neighbour similarity."""
    out = {}
    for name, x in (("real", real), ("drawn", drawn)):
        x = np.asarray(x, dtype=np.float64)
        s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        nn = sims.max(1)
        out[f"{name}_top10_variance_share"] = round(float(s[:10].sum() / s.sum()), 4)
        out[f"{name}_top64_variance_share"] = round(float(s[:64].sum() / s.sum()), 4)
        out[f"{name}_nn_similarity_median"] = round(float(np.median(nn)), 4)
        out[f"{name}_mean_similarity"] = round(float((x.sum(0) @ x.sum(0) - len(x)) / (len(x) * (len(x) - 1))), 4)
    return out
