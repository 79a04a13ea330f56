"""gpo_interp: scores as a learned piecewise-linear function of the relative rank (FSPool-style; paper §4 ablation)."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.models.pooling.base import TEMPERATURE, LearnedRankPool


class InterpGPO(LearnedRankPool):
    """Interp.: scores are a piecewise-linear function of the relative rank k/(n−1).

    Args:
        n_knots: learned knots, n_knots − 1 pieces over [0, 1], all initialised to 1/(n_knots − 1) (uniform θ).
        temperature: softmax temperature over ranks.
    """

    def __init__(self, n_knots: int = 21, temperature: float = TEMPERATURE) -> None:
        super().__init__(temperature=temperature)
        if n_knots < 2:
            raise ValueError(f"n_knots must be at least 2, got {n_knots}")
        self.knots = nn.Parameter(torch.full((n_knots,), 1.0 / (n_knots - 1)))

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, 1) knot interpolation at ratio k/(n−1); n = 1 reads ratio 0."""
        pieces = self.knots.numel() - 1
        k = torch.arange(max_len, device=lengths.device, dtype=torch.float32)
        ratio = (k[None] / (lengths[:, None] - 1).clamp(min=1).float()).clamp(max=1.0)  # (U, L); > 1 only on padding
        pos = ratio * pieces
        lo = pos.floor().long().clamp(max=pieces - 1)
        frac = pos - lo.float()
        knots = self.knots.float()
        return (knots[lo] * (1 - frac) + knots[lo + 1] * frac)[..., None]

    def extra_repr(self) -> str:
        return f"n_knots={self.knots.numel()}, temperature={self.temperature}"
