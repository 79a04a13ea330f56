"""Image encoders over precomputed feature sets: region (fc + MLP residual) and grid (fc only) heads (spec §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vsectl.config import ImageConfig
from vsectl.kinds import IMAGE_KINDS, resolve
from vsectl.models.pooling import create_pooler
from vsectl.models.pooling.base import length_mask

L2_EPS = 1e-8           # added to the norm, not under the square root (GPO-18)
GRID_DROP_MAX = 0.2     # grid size augmentation: drop rate p = 0.2·u when u > 0.2 (spec §3)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / (‖x‖₂ + 1e-8) along the last dimension, in fp32."""
    x = x.float()
    return x / (x.norm(dim=-1, keepdim=True) + L2_EPS)


def xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear with Xavier-uniform weights (bound √6/√(in+out)) and zero bias (IMG-2)."""
    fc = nn.Linear(in_dim, out_dim)
    nn.init.xavier_uniform_(fc.weight)
    nn.init.zeros_(fc.bias)
    return fc


class TwoLayerMLP(nn.Module):
    """Linear → BatchNorm1d → ReLU → Linear applied row-wise (IMG-3).

    The BN runs over all flattened (B·K) rows, padded rows included, as in the official code.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, _ = x.shape
        h = self.fc1(x).reshape(b * k, -1)                   # (B·K, hidden)
        h = F.relu(self.bn(h)).reshape(b, k, -1)
        return self.fc2(h)                                    # (B, K, out)

    def rows_and_zeros(self, rows: torch.Tensor, n_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` over `rows` (N, in) plus `n_zero` ≥ 1 all-zero rows, the BN's batch being all N + n_zero rows.

        fc1 of a zero row is exactly its bias and every zero row is alike after BN, so fc2 runs on one of them.
        Returns the rows' (N, out) and the zero rows' common (1, out).
        """
        h = torch.cat([self.fc1(rows), self.fc1.bias.expand(n_zero, -1).to(rows.dtype)])  # (N + n_zero, hidden)
        h = F.relu(self.bn(h))
        out = self.fc2(h[: rows.size(0) + 1])                                         # (N + 1, out)
        return out[:-1], out[-1:]


def grid_size_augment(
    feats: torch.Tensor, lengths: torch.Tensor, max_drop: float = GRID_DROP_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop grid cells on the device (spec §3, grid row): u ~ U(0,1) per sample; if u > 0.2 drop each cell w.p. 0.2·u.

    Survivors keep their order and are zero-padded; the batch is cut to the longest survivor; at least one cell stays.

    Args:
        feats: (B, K, D).
        lengths: (B,) int64.

    Returns:
        (B, K'', D) features and their new (B,) lengths.
    """
    b, k, _ = feats.shape
    u = torch.rand(b, device=feats.device)
    p = torch.where(u > max_drop, max_drop * u, torch.zeros_like(u))                   # (B,)
    keep = (torch.rand(b, k, device=feats.device) >= p[:, None]) & length_mask(lengths, k)
    none_kept = ~keep.any(dim=1)
    keep[none_kept, 0] = True                                                         # never an empty set
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices            # survivors first, in order
    new_lengths = keep.sum(dim=1)
    gathered = feats.gather(1, order[..., None].expand_as(feats))
    gathered = gathered * length_mask(new_lengths, k)[..., None]
    max_len = int(new_lengths.max())
    return gathered[:, :max_len], new_lengths


class RegionEncoder(nn.Module):
    """fc(x) + MLP(x) → pooler → L2 (IMG-1..5). Size augmentation happens in the data worker for regions."""

    def __init__(self, feat_dim: int, embed_dim: int, pool: nn.Module, mlp_hidden: int = 512) -> None:
        super().__init__()
        self.fc = xavier_linear(feat_dim, embed_dim)
        self.mlp = TwoLayerMLP(feat_dim, mlp_hidden, embed_dim)
        self.pool = pool

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K, feat_dim), (B,) → L2-normalised (B, E) and the pooling weights."""
        pooled, weights = self.pool(self.project(feats, lengths), lengths)
        return l2_normalize(pooled), weights

    def project(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """fc(x) + MLP(x) over (B, K, feat_dim) → (B, K, E), the matrix products over the valid rows only.

        A zero-padded row (as collate pads) gives the same output everywhere, computed once; its BN statistics still
        count, as in the official code, so the result is that of the plain form over all B·K rows (up to rounding).
        With 20% of the regions dropped, a fifth of the rows are padding. Non-zero padding takes the plain form.
        """
        b, k, f = feats.shape
        flat = feats.reshape(b * k, f)
        valid = length_mask(lengths, k).reshape(-1)
        n_pad = b * k - int(valid.sum())
        if n_pad == 0 or bool(flat[~valid].any()):
            return self.fc(feats) + self.mlp(feats)                                    # (B, K, E)
        index = valid.nonzero().squeeze(1)                                            # (N,)
        rows = flat.index_select(0, index)                                            # (N, feat_dim)
        mlp_rows, mlp_zero = self.mlp.rows_and_zeros(rows, n_pad)
        out = self.fc(rows) + mlp_rows                                                # (N, E)
        zero = (self.fc.bias + mlp_zero).to(out.dtype)                                # (1, E): fc(0) = its bias
        return zero.expand(b * k, -1).index_copy(0, index, out).view(b, k, -1)


class GridEncoder(nn.Module):
    """Grid cells → (size augmentation in training) → fc → pooler → L2 (IMG-6)."""

    def __init__(self, feat_dim: int, embed_dim: int, pool: nn.Module, size_augment: bool = True) -> None:
        super().__init__()
        self.fc = xavier_linear(feat_dim, embed_dim)
        self.pool = pool
        self.size_augment = size_augment

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.training and self.size_augment:
            feats, lengths = grid_size_augment(feats, lengths)
        pooled, weights = self.pool(self.fc(feats), lengths)
        return l2_normalize(pooled), weights


def build_region(cfg: ImageConfig, embed_dim: int) -> nn.Module:
    return RegionEncoder(cfg.feat_dim, embed_dim, create_pooler(cfg.pool, embed_dim), mlp_hidden=cfg.mlp_hidden)


def build_grid(cfg: ImageConfig, embed_dim: int) -> nn.Module:
    return GridEncoder(cfg.feat_dim, embed_dim, create_pooler(cfg.pool, embed_dim), size_augment=cfg.size_augment)


def create_image_encoder(cfg: ImageConfig, embed_dim: int) -> nn.Module:
    """Build the image encoder of the kind `cfg.encoder` names (`vsectl.kinds.IMAGE_KINDS`)."""
    return resolve(IMAGE_KINDS.get(cfg.encoder).build)(cfg, embed_dim)
