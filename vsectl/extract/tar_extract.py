"""`extract --shards`: webdataset tar shards → one feature store, one store shard per tar shard (resumable, torchrun).

Rank r reads the tar shards s with s % WORLD_SIZE == r, its DataLoader workers sharing them
(`vsectl.data.tar_shards.ShardStream`); each tar shard becomes `<out>.shards/shard-NNNNN.h5`, renamed into place when
complete, and rank 0 merges them in order into the store, as `extract` does for a raw dataset. Every sample with a
readable image is kept, with its caption when it has one; unreadable ones are counted in the store's attrs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vsectl.data.store import StoreWriter
from vsectl.data.tar_shards import ShardStream, estimate_samples, resolve_shards, stream_batches
from vsectl.errors import DataError
from vsectl.extract.engines import Choice, choose_engine
from vsectl.extract.provenance import RESIZE
from vsectl.extract.shards import _prepare_shard_dir, _read_fingerprint, _wait_for, merge_shards, shard_path
from vsectl.models.backbones import Backbone
from vsectl.runtime import Distributed, Progress

log = logging.getLogger(__name__)

FINGERPRINT_KEYS = ("backbone", "weights", "weights_sha256", "input_size", "mean", "std", "precision", "channels_last",
                    "dtype", "split", "source_shards_sha256")


def tar_provenance(backbone: Backbone, shards: list[Path], split: str, *, precision: str, channels_last: bool,
                   dtype: str) -> dict[str, Any]:
    """Store attrs of features extracted from tar shards; the shards' names, sizes and times are fingerprinted."""
    import vsectl

    listing = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in shards)
    info = {k: v for k, v in backbone.provenance().items() if k != "feat_dim"}
    info.update(normalisation="(x / 255 - mean) / std per RGB channel, x the uint8 pixel", resize=RESIZE,
                precision=precision, channels_last=channels_last, dtype=dtype, split=split,
                source_shards=f"{shards[0].parent} ({len(shards)} tar shards)",
                source_shards_sha256=hashlib.sha256(listing.encode()).hexdigest(),
                vsectl_version=vsectl.__version__, torch_version=str(torch.__version__))
    info["fingerprint"] = json.dumps({k: info[k] for k in FINGERPRINT_KEYS}, sort_keys=True)
    return info


def _write(backbone: Backbone, shards: list[Path], todo: list[int], shard_dir: Path, attrs: dict[str, Any], *,
           batch_size: int, workers: int, device: torch.device, precision: str, channels_last: bool, dtype: str,
           progress: Progress, engine: Choice) -> int:
    from vsectl.data.tar_images import decode_sample

    stream = ShardStream(shards, todo, functools.partial(decode_sample, size=backbone.size), batch_size)
    writers: dict[int, tuple[StoreWriter, list[dict[str, str]]]] = {}
    done, start = 0, time.perf_counter()
    try:
        for batch in progress.track(stream_batches(stream, workers), total=None, description="extract shards"):
            if batch.shard not in writers:
                writer = StoreWriter(shard_path(shard_dir, batch.shard), backbone.feat_dim, dtype=dtype,
                                     attrs={**attrs, **engine.describe(), "shard": batch.shard})
                writers[batch.shard] = (writer.__enter__(), [])
            writer, skipped = writers[batch.shard]
            good = [(x, item) for x, (item, _) in zip(batch.samples, batch.items, strict=True) if item is not None]
            skipped += [{"id": x.key, "reason": r} for x, (item, r) in zip(batch.samples, batch.items, strict=True)
                        if item is None]
            if good:
                feats = engine.engine.run(torch.stack([t for _, t in good]))  # (b, N, C)
                for (x, _), f in zip(good, feats, strict=True):
                    j = writer.add_image(x.key, f)
                    if x.caption:
                        writer.add_caption(x.caption, j)
            done += len(batch.samples)
            progress.update(images_per_s=done / max(time.perf_counter() - start, 1e-9))
            if batch.last:
                writer, skipped = writers.pop(batch.shard)
                writer.attrs.update(n_skipped=len(skipped), skipped=skipped[:100])
                writer.__exit__(None, None, None)
    finally:
        for writer, _ in writers.values():
            writer.abort()
    return done


def extract_tar(backbone: Backbone, spec: str | Path, out_path: str | Path, split: str, *, batch_size: int,
                workers: int, device: torch.device, precision: str, channels_last: bool, dtype: str,
                dist: Distributed, progress: Progress, engine: str = "auto") -> Path | None:
    """Extract every sample of tar shards into the store `out_path` (labelled `split`), resuming finished shards.

    Returns:
        `out_path` on rank 0; None on other ranks.
    """
    from vsectl.extract.shards import shard_dir_for

    out_path = Path(out_path)
    shards = resolve_shards(spec)
    attrs = tar_provenance(backbone, shards, split, precision=precision, channels_last=channels_last, dtype=dtype)
    fingerprint = json.loads(attrs["fingerprint"])
    if out_path.is_file() and _read_fingerprint(out_path) == fingerprint:
        log.info("%s is already extracted from these shards with these settings", out_path)
        return out_path if dist.rank == 0 else None
    shard_dir = shard_dir_for(out_path)
    _prepare_shard_dir(shard_dir, fingerprint, dist)
    todo = [s for s in range(dist.rank, len(shards), dist.world_size) if not shard_path(shard_dir, s).is_file()]
    if todo:
        start = time.perf_counter()
        choice = choose_engine(backbone, engine=engine, device=device, precision=precision,
                               channels_last=channels_last, n_images=estimate_samples(shards, todo))
        n = _write(backbone, shards, todo, shard_dir, attrs, batch_size=batch_size, workers=workers, device=device,
                   precision=precision, channels_last=channels_last, dtype=dtype, progress=progress, engine=choice)
        seconds = time.perf_counter() - start
        log.info("%d samples of %d tar shards in %.1f s (%.1f images/s) on rank %d", n, len(todo), seconds,
                 n / max(seconds, 1e-9), dist.rank)
    if dist.rank != 0:
        return None
    files = [shard_path(shard_dir, s) for s in range(len(shards))]
    _wait_for(files, None)
    n, n_skipped, skipped = merge_shards(files, out_path, {**attrs, "world_size": dist.world_size})
    shutil.rmtree(shard_dir)
    if n_skipped:
        log.warning("skipped %d unreadable samples (attrs n_skipped, skipped), first: %s", n_skipped,
                    skipped[0]["reason"])
    if n == 0:
        raise DataError(f"no sample of {spec} has a readable image")
    log.info("wrote %s (%d images) from %d tar shards", out_path, n, len(shards))
    return out_path
