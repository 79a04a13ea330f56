"""K-max pooling (maxk, also kmax): the per-dimension mean of the K largest values, a fixed rank weighting."""

from __future__ import annotations

import torch

from vsectl.models.pooling.base import FixedWeightPool, top_k_weights


class MaxKPool(FixedWeightPool):
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


