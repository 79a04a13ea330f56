"""Feature extraction: raw images → frozen backbone → feature sets in the HDF5 store (sharded, resumable, torchrun).

A split is cut into shards of `shard_size` consecutive images, each written atomically to
`<split>.shards/shard-NNNNN.h5`. A killed run restarts at the first missing shard; when every shard exists they are
merged, streaming, into `<split>.h5` and the shard folder is removed. Under torchrun, rank r extracts the shards i with
i % WORLD_SIZE == r and rank 0 merges.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vsectl.data.images import ImageFiles, normalize
from vsectl.data.raw import RawDataset, load_raw_dataset, sha256_file, write_json_atomic
from vsectl.data.splits import canonical_split
from vsectl.data.store import DTYPES, StoreWriter, open_store
from vsectl.errors import ConfigError, DataError
from vsectl.models.backbones import Backbone, create_backbone
from vsectl.runtime import (
    Distributed,
    NullProgress,
    Precision,
    Progress,
    distributed_from_env,
    loader_workers,
    resolve_device,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
DEFAULT_SHARD_SIZE = 512  # images per shard: at most this much work is lost to a kill
DEFAULT_DTYPE = "float16"  # backbone activations are bounded (ReLU6, LayerNorm); halves the disk; overflow is refused
DEFAULT_CHANNELS_LAST = True  # 1.1-1.8× faster for EfficientNet-Lite0 on both CPUs measured and on an H100 at batch
# 128; no effect on the transformers towers (docs/extract.md)
MERGE_BLOCK_IMAGES = 64  # images read per block while merging shards (bounds the merge's memory)
MAX_SKIPPED_RECORDS = 100  # skipped images listed in attrs (HDF5 attrs over 64 KiB fail); all are counted
POLL_SECONDS = 2.0  # rank 0 checks this often for the other ranks' shards
RESIZE = "full image resized to size×size, bilinear (PIL), aspect not preserved, no crop (official test transform)"
FINGERPRINT_KEYS = ("backbone", "weights", "weights_sha256", "input_size", "mean", "std", "precision", "channels_last",
                    "dtype", "split", "limit", "shard_size", "source_dataset_sha256", "source_manifest_sha256",
                    "video")  # "video" only for `--video`: image stores keep the fingerprint they were made with
FRAME_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"})  # frame images in a video folder
FRAME_POOLS = ("mean", "max", "none")


DistInfo = Distributed  # this process's place in a torchrun job (rank 0 of 1 without torchrun)


def dist_info() -> DistInfo:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun (or SLURM) sets them."""
    try:
        return distributed_from_env()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); without them bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent in other builds
        return True


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
    progress: Progress | None = None,
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Run a backbone over image files and yield one feature set per file, in batch order.

    Reusable for anything that is a list of image files (video frames included). The backbone is moved to `device`.

    Args:
        backbone: a frozen backbone; images are resized to `backbone.size` and normalised with its mean/std.
        paths: image files.
        batches: index lists into `paths`, processed in this order; default consecutive batches of `batch_size`.
        batch_size: images per forward pass when `batches` is not given.
        workers: DataLoader worker processes decoding images (0: decode in this process).
        device: where the backbone runs.
        precision: "fp32", or "bf16" autocast ("fp16" on CUDA).
        channels_last: run convolutions in NHWC memory layout.
        progress: receives `update(images_per_s=...)` after each batch.

    Yields:
        (index into `paths`, (N, C) float32 features or None when the file could not be read, reason when None).
    """
    device = torch.device(device) if isinstance(device, str) else device
    prec = Precision(precision, device)
    progress = progress or NullProgress()
    if batches is None:
        batches = make_batches(0, len(paths), batch_size)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, backbone.size), batch_sampler=batches, num_workers=loader_workers(workers),
        pin_memory=device.type == "cuda",
    )
    # Set the layout both ways: the same backbone may have been run channels-last before.
    backbone.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    started, done = time.perf_counter(), 0
    for index, images, ok, reasons in loader:
        feats = None
        if ok.any():
            x = images.to(device, non_blocking=True)  # (b, 3, S, S) uint8, still pinned here
            if not ok.all():
                x = x[ok.to(device)]
            x = normalize(x, backbone.mean, backbone.std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # inference_mode only around the forward: a mode entered in a generator would leak into the caller
            with torch.inference_mode(), prec.autocast():
                out = backbone(x)  # (b, N, C)
            feats = out.float().cpu().numpy()
        k = 0
        for i, good, reason in zip(index.tolist(), ok.tolist(), reasons, strict=True):
            if good:
                yield i, feats[k], ""
                k += 1
            else:
                yield i, None, reason
        done += len(index)
        progress.update(images_per_s=done / max(time.perf_counter() - started, 1e-9))


# ------------------------------------------------------------------------------------------------ shards and merge


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


@dataclass(frozen=True)
class VideoSampling:
    """How a video's frame folder becomes a feature set (`extract --video`).

    Attributes:
        stride: keep every `stride`-th frame image (frames dumped at F fps, kept at F / stride fps).
        max_frames: at most this many frames per video, picked uniformly over the kept ones (first and last kept).
        frame_pool: "mean" or "max" pools each frame's tokens to one vector (the video's set is its frames);
            "none" keeps every token of every frame.
    """

    stride: int = 1
    max_frames: int | None = None
    frame_pool: str = "mean"

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ConfigError(f"frame stride must be at least 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max frames must be at least 1, got {self.max_frames}")
        if self.frame_pool not in FRAME_POOLS:
            raise ConfigError(f"unknown frame pooling '{self.frame_pool}'; use {', '.join(FRAME_POOLS)}")


def _natural_key(path: Path) -> list[Any]:
    """frame_2.jpg before frame_10.jpg."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def list_frames(folder: Path, sampling: VideoSampling) -> list[Path]:
    """The sampled frame images of one video folder, in natural name order (empty when there are none)."""
    if not folder.is_dir():
        return []
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()),
                    key=_natural_key)[:: sampling.stride]
    if sampling.max_frames is not None and len(frames) > sampling.max_frames:
        keep = np.linspace(0, len(frames) - 1, sampling.max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def _item_files(images: list[dict[str, Any]], a: int, b: int, video: VideoSampling | None) -> list[list[Path]]:
    """The files of items a..b-1: the image itself, or a video's sampled frames."""
    if video is None:
        return [[Path(images[i]["path"])] for i in range(a, b)]
    return [list_frames(Path(images[i]["path"]), video) for i in range(a, b)]


def _pool_frames(feats: list[np.ndarray], video: VideoSampling | None) -> np.ndarray:
    """One item's feature set from its files' (N, C) sets: an image's own set, or a video's frame set."""
    if video is None:
        return feats[0]
    if video.frame_pool == "none":
        return np.concatenate(feats, axis=0)
    reduce = np.mean if video.frame_pool == "mean" else np.max
    return np.stack([reduce(f, axis=0) for f in feats])  # (frames, C)


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
                       channels_last=channels_last, progress=progress),
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


# ------------------------------------------------------------------------------------------------ one split


def split_provenance(
    backbone: Backbone, raw: RawDataset, split: str, *, precision: str, channels_last: bool, dtype: str,
    limit: int | None, shard_size: int, video: VideoSampling | None = None,
) -> dict[str, Any]:
    """Provenance attrs of an extracted split; `fingerprint` holds the part that decides whether files can be reused."""
    import vsectl

    manifest = raw.root / "manifest.json"
    info = {k: v for k, v in backbone.provenance().items() if k != "feat_dim"}  # the store writes feat_dim itself
    info.update(
        normalisation="(x / 255 - mean) / std per RGB channel, x the uint8 pixel",
        resize=RESIZE,
        precision=precision,
        channels_last=channels_last,
        dtype=dtype,
        split=split,
        limit=limit,
        shard_size=shard_size,
        source_dataset=str(raw.root),
        image_root=str(raw.image_root),
        source_dataset_sha256=sha256_file(raw.root / "dataset.json"),
        source_manifest_sha256=sha256_file(manifest) if manifest.is_file() else None,
        vsectl_version=vsectl.__version__,
        torch_version=str(torch.__version__),  # a str subclass h5py cannot store
    )
    if video is not None:
        info["video"] = json.dumps(asdict(video), sort_keys=True)  # the frame sampling
    info["fingerprint"] = json.dumps({k: info[k] for k in FINGERPRINT_KEYS if k in info}, sort_keys=True)
    return info


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
    video: VideoSampling | None = None,
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
        video: each dataset entry is a folder of frame images, sampled and pooled as this says (None: images).

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
    if todo:
        log.info("split %s: %d images, %d of %d shards to extract on rank %d", split, len(images), len(todo), n_shards,
                 dist.rank)
        start = time.perf_counter()
        write_shards(backbone, images, shard_dir, todo, shard_size=shard_size, attrs=attrs, batch_size=batch_size,
                     workers=workers, device=device, precision=precision, channels_last=channels_last, dtype=dtype,
                     progress=progress, description=f"extract {split}", video=video)
        n = sum(min((s + 1) * shard_size, len(images)) - s * shard_size for s in todo)
        seconds = time.perf_counter() - start
        log.info("split %s: %d images in %.1f s (%.1f images/s)", split, n, seconds, n / max(seconds, 1e-9))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if dist.rank != 0:
        return None
    files = [shard_path(shard_dir, s) for s in range(n_shards)]
    _wait_for(files, wait_timeout_s)
    n, n_skipped, skipped = merge_shards(files, out_path, {**attrs, "world_size": dist.world_size})
    shutil.rmtree(shard_dir)
    if n_skipped:
        log.warning("split %s: skipped %d unreadable %s (attrs n_skipped, skipped), first: %s",
                    split, n_skipped, "videos" if video else "images", skipped[0]["reason"])
    log.info("split %s: wrote %s (%d images)", split, out_path, n)
    return out_path


def _prepare_shard_dir(shard_dir: Path, fingerprint: dict[str, Any], dist: DistInfo) -> None:
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
        write_json_atomic(manifest, {"fingerprint": fingerprint}, indent=2)


# ------------------------------------------------------------------------------------------------ the command


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
    data: str | Path,
    out: str | Path,
    split: str = "train",
    *,
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
    video: VideoSampling | None = None,
) -> list[Path]:
    """Extract backbone feature sets of a raw dataset's split(s) into store files ready for `load_split`.

    Args:
        backbone: a registered backbone name or a ready-made Backbone.
        data: the raw dataset folder (dataset.json + manifest.json).
        out: a folder (each split goes to OUT/<split>.h5, so OUT can be `data.root`) or a `.h5` file (one split).
        split: "train", "dev", "test" or "all".
        weights, size: see `create_backbone`.
        batch_size, workers, precision, channels_last, device, dtype, shard_size, limit: see `extract_split`.
        progress: progress reporting.
        video: treat each entry as a video's folder of frame images (`VideoSampling`); None for images.

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
    if precision == "bf16" and dev.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("this CPU has no native bf16 support: bf16 runs about 10x slower than fp32 here; use fp32")
    raw = load_raw_dataset(data)
    modality = raw.manifest.get("modality")
    if modality == "video" and video is None:
        raise ConfigError(f"{raw.root} holds videos (folders of frames); add --video to extract them")
    if modality == "image" and video is not None:
        raise ConfigError(f"{raw.root} holds images, not videos; drop --video")
    model = create_backbone(backbone, weights=weights, size=size)
    written = []
    for name, path in targets.items():
        if split == "all" and not raw.split(name):
            log.warning("%s has no %s images; skipping that split", raw.root, name)
            continue
        result = extract_split(model, raw, name, path, batch_size=batch_size, workers=workers, device=dev,
                               precision=precision, channels_last=channels_last, dtype=dtype, shard_size=shard_size,
                               limit=limit, dist=dist, progress=progress, video=video)
        if result is not None:
            written.append(result)
    return written
