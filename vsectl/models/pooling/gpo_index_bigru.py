"""gpo_index_bigru: GPO with a learned index embedding per rank in place of the sinusoid (paper §4 ablation)."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.models.pooling.base import TEMPERATURE, length_mask
from vsectl.models.pooling.gpo import GPO


class IndexBiGRUGPO(GPO):
    """Index + BiGRU: a learned index embedding per rank replaces the sinusoid.

    Args:
        d_pe: index-embedding size.
        d_hidden: GRU hidden size per direction.
        temperature: softmax temperature over ranks.
        max_index: rows of the index table; longer sets are an error.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE,
                 max_index: int = 1000) -> None:
        super().__init__(d_pe=d_pe, d_hidden=d_hidden, temperature=temperature)
        self.max_index = max_index
        self.index = nn.Embedding(max_index, d_pe)  # default N(0, 1) init, the same scale as a learned PE

    def generator_input(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, d_pe) index embeddings, zero past each length."""
        longest = int(lengths.max())
        if longest > self.max_index:
            raise ConfigError(f"gpo_index_bigru learned {self.max_index} index embeddings but got a set of {longest}; "
                              "raise pool.max_index (and retrain)")
        table = self.index.weight[: min(max_len, self.max_index)]                      # (L, d_pe)
        table = nn.functional.pad(table, (0, 0, 0, max_len - table.size(0)))         # rows past max_index are masked
        return table[None] * length_mask(lengths, max_len)[..., None]
