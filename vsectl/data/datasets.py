"""Torch datasets over a Split, the resumable epoch batch sampler, and the collate functions (spec §3, §4).

Collate is the only code that pads (DATA-2); batches are never sorted (DATA-3).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vsectl.data.captions import TextProcessor
from vsectl.data.sources import Split
from vsectl.kinds import TextInput

PERM_SEED_STRIDE = 1000003  # a prime: (seed, epoch) pairs map to distinct permutation seeds for any epoch < 1e6


def drop_regions(feats: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Region size augmentation (spec §3, BUTD row): drop each row i.i.d. with probability `p`.

    Args:
        feats: (n, D) features.
        p: drop probability.
        rng: the item's generator.

    Returns:
        (n', D) survivors in their original order, n' ≥ 1 (one random row is kept if all would be dropped).
    """
    keep = rng.random(feats.shape[0]) >= p  # (n,)
    if not keep.any():
        keep[rng.integers(feats.shape[0])] = True
    return feats[keep]


class PairDataset(Dataset):
    """Training pairs indexed per caption (DATA-1): item i = (image cap2img[i], caption i).

    Each item draws from its own generator `default_rng([seed, epoch, i])`, so augmentation is the same whatever the
    worker count, access order or resume point. Call `set_epoch` before each epoch; the DataLoader must be re-iterated
    (non-persistent workers) for workers to see the new epoch.

    Args:
        split: the training split.
        text: encodes captions (it augments only if built with `augment=True`); with `text_input` STATES, the
            cached token states instead, `get(i, rng) -> (T, H) float32` (vsectl.text_cache.CachedTextStates).
        region_drop: per-region drop probability (0 disables region augmentation).
        seed: base seed, ≥ 0.
        text_input: what `text` gives: token ids or cached states.
    """

    def __init__(self, split: Split, text: TextProcessor, region_drop: float, seed: int,
                 text_input: TextInput = TextInput.IDS) -> None:
        if not 0.0 <= region_drop < 1.0:
            raise ValueError(f"region_drop must be in [0, 1), got {region_drop}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.split = split
        self.text = text
        self.region_drop = region_drop
        self.seed = seed
        self.text_input = TextInput(text_input)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` makes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.n_captions

    def caption(self, i: int, rng: np.random.Generator) -> torch.Tensor:
        """Caption i as token ids (T,) int64, or as cached token states (T, H) float32 of a frozen text body."""
        if self.text_input is TextInput.STATES:
            return torch.from_numpy(self.text.get(i, rng))
        return torch.tensor(self.text.encode(self.split.captions[i], rng), dtype=torch.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return (feats (n, D) float32, token ids (T,) int64 or cached states (T, H) float32, i)."""
        rng = np.random.default_rng([self.seed, self.epoch, i])
        feats = self.split.features.get(int(self.split.cap2img[i]))  # (n, D)
        if self.region_drop > 0:
            feats = drop_regions(feats, self.region_drop, rng)
        return torch.from_numpy(feats), self.caption(i, rng), i


class ImageSetDataset(Dataset):
    """The unique images of a split, unaugmented (evaluation encodes each image once)."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return (feats (n, D) float32, i)."""
        return torch.from_numpy(self.split.features.get(i)), i


class CaptionDataset(Dataset):
    """The captions of a split, unaugmented."""

    def __init__(self, split: Split, text: TextProcessor) -> None:
        self.split = split
        self.text = text

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return (token ids (T,) int64, i)."""
        return torch.tensor(self.text.encode(self.split.captions[i], None), dtype=torch.int64), i


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a per-epoch permutation, a pure function of (seed, epoch), so a resumed run sees the same order.

    With `world_size` > 1, each global batch is cut into `world_size` contiguous equal parts and rank r gets part r;
    a short last batch (drop_last=False) is trimmed to a multiple of `world_size`.

    Args:
        n: dataset size.
        batch_size: the global batch size (a multiple of `world_size`).
        drop_last: drop the last short batch (DATA-4).
        seed: base seed.
        epoch: current epoch.
        start_batch: first batch to yield (resuming mid-epoch).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        drop_last: bool,
        seed: int,
        epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size})")
        self.n = n
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.set_epoch(epoch, start_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in a full epoch."""
        if self.drop_last:
            return self.n // self.batch_size
        if self.world_size > 1:  # the short last batch is trimmed to a multiple of world_size, maybe to nothing
            return self.n // self.batch_size + int(self.n % self.batch_size >= self.world_size)
        return math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and the first batch to yield."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def permutation(self) -> torch.Tensor:
        """(n,) int64 order of this epoch."""
        g = torch.Generator().manual_seed(self.seed * PERM_SEED_STRIDE + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = perm[b * self.batch_size : (b + 1) * self.batch_size]
            part = len(batch) // self.world_size
            yield batch[self.rank * part : (self.rank + 1) * part].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def _lengths(seqs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64)


def _pad_sets(sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = _lengths(sets)  # (B,)
    out = torch.zeros(len(sets), int(lengths.max()), sets[0].shape[1], dtype=torch.float32)  # (B, K_max, D)
    for b, s in enumerate(sets):
        out[b, : s.shape[0]] = s
    return out, lengths


def _pad_tokens(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = _lengths(seqs)  # (B,)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.int64)  # (B, T_max)
    for b, s in enumerate(seqs):
        out[b, : s.shape[0]] = s
    return out, lengths


def _pad_text(seqs: Sequence[torch.Tensor], pad_id: int, text_input: TextInput) -> tuple[torch.Tensor, torch.Tensor]:
    return _pad_sets(seqs) if TextInput(text_input) is TextInput.STATES else _pad_tokens(seqs, pad_id)


def collate_pairs(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]], pad_id: int = 0,
                  text_input: TextInput = TextInput.IDS) -> dict[str, torch.Tensor]:
    """Pad a list of `PairDataset` items, keeping their order (DATA-2, DATA-3).

    Returns:
        images (B, K_max, D) float32 zero-padded, image_lengths (B,) int64, tokens (B, T_max) int64 padded with
        `pad_id` (or, for STATES, (B, T_max, H) float32 zero-padded cached states), token_lengths (B,) int64,
        index (B,) int64.
    """
    feats, ids, index = zip(*batch, strict=True)
    images, image_lengths = _pad_sets(feats)
    tokens, token_lengths = _pad_text(ids, pad_id, text_input)
    return {
        "images": images,
        "image_lengths": image_lengths,
        "tokens": tokens,
        "token_lengths": token_lengths,
        "index": torch.tensor(index, dtype=torch.int64),
    }


def collate_images(batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Pad `ImageSetDataset` items: images (B, K_max, D) float32, image_lengths (B,) int64, index (B,) int64."""
    feats, index = zip(*batch, strict=True)
    images, image_lengths = _pad_sets(feats)
    return {"images": images, "image_lengths": image_lengths, "index": torch.tensor(index, dtype=torch.int64)}


def collate_tokens(batch: Sequence[tuple[torch.Tensor, int]], pad_id: int = 0,
                   text_input: TextInput = TextInput.IDS) -> dict[str, torch.Tensor]:
    """Pad `CaptionDataset` items: tokens (B, T_max) int64 padded with `pad_id` (STATES: (B, T_max, H) float32),
    token_lengths (B,), index (B,)."""
    ids, index = zip(*batch, strict=True)
    tokens, token_lengths = _pad_text(ids, pad_id, text_input)
    return {"tokens": tokens, "token_lengths": token_lengths, "index": torch.tensor(index, dtype=torch.int64)}
