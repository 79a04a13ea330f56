"""Per-epoch switches as pure functions of (config, epoch): the config itself never changes during a run."""

from __future__ import annotations

from vsectl.config import RunConfig


def lr_factor(cfg: RunConfig, epoch: int) -> float:
    """Step decay: base × factor from `train.lr_decay_epoch` on (a resume after the step keeps it)."""
    return cfg.train.lr_decay_factor if epoch >= cfg.train.lr_decay_epoch else 1.0


def group_lr(cfg: RunConfig, epoch: int, lr_mult: float) -> float:
    """The learning rate of a parameter group with multiplier `lr_mult` at `epoch`."""
    return cfg.train.lr * lr_mult * lr_factor(cfg, epoch)


def use_hardest_negative(cfg: RunConfig, epoch: int) -> bool:
    """All negatives during the warm-up epochs, the hardest negative after (LOSS-5)."""
    return epoch >= cfg.loss.hardest_negative_from_epoch


ALL_STAGES_FROZEN = 4  # stem and layer1..layer4 all fixed: the whole backbone frozen


def backbone_fixed_blocks(cfg: RunConfig, epoch: int) -> int:
    """How many backbone blocks stay fixed at `epoch` (IMG-10, IMG-11), a pure function of the epoch.

    4 = the whole backbone frozen (epoch < E); then 3 (stem + layer1-3), 2, 1 for W epochs each; then 0 (all train).
    E = `train.embedding_warmup_epochs`, W = `train.backbone_warmup_epochs`; with the official E = 1, W = 0 epoch 0
    trains only the heads and the whole backbone trains from epoch 1.
    """
    e, w = cfg.train.embedding_warmup_epochs, cfg.train.backbone_warmup_epochs
    if epoch < e:
        return ALL_STAGES_FROZEN
    for fixed in (3, 2, 1):
        if epoch < e + (4 - fixed) * w:
            return fixed
    return 0


def loss_scale(cfg: RunConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The loss multiplier of backbone runs (OPT-1): i/n over the first unfrozen epoch E, 1 elsewhere.

    Args:
        epoch: the epoch.
        step: 0-based step within the epoch.
        steps_per_epoch: n, the steps of a full epoch.
    """
    if cfg.model.image.encoder != "backbone" or not cfg.train.loss_scale_warmup:
        return 1.0
    if epoch != cfg.train.embedding_warmup_epochs or steps_per_epoch <= 0:
        return 1.0
    return step / steps_per_epoch
