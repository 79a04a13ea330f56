"""The Generalized Pooling Operator (GPO) of VSE∞.

Chen, Hu, Wu, Jiang, Wang, "Learning the Best Pooling Strategy for Visual Semantic Embedding", CVPR 2021.
GPO sorts every feature dimension of a set descending and takes a weighted sum over ranks; the weights θ come from a
small generator that sees only the set size (positional encodings → BiGRU → linear score → softmax).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MASK_VALUE = -10000.0  # padded scores and padded features before sorting (official code)
TEMPERATURE = 0.1      # softmax temperature of the official code; the paper does not state it


def positional_encoding(length: int, d_pe: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal table for 0-based ranks (GPO-1..5).

    Returns:
        (length, d_pe) fp32, column 2j = sin(p·ω_j), column 2j+1 = cos(p·ω_j), ω_j = 10000^(−2j/d_pe).
    """
    if d_pe % 2:
        raise ValueError(f"d_pe must be even, got {d_pe}")
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]          # (L, 1)
    omega = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / d_pe))
    pe = torch.zeros(length, d_pe, dtype=torch.float32, device=device)
    pe[:, 0::2] = torch.sin(pos * omega)
    pe[:, 1::2] = torch.cos(pos * omega)
    return pe


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sort_features(feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort every feature dimension descending over the valid rows; zero the padded tail (GPO-14..16).

    Each dimension's column is sorted as a contiguous row of a (B, D, K') copy: sorting B·D strided columns of the
    (B, K', D) layout, and scattering the gradient back through them, was 1.8× slower for the whole pooling at the
    paper's shapes on CPU (benchmarks/bench_training.py, "transposed").

    Args:
        feats: (B, K, D) sets, padded rows arbitrary.
        lengths: (B,) int64 set sizes, 1 ≤ n ≤ K.

    Returns:
        sorted (B, K', D) with K' = max(lengths) (a transposed view of a contiguous (B, D, K') tensor), and the
        (B, K') validity mask.
    """
    max_len = int(lengths.max())
    feats = feats[:, :max_len]
    mask = length_mask(lengths, max_len)                                              # (B, K')
    filled = feats.masked_fill(~mask[..., None], MASK_VALUE)
    ranked = filled.transpose(1, 2).contiguous().sort(dim=-1, descending=True).values  # (B, D, K')
    ranked = ranked.masked_fill(~mask[:, None, :], 0.0)
    return ranked.transpose(1, 2), mask


def weighted_sum(ranked: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, K', D) sorted features · (B, K', 1 or D) weights → (B, D), in the promoted dtype of the two (fp32 for θ).

    A shared θ is one batched matrix-vector product; autocast is kept off so it stays in fp32 as the elementwise form
    `(ranked * θ).sum(1)` does under type promotion.
    """
    if theta.size(-1) != 1:
        return (ranked * theta).sum(dim=1)
    dtype = torch.promote_types(ranked.dtype, theta.dtype)
    with torch.autocast(device_type=ranked.device.type, enabled=False):
        return torch.bmm(ranked.transpose(1, 2).to(dtype), theta.to(dtype)).squeeze(-1)


class GPO(nn.Module):
    """Generalized Pooling Operator with a Cos/Sin + BiGRU weight generator.

    Args:
        d_pe: positional-encoding size (even).
        d_hidden: GRU hidden size per direction; the two directions are averaged.
        temperature: softmax temperature over ranks.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if d_pe % 2:
            raise ValueError(f"d_pe must be even, got {d_pe}")
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.temperature = temperature
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.scorer = nn.Linear(d_hidden, 1, bias=False)

    def generator_input(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, d_pe) sequence-model input; rows past each length are zero (GPO-6)."""
        pe = positional_encoding(max_len, self.d_pe, device=lengths.device)
        mask = length_mask(lengths, max_len)
        return pe[None] * mask[..., None]

    def sequence(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run the BiGRU on packed sequences and average the directions (GPO-7, GPO-8): (U, L, d_pe) → (U, L, H)."""
        lengths_cpu = lengths.cpu()  # packing requires lengths on the CPU
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (U, L, 2H)
        return (out[..., : self.d_hidden] + out[..., self.d_hidden :]) / 2

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Unnormalised scores for each distinct length: (U,) → (U, max_len, 1)."""
        return self.scorer(self.sequence(self.generator_input(lengths, max_len), lengths))

    def weights_for_lengths(self, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """θ for each length, computed once per distinct length and gathered (GPO-9..13).

        Args:
            lengths: (B,) int64 set sizes.
            max_len: width of the result; defaults to max(lengths).

        Returns:
            (B, max_len, 1) fp32 weights, summing to 1 over the first lengths[b] ranks, exactly 0 after.
        """
        max_len = int(lengths.max()) if max_len is None else max_len
        unique, inverse = torch.unique(lengths, return_inverse=True)
        with torch.autocast(device_type=lengths.device.type, enabled=False):  # fp32: -1e4/0.1 overflows fp16
            scores = self.scores(unique, max_len).float()                     # (U, L, 1)
            mask = length_mask(unique, max_len)[..., None]
            scores = scores.masked_fill(~mask, MASK_VALUE)
            theta = torch.softmax(scores / self.temperature, dim=1)
        return theta[inverse]                                                  # (B, L, 1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool sets of features.

        Args:
            feats: (B, K, D) padded sets.
            lengths: (B,) int64 set sizes.

        Returns:
            pooled (B, D) and weights θ (B, K', 1), K' = max(lengths). Not normalised: the encoder L2-normalises.
        """
        ranked, _ = sort_features(feats, lengths)
        theta = self.weights_for_lengths(lengths, ranked.size(1))
        return weighted_sum(ranked, theta), theta
