"""Max pooling as a fixed rank weighting: θ one-hot at rank 0 of each sorted dimension."""

from __future__ import annotations

import torch

from vsectl.models.pooling.base import FixedWeightPool, top_k_weights


class MaxPool(FixedWeightPool):
    """Per-dimension maximum: θ one-hot at rank 0."""

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        return top_k_weights(lengths, max_len, torch.ones_like(lengths))
