"""The grid image encoder trained end to end: raw image → CNN backbone → C5 grid → fc → GPO → L2 (spec §5.2).

Chen et al., VSE∞ (CVPR 2021), grid rows: the backbone sits inside the model; its BatchNorm statistics stay frozen
(IMG-9), a prefix of its stages is held fixed by the epoch's schedule (IMG-10/11, `schedules.backbone_fixed_blocks`),
and the grid cells are size-augmented on the device after the backbone (spec §3).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vsectl.config import ImageConfig
from vsectl.errors import ConfigError
from vsectl.models.backbones import BACKBONES, Backbone
from vsectl.models.image_encoders import grid_size_augment, l2_normalize, xavier_linear
from vsectl.models.pooling import create_pooler
from vsectl.models.stages import stage_modules

log = logging.getLogger(__name__)

PIXEL_SCALE = 255.0  # uint8 images → [0, 1] before the backbone's mean/std
WHOLE = 4            # fixed_blocks value that freezes every stage (schedules.ALL_STAGES_FROZEN)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class BackboneGridEncoder(nn.Module):
    """uint8 images → normalise → backbone stages → (B, N, C) cells → size augmentation → fc → pooler → L2.

    Args:
        backbone: a `Backbone`; its `stages()` (stem, layer1..layer4) give the freeze granularity. A backbone without
            stages (a vision transformer) trains or freezes as a whole.
        embed_dim: E.
        pool: the pooler over the (B, N, E) cells.
        size_augment: drop cells in training as the grid row of the size augmentation says.
        grad_checkpointing: recompute each trainable stage in the backward pass instead of keeping its activations.
        channels_last: run the backbone in NHWC memory format.
    """

    def __init__(self, backbone: Backbone, embed_dim: int, pool: nn.Module, size_augment: bool = True,
                 grad_checkpointing: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = xavier_linear(backbone.feat_dim, embed_dim)
        self.pool = pool
        self.size_augment = size_augment
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = channels_last
        self.bgr = backbone.bgr
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (backbone.mean, backbone.std))
        self.register_buffer("mean", mean, persistent=False)  # not saved: the backbone defines them
        self.register_buffer("std", std, persistent=False)
        stages = backbone.stages()
        self._stages: list[nn.Module] = list(stages) if stages is not None else [backbone]  # views, not registered
        self.staged = stages is not None
        if channels_last:
            backbone.to(memory_format=torch.channels_last)
        used = {id(p) for stage in self._stages for m in stage_modules(stage) for p in m.parameters()}
        # Parts the grid path never runs (EfficientNet's classifier) stay fixed and join no optimizer group.
        self.unused = [p for p in backbone.parameters() if id(p) not in used]
        for param in self.unused:
            param.requires_grad_(False)
        self.fixed_blocks = 0
        self.set_fixed_blocks(0)

    @property
    def input_size(self) -> int:
        """The square side of the images it takes (the data door decodes them to this size)."""
        return self.backbone.size

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters the grid path uses (trainable or held fixed by the schedule)."""
        unused = {id(p) for p in self.unused}
        return [p for p in self.backbone.parameters() if id(p) not in unused]

    # ------------------------------------------------------------------------------------------------ freezing

    def _n_frozen_stages(self, fixed_blocks: int) -> int:
        """Stages held fixed: `fixed_blocks` k > 0 fixes the stem and layer1..layer k; 0 fixes nothing (IMG-10)."""
        if not self.staged:
            return 1 if fixed_blocks >= WHOLE else 0
        return 0 if fixed_blocks == 0 else min(fixed_blocks, WHOLE) + 1

    def set_fixed_blocks(self, fixed_blocks: int) -> None:
        """Hold the first stages fixed (no gradient, eval mode) and let the others train; BN statistics stay frozen.

        Args:
            fixed_blocks: 4 = the whole backbone, 3 = stem + layer1-3, 2, 1, 0 = nothing fixed.
        """
        if not 0 <= fixed_blocks <= WHOLE:
            raise ValueError(f"fixed_blocks must be in [0, {WHOLE}], got {fixed_blocks}")
        if not self.staged and 0 < fixed_blocks < WHOLE:
            raise ConfigError(f"backbone '{self.backbone.name}' has no stages to freeze one by one; set "
                              "train.backbone_warmup_epochs=0 (it then trains or freezes as a whole)")
        n_frozen = self._n_frozen_stages(fixed_blocks)
        for i, stage in enumerate(self._stages):
            for module in stage_modules(stage):
                module.requires_grad_(i >= n_frozen)
        self.fixed_blocks = fixed_blocks
        self.train(self.training)

    def train(self, mode: bool = True) -> BackboneGridEncoder:
        """Set train/eval mode; backbone BatchNorms and fixed stages stay in eval mode whatever `mode` is (IMG-9)."""
        super().train(mode)
        n_frozen = self._n_frozen_stages(self.fixed_blocks) if hasattr(self, "fixed_blocks") else 0
        for i, stage in enumerate(self._stages if hasattr(self, "_stages") else []):
            if i < n_frozen:  # a fixed stage is a fixed function: no drop-connect or dropout noise either
                for module in stage_modules(stage):
                    module.eval()
        for module in self.backbone.modules():
            if is_batchnorm(module):
                module.eval()
        return self

    # ------------------------------------------------------------------------------------------------ forward

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB → float, in the backbone's channel order, minus mean, over std."""
        x = images.float() / PIXEL_SCALE
        if self.bgr:
            x = x.flip(1)  # mean/std are given in the backbone's (BGR) order
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 → (B, N, C) grid cells (C5 map, row-major); fixed stages run without a graph."""
        x = self.normalize(images)
        n_frozen = self._n_frozen_stages(self.fixed_blocks)
        for i, stage in enumerate(self._stages):
            trainable = i >= n_frozen and torch.is_grad_enabled()
            with contextlib.nullcontext() if trainable else torch.no_grad():
                if trainable and self.grad_checkpointing and self.training:
                    x = checkpoint(stage, x, use_reentrant=False)
                else:
                    x = stage(x)
        if self.staged:
            x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, h·w, C)
        return x

    def forward(self, images: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) uint8 images → L2-normalised (B, E) and the pooling weights.

        `lengths` is ignored: every image gives a full grid of N cells.
        """
        feats = self.cells(images)                                                     # (B, N, C)
        lengths = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.int64, device=feats.device)
        if self.training and self.size_augment:
            feats, lengths = grid_size_augment(feats, lengths)
        pooled, weights = self.pool(self.fc(feats), lengths)
        return l2_normalize(pooled), weights


def build_backbone(cfg: ImageConfig, embed_dim: int) -> BackboneGridEncoder:
    """Build the backbone named by `cfg.backbone` with its pretrained weights, and the grid head on top."""
    spec = cfg.backbone
    backbone = BACKBONES.get(spec.name)(weights=spec.weights or None, size=spec.size or None)
    if backbone.feat_dim != cfg.feat_dim:
        raise ConfigError(f"model.image.feat_dim is {cfg.feat_dim} but backbone '{spec.name}' gives "
                          f"{backbone.feat_dim}-d cells; set model.image.feat_dim={backbone.feat_dim}")
    h, w = backbone.grid_shape()
    log.info("image backbone %s at %d px: %d×%d = %d cells of %d", spec.name, backbone.size, h, w, h * w,
             backbone.feat_dim)
    return BackboneGridEncoder(backbone, embed_dim, create_pooler(cfg.pool, embed_dim), size_augment=cfg.size_augment,
                               grad_checkpointing=spec.grad_checkpointing, channels_last=spec.channels_last)


