"""The POOLERS registry: GPO and the fixed pooling baselines, all on the same sorted-feature path.

mean, max and kmax are fixed weight vectors θ over ranks (spec §2), so baselines and GPO share the sort, the mask and
the weighted sum. GeM is the generalised mean (Radenović et al.), defined here on clamp(x, 1e-6) with a learned p.
Every pooler maps (feats (B, K, D), lengths (B,)) → (pooled (B, D), weights (B, K', 1) or None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from vsectl.config import PoolConfig
from vsectl.models.gpo import GPO, length_mask, sort_features, weighted_sum
from vsectl.registry import Registry

POOLERS: Registry[Callable[[PoolConfig], nn.Module]] = Registry("pooler")  # name → builder from the config


class FixedWeightPool(nn.Module):
    """A pooler whose θ is a fixed function of the set size."""

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ranked, _ = sort_features(feats, lengths)
        theta = self.theta(lengths, ranked.size(1))
        return weighted_sum(ranked, theta), theta


def top_k_weights(lengths: torch.Tensor, max_len: int, k: torch.Tensor) -> torch.Tensor:
    """θ = 1/k on the first k ranks (k per sample, already clipped to the length): (B, max_len, 1) fp32."""
    mask = length_mask(k, max_len)
    return (mask.float() / k[:, None].float())[..., None]


class MeanPool(FixedWeightPool):
    """Average over the valid elements: θ_k = 1/n."""

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        return top_k_weights(lengths, max_len, lengths)


class MaxPool(FixedWeightPool):
    """Per-dimension maximum: θ one-hot at rank 0."""

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        return top_k_weights(lengths, max_len, torch.ones_like(lengths))


class KMaxPool(FixedWeightPool):
    """Per-dimension mean of the top min(k, n) values (k = 1 is max, k ≥ n is mean).

    Args:
        k: number of top values averaged.
    """

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        return top_k_weights(lengths, max_len, lengths.clamp(max=self.k))

    def extra_repr(self) -> str:
        return f"k={self.k}"


class GeMPool(nn.Module):
    """Generalised mean (mean of x^p over the valid elements)^(1/p) with a learned p; inputs clamped to ≥ 1e-6.

    Args:
        p: initial exponent.
    """

    EPS = 1e-6  # GeM is defined on positive inputs; signed features are clamped, as in the CNN-retrieval original

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, None]:
        max_len = int(lengths.max())
        mask = length_mask(lengths, max_len)[..., None]
        x = feats[:, :max_len].float().clamp(min=self.EPS).pow(self.p)
        mean = (x * mask).sum(1) / lengths[:, None].float()
        return mean.pow(1.0 / self.p), None


POOLERS.register("gpo")(lambda cfg: GPO(d_pe=cfg.d_pe, d_hidden=cfg.d_hidden, temperature=cfg.temperature))
POOLERS.register("mean")(lambda cfg: MeanPool())
POOLERS.register("max")(lambda cfg: MaxPool())
POOLERS.register("kmax")(lambda cfg: KMaxPool(k=cfg.k))
POOLERS.register("gem")(lambda cfg: GeMPool(p=cfg.p))


def create_pooler(cfg: PoolConfig | nn.Module, in_dim: int | None = None) -> nn.Module:
    """Build the pooler named by `cfg.name` (or pass a ready-made module through).

    Args:
        cfg: the pooler's config.
        in_dim: the size of the features it will pool (the encoder's embedding size); fills `pool.in_dim` when the
            recipe leaves it unset (a new config object; the recipe's is not changed).
    """
    if isinstance(cfg, nn.Module):
        return cfg
    if in_dim is not None and cfg.in_dim <= 0:
        cfg = dataclasses.replace(cfg, in_dim=in_dim)
    return POOLERS.get(cfg.name)(cfg)


from vsectl.models import gpo_variants  # noqa: E402,F401  (registers the research variants)
