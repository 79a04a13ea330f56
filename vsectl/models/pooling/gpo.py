"""GPO, the Generalized Pooling Operator of VSE∞: a BiGRU over rank encodings scores each rank.

Chen, Hu, Wu, Jiang, Wang, "Learning the Best Pooling Strategy for Visual Semantic Embedding", CVPR 2021.
GPO sorts every feature dimension of a set descending and takes a weighted sum over ranks; the weights θ come from a
small generator that sees only the set size (positional encodings → BiGRU → linear score → softmax).
"""

from __future__ import annotations

import torch
from torch import nn

from vsectl.models.pooling.base import TEMPERATURE, PositionalRankPool, length_mask
from vsectl.models.rnn import bigru, direction, gather_time, reverse_index, use_dense


class GPO(PositionalRankPool):
    """Generalized Pooling Operator with a Cos/Sin + BiGRU weight generator.

    Args:
        d_pe: positional-encoding size (even).
        d_hidden: GRU hidden size per direction; the two directions are averaged.
        temperature: softmax temperature over ranks.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__(d_pe=d_pe, temperature=temperature)
        self.d_hidden = d_hidden
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.scorer = nn.Linear(d_hidden, 1, bias=False)

    def generator_input(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, d_pe) sequence-model input; rows past each length are zero (GPO-6)."""
        return self.rank_encoding(lengths, max_len)

    def sequence(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run the BiGRU and average the directions (GPO-7, GPO-8): (U, L, d_pe) → (U, L, H), zero past lengths."""
        out = bigru(self.gru, x, lengths)                                             # (U, L, 2H)
        return (out[..., : self.d_hidden] + out[..., self.d_hidden :]) / 2

    def prefix_sequence(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """`sequence` of the generator input, using that its row t is the same for every length (a rank's encoding).

        The forward direction at rank t sees ranks 0..t only, so one pass over the longest set serves every length;
        the reverse direction runs densely on each length's rows reversed. (U,) lengths → (U, max_len, H).
        """
        full = self.generator_input(lengths.max().reshape(1), max_len)               # (1, L, d_pe)
        index = reverse_index(lengths, max_len)                                       # (U, L)
        fwd = direction(self.gru, full, reverse=False)                                # (1, L, H)
        bwd = gather_time(direction(self.gru, full[0][index], reverse=True), index)   # (U, L, H)
        valid = length_mask(lengths, max_len)[..., None]
        return (fwd + bwd) / 2 * valid.to(bwd.dtype)

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Unnormalised scores for each distinct length: (U,) → (U, max_len, 1)."""
        if use_dense(lengths.device):
            return self.scorer(self.prefix_sequence(lengths, max_len))
        return self.scorer(self.sequence(self.generator_input(lengths, max_len), lengths))
