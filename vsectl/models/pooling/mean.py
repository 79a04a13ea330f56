"""Mean pooling as a fixed rank weighting: θ_k = 1/n on the n valid ranks."""

from __future__ import annotations

import torch

from vsectl.models.pooling.base import FixedWeightPool, top_k_weights


class MeanPool(FixedWeightPool):
    """Average over the valid elements: θ_k = 1/n."""

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        return top_k_weights(lengths, max_len, lengths)
