"""The GPO ablations of the paper as registry keys (spec §2): other weight generators on the same pooling path.

Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding", CVPR 2021, §4 and supplement T3/T7/T8.
Every variant keeps GPO's sort, mask, fp32 softmax(score / τ) and weighted sum; only the score generator changes.
"""

from __future__ import annotations

import torch
from torch import nn

from vsectl.config import PoolConfig
from vsectl.errors import ConfigError
from vsectl.models.gpo import (
    GPO,
    MASK_VALUE,
    TEMPERATURE,
    length_mask,
    positional_encoding,
    sort_features,
    weighted_sum,
)
from vsectl.models.pooling import POOLERS
from vsectl.runtime import fp32_island


class LengthScoredPool(nn.Module):
    """GPO's θ and pooling around a score generator that needs no sequence model.

    Subclasses implement `scores(lengths, max_len) -> (U, max_len, 1)` and set `temperature`; θ, the padding mask, the
    fp32 island and the pooled output are GPO's own methods, so they cannot drift apart.
    """

    temperature: float

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        raise NotImplementedError

    weights_for_lengths = GPO.weights_for_lengths
    forward = GPO.forward


class IndexBiGRUGPO(GPO):
    """Index + BiGRU: a learned index embedding per rank replaces the sinusoid (spec §2 `gpo_index_bigru`).

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


class InterpGPO(LengthScoredPool):
    """Interp. (FSPool-style): scores are a piecewise-linear function of the relative rank k/(n−1) (spec §2).

    Args:
        n_knots: learned knots, n_knots − 1 pieces over [0, 1], all initialised to 1/(n_knots − 1) (uniform θ).
        temperature: softmax temperature over ranks.
    """

    def __init__(self, n_knots: int = 21, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if n_knots < 2:
            raise ValueError(f"n_knots must be at least 2, got {n_knots}")
        self.temperature = temperature
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


class MLPGPO(LengthScoredPool):
    """Cos/Sin + MLP: each rank's PE is scored on its own, so the generator cannot see N (spec §2 `gpo_mlp`).

    The layer shape is ours: Linear(d_pe, d_hidden), ReLU, Linear(d_hidden, 1, bias=False).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if d_pe % 2:
            raise ValueError(f"d_pe must be even, got {d_pe}")
        self.d_pe = d_pe
        self.temperature = temperature
        self.mlp = nn.Sequential(nn.Linear(d_pe, d_hidden), nn.ReLU(), nn.Linear(d_hidden, 1, bias=False))

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, 1); every row is the same, the mask alone tells sizes apart."""
        per_rank = self.mlp(positional_encoding(max_len, self.d_pe, device=lengths.device))  # (L, 1)
        return per_rank[None].expand(lengths.numel(), -1, -1)


class TransformerGPO(LengthScoredPool):
    """A Transformer encoder over the PE replaces the BiGRU (supplement T3; sizes are ours, spec §2).

    PE (d_pe) → Linear(d_pe, d_hidden) → `layers` post-norm encoder layers (`heads` heads, FFN `ffn`, dropout 0) with
    a key-padding mask, so a set attends only to its own ranks and N is visible → Linear(d_hidden, 1, bias=False).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE, layers: int = 1,
                 heads: int = 4, ffn: int = 64) -> None:
        super().__init__()
        if d_pe % 2:
            raise ValueError(f"d_pe must be even, got {d_pe}")
        if d_hidden % heads:
            raise ValueError(f"transformer heads ({heads}) must divide d_hidden ({d_hidden})")
        self.d_pe = d_pe
        self.temperature = temperature
        self.proj = nn.Linear(d_pe, d_hidden)
        layer = nn.TransformerEncoderLayer(d_hidden, heads, dim_feedforward=ffn, dropout=0.0, batch_first=True)
        # the nested-tensor fast path only exists in eval mode and would make train and eval numerics differ
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.scorer = nn.Linear(d_hidden, 1, bias=False)

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(U,) lengths → (U, max_len, 1)."""
        mask = length_mask(lengths, max_len)                                                  # (U, L)
        x = positional_encoding(max_len, self.d_pe, device=lengths.device)[None] * mask[..., None]
        h = self.encoder(self.proj(x), src_key_padding_mask=~mask)                            # (U, L, d_hidden)
        return self.scorer(h)


def _check_dim(feats: torch.Tensor, dim: int, name: str) -> None:
    if feats.size(-1) != dim:
        raise ConfigError(f"{name} was built for {dim}-d features (pool.in_dim) but got {feats.size(-1)}-d; "
                          "set pool.in_dim to the branch's embedding size (model.embed_dim)")


class PerDimGPO(GPO):
    """A separate θ per feature dimension: the scorer is Linear(d_hidden → D) (supplement T7, spec §2 `gpo_perdim`).

    `weights_for_lengths` returns (B, max_len, D): each of the D columns sums to 1 over the valid ranks.

    Args:
        dim: D, the size of the pooled features.
    """

    def __init__(self, dim: int, d_pe: int = 32, d_hidden: int = 32, temperature: float = TEMPERATURE) -> None:
        super().__init__(d_pe=d_pe, d_hidden=d_hidden, temperature=temperature)
        self.dim = dim
        self.scorer = nn.Linear(d_hidden, dim, bias=False)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) sets, (B,) lengths → pooled (B, D) and θ (B, K', D)."""
        _check_dim(feats, self.dim, "gpo_perdim")
        return super().forward(feats, lengths)


class FeatInGPO(GPO):
    """Features fed to the generator (supplement T8; the construction is ours, spec §2 `gpo_featin`).

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

    def weights_for_features(self, ranked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, K', D) sorted features (zero tail), (B,) lengths → θ (B, K', 1) fp32."""
        max_len = ranked.size(1)
        mask = length_mask(lengths, max_len)[..., None]                                     # (B, K', 1)
        with fp32_island(lengths.device.type):
            x = self.generator_input(lengths, max_len) + self.feat_proj(ranked.float()) * mask
            scores = self.scorer(self.sequence(x, lengths)).float().masked_fill(~mask, MASK_VALUE)
            return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) sets, (B,) lengths → pooled (B, D) and θ (B, K', 1)."""
        _check_dim(feats, self.dim, "gpo_featin")
        ranked, _ = sort_features(feats, lengths)
        theta = self.weights_for_features(ranked, lengths)
        return weighted_sum(ranked, theta), theta


def _needs_dim(cfg: PoolConfig) -> int:
    if cfg.in_dim <= 0:
        raise ConfigError(f"pooler '{cfg.name}' needs pool.in_dim, the size of the features it pools "
                          "(the encoders pass model.embed_dim; standalone, set it), e.g. pool.in_dim=1024")
    return cfg.in_dim


POOLERS.register("gpo_index_bigru")(
    lambda cfg: IndexBiGRUGPO(cfg.d_pe, cfg.d_hidden, cfg.temperature, max_index=cfg.max_index))
POOLERS.register("gpo_interp")(lambda cfg: InterpGPO(n_knots=cfg.n_knots, temperature=cfg.temperature))
POOLERS.register("gpo_mlp")(lambda cfg: MLPGPO(cfg.d_pe, cfg.d_hidden, cfg.temperature))
POOLERS.register("gpo_transformer")(
    lambda cfg: TransformerGPO(cfg.d_pe, cfg.d_hidden, cfg.temperature, layers=cfg.transformer_layers,
                               heads=cfg.transformer_heads, ffn=cfg.transformer_ffn))
POOLERS.register("gpo_perdim")(lambda cfg: PerDimGPO(_needs_dim(cfg), cfg.d_pe, cfg.d_hidden, cfg.temperature))
POOLERS.register("gpo_featin")(lambda cfg: FeatInGPO(_needs_dim(cfg), cfg.d_pe, cfg.d_hidden, cfg.temperature))
