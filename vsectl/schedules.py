"""Per-epoch switches as pure functions of (config, epoch): the config itself never changes during a run.

A run whose length is given in optimizer steps (`train.steps`) is converted to whole epochs once, from the steps per
epoch of its training data (`run_length`); every switch below stays a function of the epoch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vsectl.config import RunConfig
from vsectl.kinds import IMAGE_KINDS

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunLength:
    """A run's length resolved against its data: what `train.epochs` or `train.steps` means for this dataset.

    Attributes:
        epochs: epochs the run trains.
        steps_per_epoch: optimizer steps of one epoch.
        steps: optimizer steps of the whole run (epochs × steps_per_epoch).
        lr_decay_epoch: the first epoch at the decayed learning rate.
        unit: "epochs" or "steps", what the recipe gave.
    """

    epochs: int
    steps_per_epoch: int
    steps: int
    lr_decay_epoch: int
    unit: str

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def run_length(cfg: RunConfig, steps_per_epoch: int) -> RunLength:
    """Resolve the run's length: `train.steps` rounds up to whole epochs (every epoch sees all the training pairs).

    `train.lr_decay_step` becomes the epoch that holds that step (the decay falls on an epoch boundary at or before
    it); without it `train.lr_decay_epoch` applies as written. Warm-ups (`loss.hardest_negative_from_epoch`,
    `train.embedding_warmup_epochs`, `train.backbone_warmup_epochs`) stay in epochs: each is one pass over the data.

    Args:
        cfg: the recipe.
        steps_per_epoch: optimizer steps of one epoch of the training split (`training.steps_in_epoch`).
    """
    spe = max(1, steps_per_epoch)
    if cfg.train.steps <= 0:
        epochs = cfg.train.epochs
        return RunLength(epochs, spe, epochs * spe, cfg.train.lr_decay_epoch, "epochs")
    epochs = math.ceil(cfg.train.steps / spe)
    decay = cfg.train.lr_decay_step // spe if cfg.train.lr_decay_step > 0 else cfg.train.lr_decay_epoch
    return RunLength(epochs, spe, epochs * spe, decay, "steps")


def lr_factor(cfg: RunConfig, epoch: int, length: RunLength | None = None) -> float:
    """Step decay: base × factor from the decay epoch on (a resume after the step keeps it).

    The decay epoch is `length.lr_decay_epoch` when given (runs with a step budget), else `train.lr_decay_epoch`.
    """
    decay_epoch = length.lr_decay_epoch if length is not None else cfg.train.lr_decay_epoch
    return cfg.train.lr_decay_factor if epoch >= decay_epoch else 1.0


def group_lr(cfg: RunConfig, epoch: int, lr_mult: float, length: RunLength | None = None) -> float:
    """The learning rate of a parameter group with multiplier `lr_mult` at `epoch`."""
    return cfg.train.lr * lr_mult * lr_factor(cfg, epoch, length)


def use_hardest_negative(cfg: RunConfig, epoch: int, loss: Any = None) -> bool:
    """All negatives during the warm-up epochs, the hardest negative after (LOSS-5); never for a `loss` that does not
    mine hardest negatives (its `mines_hardest_negatives` is False: InfoNCE)."""
    return epoch >= cfg.loss.hardest_negative_from_epoch and getattr(loss, "mines_hardest_negatives", True)


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
    if not IMAGE_KINDS.get(cfg.model.image.encoder).trains_backbone or not cfg.train.loss_scale_warmup:
        return 1.0
    if epoch != cfg.train.embedding_warmup_epochs or steps_per_epoch <= 0:
        return 1.0
    return step / steps_per_epoch


def announce_length(cfg: RunConfig, length: RunLength) -> None:
    """Log the resolved length of a step budget, and warn once when a run is too short to mean much.

    Runs shortened on purpose (`train.max_steps_per_epoch` > 0: smoke runs, `--quick` sweeps) are not warned about:
    they say so themselves. `train.min_steps_warning: 0` silences the warning.
    """
    epochs = f"{length.epochs} epoch{'s' if length.epochs != 1 else ''} of {length.steps_per_epoch} steps"
    if length.unit == "steps":
        decay = f"LR decay from epoch {length.lr_decay_epoch}" if length.lr_decay_epoch < length.epochs \
            else "no LR decay"
        log.info("train.steps=%d: %s = %d optimizer steps; %s", cfg.train.steps, epochs, length.steps, decay)
    if cfg.train.max_steps_per_epoch == 0 and length.steps < cfg.train.min_steps_warning:
        log.warning("this run makes only %d optimizer steps (%s), fewer than %d: the model will be undertrained; "
                    "raise train.epochs or give train.steps (e.g. --set train.steps=%d)", length.steps, epochs,
                    cfg.train.min_steps_warning, cfg.train.min_steps_warning)


def steps_in_epoch(cfg: RunConfig, n_captions: int) -> int:
    full = n_captions // cfg.data.batch_size if cfg.data.drop_last else math.ceil(n_captions / cfg.data.batch_size)
    return min(full, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch > 0 else full


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: RunConfig, epoch: int,
                       length: RunLength | None = None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group_lr(cfg, epoch, group["lr_mult"], length)
