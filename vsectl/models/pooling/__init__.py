"""The pooler family and its registry, generated from the one pooler table (`vsectl/pool_options.py`).

Each pooler lives in a file named for it and has one row in POOLER_TABLE (names, options, class, ONNX export);
`base.py` holds what they share (the sort, the padding mask, the fp32 softmax, the weighted sum, the θ(N) curve). A
recipe's `pool:` section is read into the pooler's own options and `create_pooler` passes those as keyword arguments.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from vsectl.kinds import resolve
from vsectl.models.pooling.base import (
    MASK_VALUE,
    TEMPERATURE,
    FixedWeightPool,
    LearnedRankPool,
    PositionalRankPool,
    RankWeightedPool,
    length_mask,
    masked_softmax,
    positional_encoding,
    sort_features,
    top_k_weights,
    weighted_sum,
)
from vsectl.models.pooling.gem import GeMPool
from vsectl.models.pooling.gpo import GPO
from vsectl.models.pooling.gpo_featin import FeatInGPO
from vsectl.models.pooling.gpo_index_bigru import IndexBiGRUGPO
from vsectl.models.pooling.gpo_interp import InterpGPO
from vsectl.models.pooling.gpo_mlp import MLPGPO
from vsectl.models.pooling.gpo_perdim import PerDimGPO
from vsectl.models.pooling.gpo_transformer import TransformerGPO
from vsectl.models.pooling.max import MaxPool
from vsectl.models.pooling.maxk import MaxKPool
from vsectl.models.pooling.mean import MeanPool
from vsectl.pool_options import POOLER_TABLE, FeatureSizedOptions, PoolOptions
from vsectl.registry import Registry

POOLERS: Registry[type[nn.Module]] = Registry("pooler")  # name → pooler class, from pool_options.POOLER_TABLE
for _row in POOLER_TABLE:
    for _name in _row.names:
        POOLERS.register(_name)(resolve(_row.module))


def create_pooler(cfg: PoolOptions | nn.Module, in_dim: int | None = None) -> nn.Module:
    """Build the pooler named by `cfg.name` from its options (or pass a ready-made module through).

    Args:
        cfg: the pooler's options.
        in_dim: the size of the features it will pool (the encoder's embedding size); fills `pool.in_dim` when the
            options leave it unset (a new options object; the recipe's is not changed).
    """
    if isinstance(cfg, nn.Module):
        return cfg
    if in_dim is not None and isinstance(cfg, FeatureSizedOptions) and cfg.in_dim <= 0:
        cfg = dataclasses.replace(cfg, in_dim=in_dim)
    return POOLERS.get(cfg.name)(**cfg.kwargs())


__all__ = [
    "GPO", "MASK_VALUE", "MLPGPO", "POOLERS", "TEMPERATURE", "FeatInGPO", "FixedWeightPool", "GeMPool",
    "IndexBiGRUGPO", "InterpGPO", "LearnedRankPool", "MaxKPool", "MaxPool", "MeanPool", "PerDimGPO",
    "PositionalRankPool", "RankWeightedPool", "TransformerGPO", "create_pooler", "length_mask", "masked_softmax",
    "positional_encoding", "sort_features", "top_k_weights", "weighted_sum",
]
