"""gpo_featin: the sorted features fed to GPO's generator beside the rank encoding (supplement T8; ours)."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.models.pooling.base import TEMPERATURE, check_feature_size, length_mask, masked_softmax
from vsectl.models.pooling.gpo import GPO
from vsectl.runtime import fp32_island


class FeatInGPO(GPO):
    """Features fed to the generator.

    The per-rank sorted features are projected by Linear(D → d_pe) and added to the PE before the BiGRU, so θ depends
    on the set's values and is computed per sample. Padded ranks are zero after sorting and the mask removes them.

    Args:
        dim: D, the size of the pooled features.
    """

    def __init__(self, dim: int, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__(d_pe=d_pe, d_hidden=d_hidden, temperature=temperature)
        self.dim = dim
        self.feat_proj = nn.Linear(dim, d_pe)

    def weights_for_lengths(self, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        raise ConfigError("gpo_featin computes θ from the features as well as the set size, so it has no θ(N) "
                          "curve: look at the weights that encode/extract return instead")

    def weights(self, ranked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, K', D) sorted features (zero tail), (B,) lengths → θ (B, K', 1) fp32."""
        max_len = ranked.size(1)
        mask = length_mask(lengths, max_len)[..., None]                                     # (B, K', 1)
        with fp32_island(lengths.device.type):
            x = self.generator_input(lengths, max_len) + self.feat_proj(ranked.float()) * mask
            return masked_softmax(self.scorer(self.sequence(x, lengths)), mask, self.temperature)

    weights_for_features = weights  # the name it had first

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) sets, (B,) lengths → pooled (B, D) and θ (B, K', 1)."""
        check_feature_size(feats, self.dim, "gpo_featin")
        return super().forward(feats, lengths)
