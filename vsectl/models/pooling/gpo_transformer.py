"""gpo_transformer: a Transformer encoder over the rank encodings in place of GPO's BiGRU (supplement T3)."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.models.pooling.base import TEMPERATURE, PositionalRankPool, length_mask


class TransformerGPO(PositionalRankPool):
    """A Transformer encoder over the PE replaces the BiGRU (sizes are ours).

    PE (d_pe) → Linear(d_pe, d_hidden) → `layers` post-norm encoder layers (`heads` heads, FFN `ffn`, dropout 0) with
    a key-padding mask, so a set attends only to its own ranks and N is visible → Linear(d_hidden, 1, bias=False).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE, layers: int = 1,
                 heads: int = 4, ffn: int = 64) -> None:
        super().__init__(d_pe=d_pe, temperature=temperature)
        if d_hidden % heads:
            raise ValueError(f"transformer heads ({heads}) must divide d_hidden ({d_hidden})")
        self.proj = nn.Linear(d_pe, d_hidden)
        layer = nn.TransformerEncoderLayer(d_hidden, heads, dim_feedforward=ffn, dropout=0.0, batch_first=True)
        # the nested-tensor fast path only exists in eval mode and would make train and eval numerics differ
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.scorer = nn.Linear(d_hidden, 1, bias=False)

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, 1)."""
        mask = length_mask(lengths, max_len)                                                  # (U, L)
        h = self.encoder(self.proj(self.rank_encoding(lengths, max_len)), src_key_padding_mask=~mask)  # (U, L, H)
        return self.scorer(h)
