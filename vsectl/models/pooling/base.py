"""The pooler family's common path: sort each dimension of a set, weigh the ranks, sum.

Chen, Hu, Wu, Jiang, Wang, "Learning the Best Pooling Strategy for Visual Semantic Embedding", CVPR 2021. Every
pooler maps (feats (B, K, D), lengths (B,)) → (pooled (B, D), θ (B, K', 1 or D) or None). The rank-weighted ones,
GPO and its variants and the fixed max/mean/maxk, share the sort, the padding mask and the weighted sum below; the
learned ones also share the fp32 softmax over masked scores and the θ(N) curve. A member only says how it weighs ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.native import sortsets
from vsectl.runtime import fp32_island

MASK_VALUE = -10000.0  # padded scores and padded features before sorting (official code)
TEMPERATURE = 0.1      # softmax temperature of the official code; the paper does not state it


def positional_encoding(length: int, d_pe: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal table for 0-based ranks (GPO-1..5).

    Returns:
        (length, d_pe) fp32, column 2j = sin(p·ω_j), column 2j+1 = cos(p·ω_j), ω_j = 10000^(−2j/d_pe).
    """
    check_d_pe(d_pe)
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]          # (L, 1)
    omega = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / d_pe))
    pe = torch.zeros(length, d_pe, dtype=torch.float32, device=device)
    pe[:, 0::2] = torch.sin(pos * omega)
    pe[:, 1::2] = torch.cos(pos * omega)
    return pe


def check_d_pe(d_pe: int) -> None:
    """The sinusoid comes in sin/cos pairs, so its size must be even."""
    if d_pe % 2:
        raise ValueError(f"d_pe must be even, got {d_pe}")


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sort_features(feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort every feature dimension descending over the valid rows; zero the padded tail (GPO-14..16).

    On a CPU this is the native kernel `vsectl.native.sortsets` (a sorting network over each set's valid rows, 15×
    faster than `torch.sort` at the paper's shapes); elsewhere, or where the kernel cannot be built, padded rows are
    filled with MASK_VALUE and each dimension's column is sorted as a contiguous row of a (B, D, K') copy (sorting
    the strided columns of the (B, K', D) layout was 1.8× slower on CPU, benchmarks/bench_training.py).
    Both give the same values.

    Args:
        feats: (B, K, D) sets, padded rows arbitrary.
        lengths: (B,) int64 set sizes, 1 ≤ n ≤ K.

    Returns:
        sorted (B, K', D) with K' = max(lengths), and the (B, K') validity mask.
    """
    if sortsets.available(feats):
        return sortsets.sort_sets(feats, lengths), length_mask(lengths, int(lengths.max()))
    return torch_sort_features(feats, lengths)


def torch_sort_features(feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sort_features` with torch.sort: fill padding with MASK_VALUE, sort a (B, D, K') copy, zero the padding.

    Returns:
        sorted (B, K', D) (a transposed view of the contiguous sort), and the (B, K') validity mask.
    """
    max_len = int(lengths.max())
    mask = length_mask(lengths, max_len)                                              # (B, K')
    filled = feats[:, :max_len].masked_fill(~mask[..., None], MASK_VALUE)
    ranked = filled.transpose(1, 2).contiguous().sort(dim=-1, descending=True).values  # (B, D, K')
    ranked = ranked.masked_fill(~mask[:, None, :], 0.0)
    return ranked.transpose(1, 2), mask


def weighted_sum(ranked: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, K', D) sorted features · (B, K', 1 or D) weights → (B, D), in the promoted dtype of the two (fp32 for θ).

    A shared θ is one batched vector-matrix product θᵀ·ranked, which reads the (B, K', D) layout as it lies and
    gives `ranked` a contiguous gradient (the form ranked^T·θ gave a transposed one that cost a copy); autocast is
    kept off so it stays in fp32 as the elementwise form `(ranked * θ).sum(1)` does under type promotion.
    """
    if theta.size(-1) != 1:
        return (ranked * theta).sum(dim=1)
    dtype = torch.promote_types(ranked.dtype, theta.dtype)
    with fp32_island(ranked.device.type):
        return torch.bmm(theta.transpose(1, 2).to(dtype), ranked.to(dtype)).squeeze(1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, L, 1 or D) scores, (N, L, 1) validity → θ, a softmax over ranks in fp32 that is exactly 0 on padding.

    Call it inside `fp32_island`: under fp16 autocast MASK_VALUE / temperature = −1e5 overflows.
    """
    return torch.softmax(scores.float().masked_fill(~mask, MASK_VALUE) / temperature, dim=1)


class RankWeightedPool(nn.Module):
    """A weight per rank on the per-dimension sorted set: pooled = Σ_k θ_k · sorted_k.

    Members implement `theta(lengths, max_len) → (B, max_len, 1 or D)`; a member whose θ also depends on the values
    overrides `weights(ranked, lengths)` instead.
    """

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, ranked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, K', D) sorted features, (B,) lengths → θ (B, K', 1 or D)."""
        return self.theta(lengths, ranked.size(1))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool sets of features.

        Args:
            feats: (B, K, D) padded sets.
            lengths: (B,) int64 set sizes.

        Returns:
            pooled (B, D) and weights θ (B, K', 1 or D), K' = max(lengths). Not normalised: the encoder L2-normalises.
        """
        ranked, _ = sort_features(feats, lengths)
        theta = self.weights(ranked, lengths)
        return weighted_sum(ranked, theta), theta


class FixedWeightPool(RankWeightedPool):
    """A pooler whose θ is a fixed function of the set size (max, mean, maxk): nothing is learned."""


def top_k_weights(lengths: torch.Tensor, max_len: int, k: torch.Tensor) -> torch.Tensor:
    """θ = 1/k on the first k ranks (k per sample, already clipped to the length): (B, max_len, 1) fp32."""
    mask = length_mask(k, max_len)
    return (mask.float() / k[:, None].float())[..., None]


class LearnedRankPool(RankWeightedPool):
    """θ = softmax(score / τ) over the valid ranks, the scores from a learned generator that sees the set size.

    Members implement `scores(lengths, max_len) → (U, max_len, 1 or D)` for U distinct lengths. θ is computed once
    per distinct length and gathered, and its curve θ(N) is what `plot-weights` draws.

    Args:
        temperature: softmax temperature over ranks.
    """

    def __init__(self, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        raise NotImplementedError

    def weights_for_lengths(self, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """θ for each length, computed once per distinct length and gathered (GPO-9..13).

        Args:
            lengths: (B,) int64 set sizes.
            max_len: width of the result; defaults to max(lengths).

        Returns:
            (B, max_len, 1 or D) fp32 weights, summing to 1 over the first lengths[b] ranks, exactly 0 after.
        """
        max_len = int(lengths.max()) if max_len is None else max_len
        unique, inverse = torch.unique(lengths, return_inverse=True)
        with fp32_island(lengths.device.type):
            theta = masked_softmax(self.scores(unique, max_len), length_mask(unique, max_len)[..., None],
                                   self.temperature)                                    # (U, L, 1)
        return theta[inverse]                                                           # (B, L, 1)

    def theta(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        return self.weights_for_lengths(lengths, max_len)


class PositionalRankPool(LearnedRankPool):
    """A learned generator fed the sinusoidal encoding of each rank (GPO and most of its variants).

    Args:
        d_pe: positional-encoding size (even).
        temperature: softmax temperature over ranks.
    """

    def __init__(self, d_pe: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__(temperature=temperature)
        check_d_pe(d_pe)
        self.d_pe = d_pe

    def rank_encoding(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, d_pe) positional encodings; rows past each length are zero (GPO-6)."""
        pe = positional_encoding(max_len, self.d_pe, device=lengths.device)
        return pe[None] * length_mask(lengths, max_len)[..., None]


def check_feature_size(feats: torch.Tensor, dim: int, name: str) -> None:
    """A pooler built for D-d features refuses others with one line naming the setting."""
    if feats.size(-1) != dim:
        raise ConfigError(f"{name} was built for {dim}-d features (pool.in_dim) but got {feats.size(-1)}-d; "
                          "set pool.in_dim to the branch's embedding size (model.embed_dim)")
