"""gpo_mlp: each rank's positional encoding scored on its own by an MLP, so the generator cannot see N (paper §4)."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.models.pooling.base import TEMPERATURE, PositionalRankPool, positional_encoding


class MLPGPO(PositionalRankPool):
    """Cos/Sin + MLP: each rank's PE is scored on its own.

    The layer shape is ours: Linear(d_pe, d_hidden), ReLU, Linear(d_hidden, 1, bias=False).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__(d_pe=d_pe, temperature=temperature)
        self.mlp = nn.Sequential(nn.Linear(d_pe, d_hidden), nn.ReLU(), nn.Linear(d_hidden, 1, bias=False))

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, 1); every row is the same, the mask alone tells sizes apart."""
        per_rank = self.mlp(positional_encoding(max_len, self.d_pe, device=lengths.device))  # (L, 1)
        return per_rank[None].expand(lengths.numel(), -1, -1)
