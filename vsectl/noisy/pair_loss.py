"""Per-pair training loss of a fixed sample of clean and noisy training pairs, logged after every epoch.

Robust methods for noisy correspondence split the training pairs by their loss (noisy pairs keep a high loss for
longer). Each epoch the sampled pairs are encoded in eval mode without dropping set elements (a pixel-reading run
uses one fixed training crop per image: epoch 0's), cut into batches of `data.batch_size` in a fixed random order,
and each pair's share of the training criterion within its batch is written to `pair_losses.jsonl` (one record per
epoch; a resume drops later records).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vsectl.data.door import pair_dataset
from vsectl.data.sources import Split
from vsectl.kinds import TextInput
from vsectl.losses import ContrastiveLoss
from vsectl.run_dir import MetricsLog
from vsectl.runtime import Precision
from vsectl.text_cache import CachedTextStates

log = logging.getLogger(__name__)

LOG_FILE = "pair_losses.jsonl"
SAMPLE_SEED_OFFSET = 7919  # the sample's generator differs from the noise's, which shares data.noise.seed


@dataclass(frozen=True)
class PairSample:
    """Training captions whose pair loss is followed: (n,) indices and whether each is noisy."""

    captions: np.ndarray
    noisy: np.ndarray

    @classmethod
    def draw(cls, noisy: np.ndarray, per_kind: int, seed: int) -> PairSample:
        """Up to `per_kind` clean and `per_kind` noisy captions, drawn once, in a fixed random order."""
        rng = np.random.default_rng(seed + SAMPLE_SEED_OFFSET)
        picks = [rng.choice(idx, size=min(per_kind, idx.size), replace=False)
                 for idx in (np.flatnonzero(~noisy), np.flatnonzero(noisy))]
        captions = np.concatenate(picks)
        order = rng.permutation(captions.size)  # batches mix clean and noisy pairs, as training batches do
        return cls(captions[order].astype(np.int64), noisy[captions[order]])


@torch.no_grad()
def pair_losses(model: torch.nn.Module, split: Split, sample: PairSample, source: Any, text_input: TextInput,
                criterion: ContrastiveLoss, hardest: bool, batch_size: int, device: torch.device,
                precision: Precision, pad_id: int, image_size: int | None = None) -> np.ndarray:
    """(n,) loss of each sampled pair (as paired in `split`) within fixed batches of `batch_size` sample pairs.

    Args:
        source: unaugmented captions: a text processor, or cached token states with `text_input` STATES.
        hardest: the criterion's mode this epoch (hardest negative or sum over negatives).
        image_size: the backbone's input side for raw-image runs (None for feature runs).
    """
    dataset, collate = pair_dataset(split, source, 0, text_input, 0.0, image_size)  # epoch 0's draws, no drop
    loader = DataLoader(Subset(dataset, sample.captions.tolist()), batch_size=batch_size,
                        collate_fn=functools.partial(collate, pad_id=pad_id, text_input=text_input))
    was_training = model.training
    model.eval()
    out = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision.autocast():
            img, cap = model(batch, text_input=text_input)
        if img.shape[0] > 1:  # a lone pair has no negative
            out.append(criterion.per_pair(img, cap, hardest_negative=hardest).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


class PairLossLog:
    """`pair_losses.jsonl` of a run: {"epoch", "global_step", "hardest", "captions", "noisy", "loss"} per epoch."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.log = MetricsLog(Path(run_dir) / LOG_FILE, enabled=enabled)

    def resume_at(self, global_step: int) -> None:
        self.log.truncate_after(global_step)

    def write(self, epoch: int, global_step: int, hardest: bool, sample: PairSample, losses: np.ndarray) -> None:
        n = losses.size
        self.log.write({"epoch": epoch, "global_step": global_step, "hardest": hardest,
                        "captions": sample.captions[:n].tolist(), "noisy": sample.noisy[:n].tolist(),
                        "loss": [round(float(x), 6) for x in losses]})
        clean, noisy = losses[~sample.noisy[:n]], losses[sample.noisy[:n]]
        log.info("epoch %d: pair loss clean %.3f (median of %d), noisy %.3f (median of %d)", epoch,
                 float(np.median(clean)) if clean.size else float("nan"), clean.size,
                 float(np.median(noisy)) if noisy.size else float("nan"), noisy.size)


def read_pair_losses(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run (a line cut by a crash is skipped)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def split_by_kind(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(clean losses, noisy losses) of one record."""
    loss, noisy = np.asarray(record["loss"], dtype=np.float64), np.asarray(record["noisy"], dtype=bool)
    return loss[~noisy], loss[noisy]


def separation(records: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Per epoch: median loss of each kind and the AUC of telling noisy from clean pairs by their loss (0.5 = not)."""
    out = []
    for rec in records:
        clean, noisy = split_by_kind(rec)
        if clean.size == 0 or noisy.size == 0:
            continue
        greater = (noisy[:, None] > clean[None, :]).mean() + 0.5 * (noisy[:, None] == clean[None, :]).mean()
        out.append({"epoch": rec["epoch"], "clean_median": float(np.median(clean)),
                    "noisy_median": float(np.median(noisy)), "auc": float(greater)})
    return out


@dataclass
class PairLossTracker:
    """What `record` needs to log the sampled pairs' losses after an epoch (built once per run)."""

    sample: PairSample
    split: Split
    source: Any
    text_input: TextInput
    criterion: ContrastiveLoss
    batch_size: int
    pad_id: int
    image_size: int | None
    out: PairLossLog

    def record(self, model: torch.nn.Module, epoch: int, global_step: int, hardest: bool, device: torch.device,
               precision: Precision) -> None:
        losses = pair_losses(model, self.split, self.sample, self.source, self.text_input, self.criterion, hardest,
                             self.batch_size, device, precision, self.pad_id, self.image_size)
        self.out.write(epoch, global_step, hardest, self.sample, losses)


def pair_loss_tracker(run_dir: Path, split: Split, noisy: np.ndarray, per_kind: int, seed: int,
                      state_cache: Path | None, text: Any, criterion: ContrastiveLoss, batch_size: int,
                      image_size: int | None, global_step: int) -> PairLossTracker | None:
    """A tracker over a fresh sample (None when `per_kind` is 0); records after `global_step` (a resume) are dropped.

    Args:
        state_cache: the training captions' cached token states, or None to encode token ids with `text`.
        text: the run's text side (its unaugmented processor and pad id).
    """
    if per_kind <= 0:
        return None
    out = PairLossLog(run_dir)
    out.resume_at(global_step)
    if state_cache is not None:
        source, text_input = CachedTextStates(state_cache, augment=False), TextInput.STATES
    else:
        source, text_input = text.processor(augment=False), TextInput.IDS
    return PairLossTracker(PairSample.draw(noisy, per_kind, seed), split, source, text_input, criterion, batch_size,
                           text.pad_id, image_size, out)
