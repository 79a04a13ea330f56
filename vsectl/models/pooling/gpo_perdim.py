"""gpo_perdim: GPO with a separate θ per feature dimension, the scorer Linear(d_hidden → D) (supplement T7)."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.models.pooling.base import TEMPERATURE, check_feature_size
from vsectl.models.pooling.gpo import GPO


class PerDimGPO(GPO):
    """A separate θ per feature dimension.

    `weights_for_lengths` returns (B, max_len, D): each of the D columns sums to 1 over the valid ranks.

    Args:
        dim: D, the size of the pooled features.
    """

    def __init__(self, dim: int, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__(d_pe=d_pe, d_hidden=d_hidden, temperature=temperature)
        self.dim = dim
        self.scorer = nn.Linear(d_hidden, dim, bias=False)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) sets, (B,) lengths → pooled (B, D) and θ (B, K', D)."""
        check_feature_size(feats, self.dim, "gpo_perdim")
        return super().forward(feats, lengths)
