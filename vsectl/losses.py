"""Training objectives on unit image and caption embeddings, by name (`loss.name` in a recipe).

- ``hinge``: the VSE++ hinge triplet loss of the paper, summed over the batch (spec §7).
- ``infonce``: the symmetric InfoNCE (cross-entropy) loss with a learned temperature, as in CLIP (Radford et al.,
  *Learning Transferable Visual Models From Natural Language Supervision*, ICML 2021) and open_clip.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vsectl.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")

# CLIP, section 2.5: "The learnable temperature parameter τ was initialized to the equivalent of 0.07 from (Wu et al.,
# 2018) and clipped to prevent scaling the logits by more than 100 which we found necessary to prevent training
# instability." open_clip keeps the same two numbers and also keeps the scale at least 1 (log scale ≥ 0).
CLIP_INIT_TEMPERATURE = 0.07
CLIP_MAX_LOGIT_SCALE = 100.0


@LOSSES.register("hinge")
class ContrastiveLoss(nn.Module):
    """Hinge triplet loss with all negatives (LOSS-2) or the hardest negative per query (LOSS-3), summed (LOSS-4).

    Row i of the image batch and row i of the caption batch are the positive pair; every other item of the batch is a
    negative, including other captions of the same image (LOSS-7).

    Args:
        margin: hinge margin on cosine similarity (0.2).
    """

    mines_hardest_negatives = True  # the `loss.hardest_negative_from_epoch` schedule applies

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, img: torch.Tensor, cap: torch.Tensor, hardest_negative: bool = False) -> torch.Tensor:
        """(B, E) unit image and caption embeddings → scalar loss (fp32)."""
        cost_cap, cost_img = self._costs(img, cap)
        if hardest_negative:
            return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
        return cost_cap.sum() + cost_img.sum()

    def per_pair(self, img: torch.Tensor, cap: torch.Tensor, hardest_negative: bool = False) -> torch.Tensor:
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

    @classmethod
    def from_config(cls, cfg: Any) -> ContrastiveLoss:
        return cls(margin=cfg.margin)

    def after_step(self) -> None:
        """Nothing to keep in range."""

    def log_values(self) -> dict[str, float]:
        return {}


@LOSSES.register("infonce")
class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE: the mean of the image→text and text→image cross-entropies over the batch's B × B logits.

    logits = s · img @ capᵀ with s = exp(logit_scale); row i of each batch is the positive of row i, every other row a
    negative. With `learn_temperature` the log scale is a parameter, kept in [0, log(max_logit_scale)] after every
    optimizer step (`after_step`).

    Args:
        temperature: the initial temperature τ = 1/s (CLIP: 0.07).
        max_logit_scale: the largest s allowed (CLIP: 100).
        learn_temperature: learn s; otherwise it stays at 1/temperature.
    """

    mines_hardest_negatives = False  # every negative weighs by its softmax share; there is no hardest-negative switch

    def __init__(self, temperature: float = CLIP_INIT_TEMPERATURE, max_logit_scale: float = CLIP_MAX_LOGIT_SCALE,
                 learn_temperature: bool = True) -> None:
        super().__init__()
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    def forward(self, img: torch.Tensor, cap: torch.Tensor, hardest_negative: bool = False) -> torch.Tensor:
        """(B, E) unit image and caption embeddings → scalar loss (fp32). `hardest_negative` is ignored."""
        return self.per_pair(img, cap).sum()

    def per_pair(self, img: torch.Tensor, cap: torch.Tensor, hardest_negative: bool = False) -> torch.Tensor:
        """(B,) each pair's share of `forward`: its two cross-entropies over 2B (the shares sum to the loss)."""
        logits = self.logit_scale.float().exp() * (img.float() @ cap.float().t())  # (B, B)
        target = torch.arange(logits.size(0), device=logits.device)
        both = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none")
        return both / (2 * logits.size(0))

    @classmethod
    def from_config(cls, cfg: Any) -> InfoNCELoss:
        return cls(temperature=cfg.temperature, max_logit_scale=cfg.max_logit_scale,
                   learn_temperature=cfg.learn_temperature)

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the learned log scale into [0, log(max_logit_scale)] (done on the parameter, as open_clip does)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def log_values(self) -> dict[str, float]:
        """The current temperature, for the training log."""
        return {"temperature": float(torch.exp(-self.logit_scale.detach().float()))}


def create_loss(cfg: Any) -> nn.Module:
    """The loss named by a `LossConfig` (`loss.name`), built from the keys that loss takes; a module passes through."""
    if isinstance(cfg, nn.Module):
        return cfg
    return LOSSES.get(cfg.name).from_config(cfg)
