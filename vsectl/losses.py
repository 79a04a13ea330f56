"""VSE++ hinge triplet loss on cosine similarities, summed over the batch (spec §7)."""

from __future__ import annotations

import torch
from torch import nn


class ContrastiveLoss(nn.Module):
    """Hinge triplet loss with all negatives (LOSS-2) or the hardest negative per query (LOSS-3), summed (LOSS-4).

    Row i of the image batch and row i of the caption batch are the positive pair; every other item of the batch is a
    negative, including other captions of the same image (LOSS-7).

    Args:
        margin: hinge margin on cosine similarity (0.2).
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, img: torch.Tensor, cap: torch.Tensor, hardest_negative: bool) -> torch.Tensor:
        """(B, E) unit image and caption embeddings → scalar loss (fp32)."""
        cost_cap, cost_img = self._costs(img, cap)
        if hardest_negative:
            return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
        return cost_cap.sum() + cost_img.sum()

    def per_pair(self, img: torch.Tensor, cap: torch.Tensor, hardest_negative: bool) -> torch.Tensor:
        """(B,) each pair's share of `forward`: its image's hinge over the other captions plus its caption's hinge
        over the other images (the shares sum to the loss)."""
        cost_cap, cost_img = self._costs(img, cap)
        if hardest_negative:
            return cost_cap.max(dim=1).values + cost_img.max(dim=0).values
        return cost_cap.sum(dim=1) + cost_img.sum(dim=0)

    def _costs(self, img: torch.Tensor, cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, B) hinge costs of image i against caption j, and of caption j against image i; the diagonal is 0."""
        scores = img.float() @ cap.float().t()                         # (B, B)
        diag = scores.diagonal()[:, None]                              # (B, 1)
        cost_cap = (self.margin + scores - diag).clamp(min=0)          # image i vs caption j
        cost_img = (self.margin + scores - diag.t()).clamp(min=0)      # caption j vs image i
        eye = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
        cost_cap = cost_cap.masked_fill(eye, 0)
        cost_img = cost_img.masked_fill(eye, 0)
        return cost_cap, cost_img
