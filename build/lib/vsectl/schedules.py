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
