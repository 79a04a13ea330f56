"""Shards of an extracted split: each written atomically, resumable, merged by streaming into one store.

A split is cut into shards of `shard_size` consecutive images, each written to `<split>.shards/shard-NNNNN.h5`. A
killed run restarts at the first missing shard; when every shard exists they are merged into `<split>.h5`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vsectl.data.store import StoreWriter, open_store
from vsectl.errors import ConfigError, DataError
from vsectl.extract.engines import Choice
from vsectl.extract.images import extract_images, make_batches
from vsectl.extract.video import FRAME_SUFFIXES, VideoSampling, _item_files, _pool_frames
from vsectl.io import atomic_write_json
from vsectl.models.backbones import Backbone
from vsectl.runtime import Distributed, Progress

log = logging.getLogger(__name__)


# 128; no effect on the transformers towers (docs/extract.md)
MERGE_BLOCK_IMAGES = 64  # images read per block while merging shards (bounds the merge's memory)
MAX_SKIPPED_RECORDS = 100  # skipped images listed in attrs (HDF5 attrs over 64 KiB fail); all are counted
POLL_SECONDS = 2.0  # rank 0 checks this often for the other ranks' shards


def shard_dir_for(out_path: Path) -> Path:
    """`OUT/train.h5` → `OUT/train.shards`."""
    return out_path.with_suffix(".shards")


def shard_path(shard_dir: Path, i: int) -> Path:
    return shard_dir / f"shard-{i:05d}.h5"


def _read_fingerprint(path: Path) -> dict[str, Any] | None:
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get("fingerprint")
    except OSError:
        return None
    return json.loads(text) if isinstance(text, str) else None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _write_shard(
    writer: StoreWriter,
    images: list[dict[str, Any]],
    files: list[list[Path]],
    first: int,
    stream: Iterator[tuple[int, np.ndarray | None, str]],
    video: VideoSampling | None,
) -> None:
    skipped = []
    n_bad_frames = 0
    for k, item_files in enumerate(files):
        item = images[first + k]
        feats, reasons = [], []
        for _ in item_files:
            _, f, reason = next(stream)
            if f is None:
                reasons.append(reason)
            else:
                feats.append(f)
        if video is not None:
            n_bad_frames += len(reasons)
            if not item_files:
                reasons.append(f"{item['path']}: no frame images ({', '.join(sorted(FRAME_SUFFIXES))}) in the folder")
        if not feats:
            log.debug("skipped %s %s: %s", "video" if video else "image", item["id"], reasons[0])
            skipped.append({"id": item["id"], "reason": reasons[0]})
            continue
        j = writer.add_image(item["id"], _pool_frames(feats, video))
        for text in item["captions"]:
            if text.strip():  # an empty sentence in dataset.json has nothing to train on
                writer.add_caption(text, j)
    writer.attrs.update(n_skipped=len(skipped), skipped=skipped[:MAX_SKIPPED_RECORDS])
    if video is not None:
        writer.attrs.update(n_unreadable_frames=n_bad_frames)


def write_shards(
    backbone: Backbone,
    images: list[dict[str, Any]],
    shard_dir: Path,
    shards: Sequence[int],
    *,
    shard_size: int,
    attrs: dict[str, Any],
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    dtype: str,
    progress: Progress,
    description: str = "extract",
    video: VideoSampling | None = None,
    engine: str | Choice = "auto",
) -> None:
    """Extract the given shards of `images` (or of videos' frames), each to its own store file, atomically, in order.

    Batches never cross a shard boundary, so a shard's features do not depend on which shards ran before it.
    """
    paths: list[Path] = []
    batches: list[list[int]] = []
    shard_files: dict[int, list[list[Path]]] = {}
    for s in shards:
        files = _item_files(images, s * shard_size, min((s + 1) * shard_size, len(images)), video)
        start = len(paths)
        paths.extend(p for item in files for p in item)
        batches.extend(make_batches(start, len(paths), batch_size))
        shard_files[s] = files
    stream = iter(progress.track(
        extract_images(backbone, paths, batches=batches, workers=workers, device=device, precision=precision,
                       channels_last=channels_last, engine=engine, progress=progress),
        total=len(paths), description=description,
    ))
    try:
        for s in shards:
            attrs_s = {**attrs, "shard": s}
            with StoreWriter(shard_path(shard_dir, s), backbone.feat_dim, dtype=dtype, attrs=attrs_s) as writer:
                _write_shard(writer, images, shard_files[s], s * shard_size, stream, video)
            log.debug("shard %d done (%d items)", s, len(shard_files[s]))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops DataLoader workers now, also when interrupted


def merge_shards(shard_files: Sequence[Path], out_path: Path, attrs: dict[str, Any]) -> tuple[int, int, list[dict]]:
    """Concatenate shard stores into one store, streaming blocks of images; atomic like every StoreWriter.

    Returns:
        (images written, images skipped, the first `MAX_SKIPPED_RECORDS` skipped-image records).
    """
    skipped: list[dict] = []
    n_skipped = n_bad_frames = 0
    with open_store(shard_files[0]) as f:
        feat_dim, dtype = int(f.attrs["feat_dim"]), f["features/rows"].dtype.name
    with StoreWriter(out_path, feat_dim, dtype=dtype, attrs=attrs) as writer:
        for path in shard_files:
            with open_store(path) as f:
                offsets = f["features/offsets"][()]
                ids = f["images/ids"].asstr()[()]
                rows = f["features/rows"]
                base = writer.n_images
                for a in range(0, len(ids), MERGE_BLOCK_IMAGES):
                    b = min(a + MERGE_BLOCK_IMAGES, len(ids))
                    block = rows[offsets[a] : offsets[b]]  # (rows of images a..b, D)
                    for k in range(a, b):
                        writer.add_image(ids[k], block[offsets[k] - offsets[a] : offsets[k + 1] - offsets[a]])
                for text, j in zip(f["captions/text"].asstr()[()], f["captions/image_index"][()], strict=True):
                    writer.add_caption(text, base + int(j))
                n_skipped += int(f.attrs.get("n_skipped", 0))
                n_bad_frames += int(f.attrs.get("n_unreadable_frames", 0))
                skipped.extend(json.loads(f.attrs.get("skipped", "[]")))
        skipped = skipped[:MAX_SKIPPED_RECORDS]
        writer.attrs.update(n_images=writer.n_images, n_skipped=n_skipped, skipped=skipped)
        if "video" in attrs:
            writer.attrs.update(n_unreadable_frames=n_bad_frames)
        if writer.n_images == 0:
            raise DataError(f"none of the images for {out_path} could be read ({n_skipped} skipped)")
        n = writer.n_images
    return n, n_skipped, skipped


def _wait_for(files: list[Path], timeout_s: float | None) -> None:
    start = last_log = time.monotonic()
    while missing := [p for p in files if not p.is_file()]:
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            raise DataError(f"gave up waiting for {len(missing)} shards from other ranks, e.g. {missing[0]}")
        if now - last_log > 60:
            log.info("rank 0 waiting for %d shards from other ranks", len(missing))
            last_log = now
        time.sleep(POLL_SECONDS)


def _prepare_shard_dir(shard_dir: Path, fingerprint: dict[str, Any], dist: Distributed) -> None:
    manifest = shard_dir / "manifest.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint")
        if old != fingerprint:
            diff = ", ".join(_differences(old or {}, fingerprint))
            if dist.world_size > 1:
                raise ConfigError(f"{shard_dir} holds shards made with other settings ({diff}); delete it first")
            log.warning("removing shards in %s made with other settings (%s)", shard_dir, diff)
            shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        atomic_write_json(manifest, {"fingerprint": fingerprint}, indent=2, ensure_ascii=False, newline=False)
