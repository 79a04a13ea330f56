"""The image loop of feature extraction: image files → frozen backbone → one (N, C) feature set per file."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vsectl.data.images import ImageFiles
from vsectl.extract.engines import Choice, choose_engine
from vsectl.models.backbones import Backbone
from vsectl.runtime import NullProgress, Progress, loader_workers

log = logging.getLogger(__name__)

DEFAULT_CHANNELS_LAST = True  # 1.1-1.8× faster for EfficientNet-Lite0 on both CPUs measured and on an H100 at batch
# 128; no effect on the transformers towers (docs/extract.md)
PREFETCH = 4  # decoded batches each worker keeps ready: bounds the queue (and its memory) ahead of the network


def make_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Consecutive index batches covering [start, stop)."""
    return [list(range(a, min(a + batch_size, stop))) for a in range(start, stop, batch_size)]


def extract_images(
    backbone: Backbone,
    paths: Sequence[str | Path],
    *,
    batches: Sequence[Sequence[int]] | None = None,
    batch_size: int = 32,
    workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = DEFAULT_CHANNELS_LAST,
    engine: str | Choice = "auto",
    progress: Progress | None = None,
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Run a backbone over image files and yield one feature set per file, in batch order.

    Reusable for anything that is a list of image files (video frames included). The backbone is moved to `device`.
    Worker processes decode and resize ahead of the network into a bounded queue (`PREFETCH` batches each); how long
    the network waited on them is logged at the end.

    Args:
        backbone: a frozen backbone; images are resized to `backbone.size` and normalised with its mean/std.
        paths: image files.
        batches: index lists into `paths`, processed in this order; default consecutive batches of `batch_size`.
        batch_size: images per forward pass when `batches` is not given.
        workers: DataLoader worker processes decoding images (0: decode in this process).
        device: where the backbone runs.
        precision: "fp32", or "bf16" autocast ("fp16" on CUDA).
        channels_last: run convolutions in NHWC memory layout (eager and compile engines).
        engine: "auto" (the fastest engine measured here that agrees with eager, `vsectl.extract.engines`), an
            engine name, or a `Choice` already made.
        progress: receives `update(images_per_s=...)` after each batch.

    Yields:
        (index into `paths`, (N, C) float32 features or None when the file could not be read, reason when None).
    """
    device = torch.device(device) if isinstance(device, str) else device
    progress = progress or NullProgress()
    if batches is None:
        batches = make_batches(0, len(paths), batch_size)
    choice = engine if isinstance(engine, Choice) else choose_engine(
        backbone, engine=engine, device=device, precision=precision, channels_last=channels_last,
        n_images=len(paths))
    workers = loader_workers(workers)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, backbone.size), batch_sampler=batches, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=PREFETCH if workers else None,
    )
    started, done, waited = time.perf_counter(), 0, 0.0
    batches_iter = iter(loader)
    while True:
        t0 = time.perf_counter()
        item = next(batches_iter, None)
        waited += time.perf_counter() - t0
        if item is None:
            break
        index, images, ok, reasons = item
        feats = choice.engine.run(images if ok.all() else images[ok]) if ok.any() else None  # (b, N, C)
        k = 0
        for i, good, reason in zip(index.tolist(), ok.tolist(), reasons, strict=True):
            if good:
                yield i, feats[k], ""
                k += 1
            else:
                yield i, None, reason
        done += len(index)
        progress.update(images_per_s=done / max(time.perf_counter() - started, 1e-9))
    total = time.perf_counter() - started
    log.info("extracted %d images in %.1f s with the %s engine (%.1f images/s); the network waited %.0f%% of the "
             "time for decoded images", done, total, choice.engine.name, done / max(total, 1e-9),
             100 * waited / max(total, 1e-9))
