"""Export-friendly towers: the trained encoders rewritten without packed sequences or data-dependent shapes.

ONNX graphs have fixed structure, so two pieces of the training code are reformulated with the same arithmetic:

- A packed bidirectional GRU becomes two plain unidirectional GRUs. The forward direction is causal, so its outputs at
  valid positions do not depend on the padding after them. The backward direction must start at each sequence's last
  valid element with a zero state: each sequence is reversed within its own length (a gather), run forward with the
  reverse weights, and reversed back by the same gather.
- Poolers cut their padded input to max(lengths), a value read from the data. Here they sort and weight over the full
  padded width K instead: padded ranks hold zeros after the sort and their weights are exactly zero (the masked
  softmax underflows to 0), so the extra ranks add nothing.

The equality with the training modules is checked in tests/test_export.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.models.grid import PIXEL_SCALE, BackboneGridEncoder
from vsectl.models.image_encoders import GridEncoder, RegionEncoder, l2_normalize
from vsectl.models.pooling import (
    GPO,
    MASK_VALUE,
    MLPGPO,
    FixedWeightPool,
    GeMPool,
    InterpGPO,
    PerDimGPO,
    length_mask,
    masked_softmax,
)
from vsectl.models.text_encoders import BiGRUTextEncoder, TransformerTextEncoder
from vsectl.pool_options import exportable_poolers

EXPORTABLE_POOLERS = exportable_poolers()  # the rows of the pooler table marked onnx


def _single_direction(gru: nn.GRU, suffix: str) -> nn.GRU:
    """A one-direction copy of a 1-layer bidirectional GRU's forward ('') or reverse ('_reverse') weights."""
    single = nn.GRU(gru.input_size, gru.hidden_size, num_layers=1, batch_first=True, bias=gru.bias)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            if hasattr(single, name):
                getattr(single, name).copy_(getattr(gru, name + suffix))
    return single.eval()


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence's first lengths[b] steps, leaving the padding in place: (B, T, D) → (B, T, D).

    The map is its own inverse on the valid steps.
    """
    t = torch.arange(x.size(1), device=x.device)[None, :]                              # (1, T)
    n = lengths[:, None]
    index = torch.where(t < n, n - 1 - t, t)                                           # (B, T)
    return x.gather(1, index[..., None].expand(-1, -1, x.size(2)))


class LengthBiGRU(nn.Module):
    """A 1-layer bidirectional GRU over padded sequences that equals the packed one, directions averaged.

    Args:
        gru: a trained `nn.GRU(bidirectional=True, num_layers=1, batch_first=True)`; its weights are copied.
    """

    def __init__(self, gru: nn.GRU) -> None:
        super().__init__()
        if not (gru.bidirectional and gru.num_layers == 1 and gru.batch_first):
            raise ConfigError("only 1-layer, batch-first bidirectional GRUs can be exported")
        self.forward_gru = _single_direction(gru, "")
        self.backward_gru = _single_direction(gru, "_reverse")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) padded input, (B,) lengths → (B, T, H) mean of the two directions, zero past each length."""
        fwd, _ = self.forward_gru(x)
        bwd, _ = self.backward_gru(reverse_within_length(x, lengths))
        out = (fwd + reverse_within_length(bwd, lengths)) / 2
        return out * length_mask(lengths, x.size(1))[..., None].to(out.dtype)


def sinusoid_table(length: torch.Tensor | int, d_pe: int, device: torch.device) -> torch.Tensor:
    """The GPO positional encoding built by interleaving (no slice assignment): (L, d_pe), sin at even columns."""
    pos = torch.arange(length, device=device).float()[:, None]                         # (L, 1)
    omega = torch.exp(torch.arange(0, d_pe, 2, device=device).float() * (-math.log(10000.0) / d_pe))
    angle = pos * omega                                                                # (L, d_pe/2)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).reshape(-1, d_pe)


def sort_padded(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Every dimension sorted descending over the valid rows, padded ranks zero, at the full width: (B, K, D)."""
    mask = length_mask(lengths, feats.size(1))[..., None]                              # (B, K, 1)
    ranked = feats.masked_fill(~mask, MASK_VALUE).sort(dim=1, descending=True).values
    return ranked.masked_fill(~mask, 0.0)


class ExportPool(nn.Module):
    """A trained pooler on the export path: θ over the full padded width, then the weighted sum (or GeM)."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        if type(pool) in (GPO, PerDimGPO):
            self.sequence = LengthBiGRU(pool.gru)
        elif not isinstance(pool, MLPGPO | InterpGPO | FixedWeightPool | GeMPool):
            raise ConfigError(f"pooler {type(pool).__name__} cannot be exported to ONNX; exportable poolers: "
                              + ", ".join(EXPORTABLE_POOLERS))

    def theta(self, lengths: torch.Tensor, width: torch.Tensor | int, device: torch.device) -> torch.Tensor:
        """(B,) lengths → (B, width, 1 or D) fp32 weights, zero past each length."""
        pool = self.pool
        if isinstance(pool, FixedWeightPool):                                          # mean, max, maxk
            return pool.theta(lengths, width)
        mask = length_mask(lengths, width)                                             # (B, W)
        if isinstance(pool, GPO):
            x = sinusoid_table(width, pool.d_pe, device)[None] * mask[..., None]       # (B, W, d_pe)
            scores = pool.scorer(self.sequence(x, lengths))                            # (B, W, 1 or D)
        else:                                                                          # MLP / Interp: no sequence model
            scores = pool.scores(lengths, width)
        return masked_softmax(scores, mask[..., None], pool.temperature)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, K, D) padded sets, (B,) lengths → (B, D) pooled (not normalised)."""
        if isinstance(self.pool, GeMPool):
            mask = length_mask(lengths, feats.size(1))[..., None]
            x = feats.float().clamp(min=GeMPool.EPS).pow(self.pool.p)
            return ((x * mask).sum(1) / lengths[:, None].float()).pow(1.0 / self.pool.p)
        ranked = sort_padded(feats, lengths)
        theta = self.theta(lengths, feats.size(1), feats.device)
        return (ranked.float() * theta).sum(dim=1)


class ImageTower(nn.Module):
    """features (B, K, feat_dim) + lengths (B,) → (B, E) unit vectors, for a region or grid encoder in eval mode
    (or the head of an end-to-end grid encoder, over its backbone's cells)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(encoder, RegionEncoder | GridEncoder | BackboneGridEncoder):
            raise ConfigError(f"image encoder {type(encoder).__name__} cannot be exported to ONNX")
        self.encoder = encoder.eval()
        self.pool = ExportPool(encoder.pool)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.fc(feats) + enc.mlp(feats) if isinstance(enc, RegionEncoder) else enc.fc(feats)  # (B, K, E)
        return l2_normalize(self.pool(x, lengths))


class TextTower(nn.Module):
    """token ids (B, T) + lengths (B,) → (B, E) unit vectors, for a BiGRU or transformers encoder in eval mode."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.pool = ExportPool(encoder.pool)
        if isinstance(encoder, BiGRUTextEncoder):
            self.rnn = LengthBiGRU(encoder.rnn)
        elif not isinstance(encoder, TransformerTextEncoder):
            raise ConfigError(f"text encoder {type(encoder).__name__} cannot be exported to ONNX")

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if isinstance(enc, BiGRUTextEncoder):
            hidden = self.rnn(enc.embed(tokens), lengths)                              # (B, T, E)
        else:
            hidden = enc.proj(enc.states(tokens, lengths))                             # (B, T, E)
        return l2_normalize(self.pool(hidden, lengths))


class BackboneCells(nn.Module):
    """(B, 3, S, S) uint8 RGB → (B, N, C) cells of a frozen feature backbone, as `vsectl extract` computes them.

    Args:
        backbone: the run's feature backbone (its mean and std on the [0, 1] scale).
        round_to: the store's dtype when it is not float32: the features the head trained on were rounded to it.
    """

    def __init__(self, backbone: nn.Module, round_to: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.round_to = round_to

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone((images.float() / PIXEL_SCALE - self.mean) / self.std).float()   # (B, N, C)
        return feats.to(self.round_to).float() if self.round_to is not None else feats


class EncoderCells(nn.Module):
    """(B, 3, S, S) uint8 → (B, N, C) cells of an end-to-end grid encoder's own (trained) backbone."""

    def __init__(self, encoder: BackboneGridEncoder) -> None:
        super().__init__()
        self.encoder = encoder.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.cells(images)


class PixelTower(nn.Module):
    """(B, 3, S, S) uint8 RGB images → (B, E) unit vectors: the backbone inside, every image a full grid of cells."""

    def __init__(self, cells: nn.Module, head: ImageTower) -> None:
        super().__init__()
        self.cells, self.head = cells, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.cells(images)                                                     # (B, N, C)
        lengths = torch.ones_like(feats[:, :, 0], dtype=torch.int64).sum(dim=1)        # (B,) = N, traced by shape
        return self.head(feats, lengths)
