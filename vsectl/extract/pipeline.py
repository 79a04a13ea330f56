"""Extract a raw dataset's splits: validate the request, then per split reuse, extract shards, merge (torchrun-aware).

Under torchrun, rank r extracts the shards i with i % WORLD_SIZE == r and rank 0 merges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from vsectl.data.raw import RawDataset, load_raw_dataset
from vsectl.data.splits import canonical_split
from vsectl.data.store import DTYPES
from vsectl.errors import ConfigError, DataError
from vsectl.extract.engines import check_engine, choose_engine
from vsectl.extract.images import DEFAULT_CHANNELS_LAST
from vsectl.extract.provenance import split_provenance
from vsectl.extract.shards import (
    _differences,
    _prepare_shard_dir,
    _read_fingerprint,
    _wait_for,
    merge_shards,
    shard_dir_for,
    shard_path,
    write_shards,
)
from vsectl.extract.video import VideoSampling
from vsectl.extract.video_files import VideoFileSampling, check_modality, video_report, write_video_shards
from vsectl.locks import folder_lock
from vsectl.models.backbones import Backbone, create_backbone
from vsectl.runtime import (
    Distributed,
    NullProgress,
    Precision,
    Progress,
    cpu_bf16_units,
    distributed_from_env,
    resolve_device,
)

log = logging.getLogger(__name__)


SPLITS = ("train", "dev", "test")
DEFAULT_SHARD_SIZE = 512  # images per shard: at most this much work is lost to a kill
DEFAULT_DTYPE = "float16"  # backbone activations are bounded (ReLU6, LayerNorm); halves the disk; overflow is refused
DistInfo = Distributed  # this process's place in a torchrun job (rank 0 of 1 without torchrun)


def dist_info() -> DistInfo:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun (or SLURM) sets them."""
    try:
        return distributed_from_env()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def extract_split(
    backbone: Backbone,
    raw: RawDataset,
    split: str,
    out_path: str | Path,
    *,
    batch_size: int = 32,
    workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = DEFAULT_CHANNELS_LAST,
    dtype: str = DEFAULT_DTYPE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    limit: int | None = None,
    dist: DistInfo | None = None,
    progress: Progress | None = None,
    wait_timeout_s: float | None = None,
    video: VideoSampling | VideoFileSampling | None = None,
    engine: str = "auto",
) -> Path | None:
    """Extract one split of a raw dataset to a store file, resuming from finished shards.

    Args:
        backbone: a frozen backbone.
        raw: the raw dataset.
        split: "train", "dev" or "test".
        out_path: the final `.h5` file.
        batch_size, workers, device, precision, channels_last: see `extract_images`.
        dtype: on-disk feature dtype, "float16" or "float32".
        shard_size: images per shard.
        limit: only the first `limit` images of the split.
        dist: rank and world size (default: from the environment).
        progress: progress reporting.
        wait_timeout_s: how long rank 0 waits for other ranks' shards (default: forever).
        video: each dataset entry is a folder of frame images (`VideoSampling`) or a video file
            (`VideoFileSampling`), sampled and pooled as this says (None: images).
        engine: how the backbone runs (`vsectl.extract.engines`): "auto" measures the candidates here and keeps the
            fastest whose features agree with "eager" (today's torch path); recorded in the attrs, not in the
            fingerprint, since every engine gives the same features within `engines.TOLERANCE`.

    Returns:
        `out_path` on rank 0; None on other ranks (rank 0 merges).
    """
    out_path, dist, progress = Path(out_path), dist or dist_info(), progress or NullProgress()
    device = torch.device(device) if isinstance(device, str) else device
    images = raw.split(split)[:limit]
    if not images:
        raise DataError(f"split {split!r} of {raw.root} has no {'videos' if video else 'images'}")
    attrs = split_provenance(backbone, raw, split, precision=precision, channels_last=channels_last, dtype=dtype,
                             limit=limit, shard_size=shard_size, video=video)
    fingerprint = json.loads(attrs["fingerprint"])
    if out_path.is_file():
        old = _read_fingerprint(out_path)
        if old == fingerprint:
            log.info("%s is already extracted with these settings", out_path)
            return out_path if dist.rank == 0 else None
        log.warning("%s was extracted with other settings (%s); extracting again", out_path,
                    ", ".join(_differences(old or {}, fingerprint)))
    shard_dir = shard_dir_for(out_path)
    _prepare_shard_dir(shard_dir, fingerprint, dist)
    n_shards = math.ceil(len(images) / shard_size)
    todo = [s for s in range(dist.rank, n_shards, dist.world_size) if not shard_path(shard_dir, s).is_file()]
    items = "videos" if video else "images"  # a video (file or folder of frames) is one item with its frame set
    if todo:
        log.info("split %s: %d %s, %d of %d shards to extract on rank %d", split, len(images), items, len(todo),
                 n_shards, dist.rank)
        start = time.perf_counter()
        n_todo = sum(min((s + 1) * shard_size, len(images)) - s * shard_size for s in todo)
        frames_each = (video.frames or video.max_frames or 1) if isinstance(video, VideoFileSampling) else 1
        choice = choose_engine(backbone, engine=engine, device=device, precision=precision,
                               channels_last=channels_last, n_images=n_todo * frames_each)
        attrs = {**attrs, **choice.describe()}  # what ran is recorded; the fingerprint stays as it was
        write = write_video_shards if isinstance(video, VideoFileSampling) else write_shards
        write(backbone, images, shard_dir, todo, shard_size=shard_size, attrs=attrs, batch_size=batch_size,
              workers=workers, device=device, precision=precision, channels_last=channels_last, dtype=dtype,
              progress=progress, description=f"extract {split}", video=video, engine=choice)
        seconds = time.perf_counter() - start
        log.info("split %s: %d %s in %.1f s (%.1f %s/s, %s engine)", split, n_todo, items, seconds,
                 n_todo / max(seconds, 1e-9), items, choice.engine.name)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if dist.rank != 0:
        return None
    files = [shard_path(shard_dir, s) for s in range(n_shards)]
    _wait_for(files, wait_timeout_s)
    n, n_skipped, skipped = merge_shards(files, out_path, {**attrs, "world_size": dist.world_size,
                                                           **video_report(files, video)})
    shutil.rmtree(shard_dir)
    if n_skipped:
        log.warning("split %s: skipped %d unreadable %s (attrs n_skipped, skipped), first: %s",
                    split, n_skipped, items, skipped[0]["reason"])
    log.info("split %s: wrote %s (%d %s)", split, out_path, n, items)
    return out_path


def output_paths(out: str | Path, splits: Sequence[str]) -> dict[str, Path]:
    """Where each split goes: OUT itself when it ends in .h5 (one split only), else OUT/<split>.h5."""
    out = Path(out)
    if out.suffix == ".h5":
        if len(splits) != 1:
            raise ConfigError(f"--out {out} is a single .h5 file; give a folder to extract {len(splits)} splits")
        return {splits[0]: out}
    return {s: out / f"{s}.h5" for s in splits}


def extract(
    backbone: str | Backbone,
    data: str | Path | None,
    out: str | Path,
    split: str = "train",
    *,
    shards: str | Path | None = None,
    weights: str | Path | None = None,
    size: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    precision: str = "fp32",
    channels_last: bool = DEFAULT_CHANNELS_LAST,
    device: str = "auto",
    dtype: str = DEFAULT_DTYPE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    limit: int | None = None,
    progress: Progress | None = None,
    video: VideoSampling | VideoFileSampling | None = None,
    engine: str = "auto",
) -> list[Path]:
    """Extract backbone feature sets of a raw dataset's split(s) into store files ready for `load_split`.

    Args:
        backbone: a registered backbone name or a ready-made Backbone.
        data: the raw dataset folder (dataset.json + manifest.json); None with `shards`.
        shards: webdataset tar shards instead of a raw dataset (a folder, glob or brace pattern): every sample goes
            into one store labelled `split` (see `vsectl.extract.tar_extract`).
        out: a folder (each split goes to OUT/<split>.h5, so OUT can be `data.root`) or a `.h5` file (one split).
        split: "train", "dev", "test" or "all".
        weights, size: see `create_backbone`.
        batch_size, workers, precision, channels_last, device, dtype, shard_size, limit: see `extract_split`.
        progress: progress reporting.
        video: treat each entry as a video's folder of frame images (`VideoSampling`) or as a video file
            (`VideoFileSampling`); None for images.
        engine: "auto", "eager", "onnx" or "compile"; see `extract_split`.

    Returns:
        The finished store files (empty on torchrun ranks other than 0).
    """
    split = canonical_split(split)  # `val` is accepted for `dev`
    splits = SPLITS if split == "all" else (split,)
    if split != "all" and split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; use train, dev (or val), test or all")
    for name, value, low in (("batch size", batch_size, 1), ("workers", workers, 0), ("shard size", shard_size, 1),
                             ("limit", limit if limit is not None else 1, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown feature dtype '{dtype}'; use {' or '.join(DTYPES)}")
    targets = output_paths(out, splits)
    dist = dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda" and dist.world_size > 1 and dev.index is None:
        dev = torch.device("cuda", dist.local_rank)  # one GPU per torchrun process
    Precision(precision, dev)  # validate before any work
    check_engine(engine, dev, precision)
    if precision == "bf16" and dev.type == "cpu" and not cpu_bf16_units():  # the one CPU probe training uses too
        log.warning("this CPU has no bf16 units: bf16 is emulated and about 10x slower than fp32 here; use fp32")
    if (data is None) == (shards is None):
        raise ConfigError("give exactly one of --data RAW (a raw dataset) or --shards TARS (webdataset tar shards)")
    raw = None if data is None else _checked_raw(data, video)
    if shards is not None:
        _check_tar_request(split, video)
    model = create_backbone(backbone, weights=weights, size=size)  # before the lock: a bad name leaves no folder
    options = {"batch_size": batch_size, "workers": workers, "precision": precision, "channels_last": channels_last,
               "device": dev, "dtype": dtype, "dist": dist, "engine": engine}
    with store_locks(targets.values(), dist):
        if raw is None:
            from vsectl.extract.tar_extract import extract_tar

            path = extract_tar(model, shards, targets[split], split, progress=progress or NullProgress(), **options)
            return [path] if path is not None else []
        return _extract_splits(model, raw, targets, skip_empty=split == "all", video=video, shard_size=shard_size,
                               limit=limit, progress=progress, **options)


def _extract_splits(model: Backbone, raw: RawDataset, targets: dict[str, Path], skip_empty: bool,
                    **kwargs: object) -> list[Path]:
    written = []
    for name, path in targets.items():
        if skip_empty and not raw.split(name):
            log.warning("%s has no %s images; skipping that split", raw.root, name)
            continue
        result = extract_split(model, raw, name, path, **kwargs)
        if result is not None:
            written.append(result)
    return written


@contextlib.contextmanager
def store_locks(paths: Iterable[Path], dist: Distributed) -> Iterator[None]:
    """One writer per store file: a second `extract` into the same file is refused in one line naming the first.

    Rank 0 holds the locks (it merges and replaces the file); torchrun's other ranks write only their own shards.
    """
    with contextlib.ExitStack() as stack:
        if dist.rank == 0:
            for path in paths:
                stack.enter_context(folder_lock(path))
        yield


def _checked_raw(data: str | Path, video: VideoSampling | VideoFileSampling | None) -> RawDataset:
    raw = load_raw_dataset(data)
    modality = raw.manifest.get("modality")
    check_modality(modality, video, raw.root)
    if modality == "video" and video is None:
        raise ConfigError(f"{raw.root} holds videos (folders of frames); add --video to extract them")
    if modality == "image" and video is not None:
        raise ConfigError(f"{raw.root} holds images, not videos; drop --video")
    return raw


def _check_tar_request(split: str, video: VideoSampling | VideoFileSampling | None) -> None:
    if split == "all":
        raise ConfigError("tar shards have no splits: give --split NAME (train, dev or test) to label the store")
    if video is not None:
        raise ConfigError("tar shards hold images; drop --video")
