"""Training logs beside metrics.jsonl, as a recipe asks (`train.log`): TensorBoard event files in the run folder.

    runs/<name>/tensorboard/events.out.tfevents.*     `tensorboard --logdir runs` shows every run

Written: the training loss, every parameter group's learning rate, the throughput and a learned temperature (each
`train.log_every` steps); the dev metrics after every epoch, under the selection tie rule and the rsum under every
rule; and the learned pooling weights θ(N) of each GPO branch after every epoch, as a figure (Images tab) and as the
weight of the largest element, θ_0 (Scalars). The step axis is the optimizer step throughout.
tensorboard (and matplotlib, for the figures) are the `tensorboard` extra, imported only when a recipe asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vsectl.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'vsectl[tensorboard]'"
TRAIN_SCALARS = ("loss", "pairs_per_s", "data_time", "temperature")  # train records' values worth a curve
VAL_SKIP = ("kind", "epoch", "global_step", "best", "tie_rule", "ties", "rsum_by_rule")


def require_tensorboard() -> type:
    """torch's SummaryWriter, or one line naming the extra when tensorboard or matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (the θ figures)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"train.log: [tensorboard] needs tensorboard and matplotlib: {INSTALL}") from None
    return SummaryWriter


def check_train_logs(names: tuple[str, ...]) -> None:
    """Fail before a run starts when a requested log cannot be written here."""
    if "tensorboard" in names:
        require_tensorboard()


class TensorBoardLog:
    """One run's TensorBoard writer, fed the same records as metrics.jsonl.

    Args:
        folder: where the event files go (RUN/tensorboard).
        purge_step: on a resume, the step after the checkpoint's: TensorBoard drops what an earlier process logged
            from that step on, so curves continue without the steps the resume repeats.
        sizes: branch → set sizes N at which θ(N) is drawn.
        trained: branch → [smallest, largest] training set size (marks the N outside it).
    """

    def __init__(self, folder: Path, purge_step: int | None = None, sizes: dict[str, list[int]] | None = None,
                 trained: dict[str, list[int]] | None = None) -> None:
        writer = require_tensorboard()
        self.writer = writer(log_dir=str(folder), purge_step=purge_step)
        self.sizes, self.trained = sizes or {}, trained or {}

    def write(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record (kind train or val) as scalars at its global step."""
        step = int(record["global_step"])
        if record.get("kind") == "train":
            for key in TRAIN_SCALARS:
                if key in record:
                    self.writer.add_scalar(f"train/{key}", record[key], step)
            for key, value in record.items():
                if key.startswith("lr_"):
                    self.writer.add_scalar(f"lr/{key[3:]}", value, step)
        elif record.get("kind") == "val":
            rule = record.get("tie_rule", "")
            for key, value in record.items():
                if key not in VAL_SKIP and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"dev/{key}", value, step)
            for other, rsum in record.get("rsum_by_rule", {}).items():
                self.writer.add_scalar(f"dev_rsum_by_tie_rule/{other}", rsum, step)
            self.writer.add_text("dev/tie_rule", f"dev metrics under the {rule} tie rule", step)

    def pooling(self, model: Any, pools: dict[str, str], step: int) -> None:
        """θ(N) of each branch whose pooler learns one: a figure, and θ_0 per N as scalars."""
        from vsectl.science.plots import WeightCurves, branch_curves, draw_weight_curves

        curves = WeightCurves(run="", checkpoint="", pools=pools,
                              trained={b: r for b, r in self.trained.items() if b in self.sizes})
        for branch, sizes in self.sizes.items():
            pool = getattr(model, branch).pool
            if hasattr(pool, "weights_for_lengths"):
                curves.curves[branch] = branch_curves(pool, sizes)
        if not curves.curves:
            return
        for branch, per_n in curves.curves.items():
            for n, theta in per_n.items():
                self.writer.add_scalar(f"pooling_theta0/{branch}_N{n}", theta[0], step)
        self.writer.add_figure("pooling/theta", draw_weight_curves(curves), step, close=False)

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(run_dir: Path, purge_step: int | None, split: Any, text: Any) -> TensorBoardLog:
    """The TensorBoard log of a run, with θ drawn at the spread of the training split's set sizes."""
    from vsectl.science.plots import split_sizes, spread

    try:
        observed = split_sizes(split, text)
    except (AttributeError, TypeError):  # raw images (a backbone run) have no stored set sizes
        observed = {}
    sizes = {b: spread(v) for b, v in observed.items() if len(v)}
    trained = {b: [int(v.min()), int(v.max())] for b, v in observed.items() if len(v)}
    log.info("TensorBoard logs in %s", run_dir / TENSORBOARD_DIR)
    return TensorBoardLog(run_dir / TENSORBOARD_DIR, purge_step, sizes, trained)
