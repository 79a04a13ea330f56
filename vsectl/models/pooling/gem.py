"""GeM, the generalised mean (Radenović et al.): the one member of the family that does not weigh sorted ranks."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.models.pooling.base import length_mask


class GeMPool(nn.Module):
    """Generalised mean (mean of x^p over the valid elements)^(1/p) with a learned p; inputs clamped to ≥ 1e-6.

    Returns no θ: a power mean has no weight per rank.

    Args:
        p: initial exponent.
    """

    EPS = 1e-6  # GeM is defined on positive inputs; signed features are clamped, as in the CNN-retrieval original

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(B, K, D) sets, (B,) lengths → pooled (B, D) fp32 and None."""
        max_len = int(lengths.max())
        mask = length_mask(lengths, max_len)[..., None]
        x = feats[:, :max_len].float().clamp(min=self.EPS).pow(self.p)
        mean = (x * mask).sum(1) / lengths[:, None].float()
        return mean.pow(1.0 / self.p), None
