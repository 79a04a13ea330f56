"""Video files through a frozen backbone (`extract --videos`): sampled frames → one frame-feature set per video.

DataLoader workers decode the videos (worker w takes every W-th video) and hand over chunks of at most one batch of
sampled frames; the main process batches frames across videos through the backbone, pools each frame's tokens and
returns the videos' sets in input order. Neither side ever holds a whole decoded video. A file that cannot be used
(empty, corrupt, truncated, audio-only, ...) becomes one line in the shard's skip report; a variable-frame-rate video
is sampled by presentation time like any other and listed in the store's `variable_frame_rate` report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.data.store import StoreWriter
from vsectl.data.video_files import MODALITY, FrameSampling, UnreadableVideo, probe, read_frames, sample_indices
from vsectl.errors import ConfigError
from vsectl.extract.engines import Choice, Engine, choose_engine
from vsectl.extract.video import FRAME_POOLS
from vsectl.models.backbones import Backbone
from vsectl.runtime import NullProgress, Progress, loader_workers

log = logging.getLogger(__name__)

MAX_REPORTED = 100  # variable-frame-rate videos listed in a store's attrs (all are counted), as for skipped ones
LOG_EVERY_S = 30.0  # a progress line this often, for logs that are not a terminal


@dataclass(frozen=True)
class VideoFileSampling:
    """How `extract --videos` turns a video file into a feature set (recorded in the store's provenance).

    Attributes:
        frames: uniform sampling, this many frames per video.
        fps: fixed-rate sampling, frames per second of video.
        max_frames: with `fps`, at most this many frames.
        frame_pool: "mean" or "max" pools each frame's tokens to one vector; "none" keeps every token.
        input: what the entries are (fixed; tells these stores from frame-folder ones).
    """

    frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    frame_pool: str = "mean"
    input: str = field(default="video files", init=False)

    def __post_init__(self) -> None:
        self.sampling()  # validates frames / fps / max_frames
        if self.frame_pool not in FRAME_POOLS:
            raise ConfigError(f"unknown frame pooling '{self.frame_pool}'; use {', '.join(FRAME_POOLS)}")

    def sampling(self) -> FrameSampling:
        return FrameSampling(frames=self.frames, fps=self.fps, max_frames=self.max_frames)

    @classmethod
    def from_json(cls, text: str) -> VideoFileSampling | None:
        """The sampling recorded in a store's `video` attr, or None when it holds frame-folder videos."""
        recorded = json.loads(text)
        if recorded.get("input") != "video files":
            return None
        return cls(**{k: v for k, v in recorded.items() if k != "input"})


def check_modality(modality: str | None, video: Any, root: Path) -> None:
    """Refuse, in one line, video files read without `--videos` or anything else read with it."""
    files = isinstance(video, VideoFileSampling)
    if modality == MODALITY and not files:
        raise ConfigError(f"{root} holds video files; extract them with --videos and --frames N or --fps R")
    if modality != MODALITY and files:
        kind = "folders of frame images (use --video)" if modality == "video" else "images, not video files"
        raise ConfigError(f"{root} holds {kind}; drop --videos")


class VideoChunks(torch.utils.data.IterableDataset):
    """Sampled frames of video files in chunks, for a DataLoader; worker w of W decodes videos w, w + W, ...

    Items are `(position, frames (k, 3, S, S) uint8, last, reason, facts)`: a video's chunks, then one item with
    `last` set (and no frames) that carries the one-line `reason` when the file could not be used and the probe's
    facts as JSON. Chunks sent before a failure are to be dropped by the reader.
    """

    def __init__(self, paths: Sequence[str | Path], sampling: FrameSampling, size: int, chunk: int) -> None:
        self.paths, self.sampling, self.size, self.chunk = [str(p) for p in paths], sampling, size, chunk

    def _video(self, pos: int) -> Iterator[tuple[int, torch.Tensor, bool, str, str]]:
        empty = torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        facts = "{}"
        try:
            info = probe(self.paths[pos])
            facts = json.dumps(info.describe())
            frames = []
            for _, frame in read_frames(self.paths[pos], sample_indices(info, self.sampling), info, self.size):
                frames.append(torch.from_numpy(frame).permute(2, 0, 1))  # (3, S, S)
                if len(frames) == self.chunk:
                    yield pos, torch.stack(frames), False, "", facts
                    frames = []
            if frames:
                yield pos, torch.stack(frames), False, "", facts
        except UnreadableVideo as e:
            yield pos, empty, True, str(e), json.dumps({"kind": e.kind})
            return
        except (OSError, ValueError) as e:  # anything else the decoder or the resize refuses: still one line
            yield pos, empty, True, f"{self.paths[pos]}: corrupt: {type(e).__name__}: {e}", '{"kind": "corrupt"}'
            return
        yield pos, empty, True, "", facts

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, bool, str, str]]:
        worker = torch.utils.data.get_worker_info()
        start, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for pos in range(start, len(self.paths), step):
            yield from self._video(pos)


class _FrameBatcher:
    """Frames of several videos gathered into backbone batches; each frame's features go back to its video."""

    def __init__(self, engine: Engine, frame_pool: str) -> None:
        self.engine, self.frame_pool = engine, frame_pool
        self.frames: list[torch.Tensor] = []
        self.owners: list[int] = []
        self.sets: dict[int, list[np.ndarray]] = {}
        self.n_frames = 0

    def add(self, pos: int, frames: torch.Tensor) -> None:
        self.frames.append(frames)
        self.owners.extend([pos] * len(frames))
        self.sets.setdefault(pos, [])

    def pending(self) -> int:
        return len(self.owners)

    def flush(self) -> None:
        if not self.owners:
            return
        feats = self.engine.run(torch.cat(self.frames))  # (b, N, C), the engine image extraction chose
        if self.frame_pool != "none":
            feats = (feats.mean if self.frame_pool == "mean" else feats.max)(axis=1, keepdims=True)  # (b, 1, C)
        for pos, f in zip(self.owners, feats, strict=True):
            self.sets[pos].append(f)
        self.n_frames += len(self.owners)
        self.frames, self.owners = [], []

    def take(self, pos: int) -> np.ndarray | None:
        """The finished set of video `pos`: (frames, C), or (frames · N, C) with frame pooling "none"."""
        parts = self.sets.pop(pos, [])
        return np.concatenate(parts, axis=0) if parts else None

    def finish(self, closed: dict[int, tuple[str, dict[str, Any]]]) -> dict[int, tuple[Any, str, dict[str, Any]]]:
        """Run the pending frames, then hand over (and forget) the videos in `closed`: {pos: (set, reason, facts)}."""
        self.flush()
        done = {}
        for pos, (reason, facts) in closed.items():
            feats = self.take(pos)  # a failed video's frames are dropped here
            done[pos] = (None, reason, facts) if reason else (feats, "", facts)
        closed.clear()
        return done


def extract_videos(
    backbone: Backbone,
    paths: Sequence[str | Path],
    video: VideoFileSampling,
    *,
    batch_size: int = 32,
    workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    progress: Progress | None = None,
    engine: str | Choice = "auto",
) -> Iterator[tuple[int, np.ndarray | None, str, dict[str, Any]]]:
    """Decode, sample and run a backbone over video files; yield one frame-feature set per file, in input order.

    Args:
        backbone: a frozen backbone; frames are resized to `backbone.size` and normalised as images are.
        paths: video files.
        video: frame sampling and per-frame pooling.
        batch_size: frames per forward pass (frames of several videos share a batch).
        workers: DataLoader worker processes decoding videos (0: decode in this process).
        device, precision, channels_last: see `extract_images`.
        progress: receives `update(frames_per_s=..., videos_per_s=...)`.
        engine: how the backbone runs: an engine name or a `Choice` made for the whole job (`vsectl.extract.engines`).

    Yields:
        (index into `paths`, (T, C) float32 set or None when the file could not be used, the one-line reason when
        None, the probe's facts: frames, duration_s, codec, size, variable_rate; or {"kind": ...} when None).
    """
    device = torch.device(device) if isinstance(device, str) else device
    progress = progress or NullProgress()
    choice = engine if isinstance(engine, Choice) else choose_engine(
        backbone, engine=engine, device=device, precision=precision, channels_last=channels_last,
        n_images=len(paths) * (video.frames or video.max_frames or 1))
    loader = torch.utils.data.DataLoader(VideoChunks(paths, video.sampling(), backbone.size, batch_size),
                                         batch_size=None, num_workers=loader_workers(workers))
    batcher = _FrameBatcher(choice.engine, video.frame_pool)
    closed: dict[int, tuple[str, dict[str, Any]]] = {}  # videos whose last chunk came, waiting for the backbone
    ready: dict[int, tuple[np.ndarray | None, str, dict[str, Any]]] = {}
    started = last_log = time.perf_counter()
    next_out = 0
    for pos, frames, last, reason, facts in loader:
        if len(frames):
            batcher.add(pos, frames)
        if last:
            closed[pos] = (reason, json.loads(facts))
        if batcher.pending() >= batch_size:  # full batches only: sets wait at most one batch to come out
            ready.update(batcher.finish(closed))
        while next_out in ready:
            yield next_out, *ready.pop(next_out)
            next_out += 1
        now = time.perf_counter()
        progress.update(frames_per_s=batcher.n_frames / max(now - started, 1e-9),
                        videos_per_s=next_out / max(now - started, 1e-9))
        if now - last_log > LOG_EVERY_S:
            log.info("videos: %d of %d done, %.1f frames/s", next_out, len(paths), batcher.n_frames / (now - started))
            last_log = now
    ready.update(batcher.finish(closed))
    while next_out in ready:
        yield next_out, *ready.pop(next_out)
        next_out += 1


def _write_video_shard(writer: StoreWriter, items: list[dict[str, Any]],
                       stream: Iterator[tuple[int, np.ndarray | None, str, dict[str, Any]]]) -> None:
    skipped, vfr = [], []
    for item in items:
        _, feats, reason, facts = next(stream)
        if feats is None:
            reason = reason or f"{item['path']}: no-frames: no sampled frame could be decoded"
            log.warning("skipped video %s: %s", item["id"], reason)
            skipped.append({"id": item["id"], "reason": reason, "kind": facts.get("kind", "no_frames")})
            continue
        if facts.get("variable_rate"):
            note = (f"{item['path']}: variable frame rate ({facts['frames']} frames over {facts['duration_s']} s): "
                    "sampled by presentation time")
            log.info("%s", note)
            vfr.append({"id": item["id"], "note": note})
        j = writer.add_image(item["id"], feats)
        for text in item["captions"]:
            if text.strip():
                writer.add_caption(text, j)
    writer.attrs.update(n_skipped=len(skipped), skipped=skipped[:MAX_REPORTED],
                        n_variable_frame_rate=len(vfr), variable_frame_rate=vfr[:MAX_REPORTED])


def write_video_shards(
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
    video: VideoFileSampling,
    engine: str | Choice = "eager",
) -> None:
    """`write_shards` for video files: each shard of `shard_size` videos to its own store file, atomically, in order.

    A shard's sets do not depend on which shards ran before it (frames are batched across videos, but each frame's
    features depend on that frame alone).
    """
    from vsectl.extract.shards import shard_path

    spans = {s: (s * shard_size, min((s + 1) * shard_size, len(images))) for s in shards}
    paths = [images[i]["path"] for s in shards for i in range(*spans[s])]
    stream = iter(progress.track(
        extract_videos(backbone, paths, video, batch_size=batch_size, workers=workers, device=device,
                       precision=precision, channels_last=channels_last, progress=progress, engine=engine),
        total=len(paths), description=description,
    ))
    try:
        for s in shards:
            a, b = spans[s]
            shard_attrs = {**attrs, "shard": s}
            with StoreWriter(shard_path(shard_dir, s), backbone.feat_dim, dtype=dtype, attrs=shard_attrs) as w:
                _write_video_shard(w, images[a:b], stream)
            log.debug("shard %d done (%d videos)", s, b - a)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the DataLoader workers now, also when interrupted


def video_report(shard_files: Sequence[Path], video: Any) -> dict[str, Any]:
    """The merged store's variable-frame-rate report from its shards' attrs (empty unless `video` is files)."""
    if not isinstance(video, VideoFileSampling):
        return {}
    import h5py

    listed: list[dict[str, Any]] = []
    total = 0
    for path in shard_files:
        with h5py.File(path, "r") as f:
            total += int(f.attrs.get("n_variable_frame_rate", 0))
            listed.extend(json.loads(f.attrs.get("variable_frame_rate", "[]")))
    return {"n_variable_frame_rate": total, "variable_frame_rate": listed[:MAX_REPORTED]}
