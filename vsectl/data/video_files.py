"""Video files (.mp4, .webm, .mkv, .avi, ...): probe, which frames to sample, and a streaming decode.

PyAV (the `video` extra; FFmpeg inside its wheel) is imported only when a file is read. Sampling is plain index
arithmetic on the frames' presentation times (`sample_times`, `frames_at`), so it is the same for constant and
variable frame rates and can be checked without decoding. `read_frames` decodes in order and hands over one sampled
frame at a time: no decoded video is ever held, whatever its length. A file that cannot be used raises
`UnreadableVideo` with one line saying what is wrong with it (its `kind` names the case).
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".3gp"})
VFR_TOLERANCE = 0.1  # a frame interval more than 10 % away from the median one marks a variable frame rate
TRUNCATED_SHORTFALL = 0.1  # frames ending this share (and a frame) short of the declared duration: truncated
MODALITY = "video_files"  # manifest modality of a raw dataset whose entries are video files (`extract --videos`)
KINDS = ("empty", "corrupt", "truncated", "audio_only", "no_video", "no_frames")  # UnreadableVideo.kind values


class UnreadableVideo(DataError):
    """A video file that cannot be sampled; extraction skips it and lists it in the shard's report.

    Attributes:
        kind: one of `KINDS`.
        path: the file.
    """

    def __init__(self, path: str | Path, kind: str, detail: str) -> None:
        super().__init__(f"{path}: {kind.replace('_', '-')}: {detail}")
        self.kind, self.path = kind, str(path)


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ConfigError("reading video files needs PyAV; install the extra: pip install 'vsectl[video]'") from None
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own stderr chatter; every failure is reported as one line
    return av


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video become its set: `frames` spread evenly, or `fps` frames per second.

    Both place the k-th of n samples at the middle of the k-th of n equal slices of the video's duration D,
    t_k = (k + 0.5) · D / n, and take the frame on screen at t_k. With `fps`, n = max(1, round(D · fps)), capped at
    `max_frames`: a 10 s clip at 1 fps gives the frames at 0.5, 1.5, ..., 9.5 s.

    Attributes:
        frames: uniform sampling, this many frames per video (fewer when the video has fewer).
        fps: fixed-rate sampling, frames per second of video.
        max_frames: with `fps`, at most this many frames (spread evenly over the whole video).
    """

    frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.fps is None):
            raise ConfigError("give exactly one of --frames N (uniform) or --fps R (fixed rate) for video files")
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"--frames must be at least 1, got {self.frames}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"--fps must be a positive number, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames must be at least 1, got {self.max_frames}")

    def count(self, duration: float) -> int:
        """How many frames to sample from a video of `duration` seconds."""
        n = self.frames if self.frames is not None else max(1, round(duration * self.fps))
        return min(n, self.max_frames) if self.max_frames is not None else n


def sample_times(duration: float, sampling: FrameSampling) -> list[float]:
    """Sample times in seconds from the first frame: the middles of `count(duration)` equal slices."""
    n = sampling.count(duration)
    return [(k + 0.5) * duration / n for k in range(n)]


def frames_at(times: list[float], times_s: list[float]) -> list[int]:
    """The frame on screen at each time: the last frame starting at or before it (the first frame for earlier times).

    Args:
        times: each frame's start in seconds from the first frame, ascending (display order).
        times_s: the sample times.

    Returns:
        Ascending distinct frame indices (two samples on one frame keep it once).
    """
    picked = {max(0, bisect.bisect_right(times, t) - 1) for t in times_s}
    return sorted(picked)


@dataclass(frozen=True)
class VideoProbe:
    """What a demux-only pass learns about a video stream (no frame is decoded).

    Attributes:
        pts: each frame's presentation timestamp in stream ticks, display order.
        time_base: seconds per tick.
        end: the end of the last frame in ticks (its start plus its duration).
        declared_s: the duration the container declares, in seconds (None when it declares none).
        codec, width, height: the stream's codec name and frame size.
    """

    pts: tuple[int, ...]
    time_base: float
    end: int
    declared_s: float | None
    codec: str
    width: int
    height: int

    @property
    def n_frames(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        """Seconds from the first frame's start to the last frame's end."""
        return (self.end - self.pts[0]) * self.time_base

    @property
    def times(self) -> list[float]:
        """Each frame's start in seconds from the first frame."""
        return [(p - self.pts[0]) * self.time_base for p in self.pts]

    @property
    def variable_rate(self) -> bool:
        """Frame intervals differ by more than `VFR_TOLERANCE` of the median (or a tick)."""
        if len(self.pts) < 3:
            return False
        gaps = np.diff(np.asarray(self.pts, dtype=np.int64))
        median = float(np.median(gaps))
        return bool(np.any(np.abs(gaps - median) > max(VFR_TOLERANCE * median, 1.0)))

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for reports."""
        return {"frames": self.n_frames, "duration_s": round(self.duration, 3), "codec": self.codec,
                "size": [self.width, self.height], "variable_rate": self.variable_rate}


def _open(av: Any, path: Path) -> Any:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UnreadableVideo(path, "corrupt", f"cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise UnreadableVideo(path, "empty", "zero-length file (0 bytes)")
    try:
        return av.open(str(path), "r")
    except av.FFmpegError as e:
        if "moov atom not found" in str(e) and _starts_like_mp4(path):
            raise UnreadableVideo(path, "truncated", "the MP4 index (moov) is missing: the file was cut short") \
                from None
        raise UnreadableVideo(path, "corrupt", f"not a readable video container ({_ffmpeg_reason(e)})") from None


def _starts_like_mp4(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8)[4:8] == b"ftyp"  # every MP4/MOV opens with an ftyp box


def _ffmpeg_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).split(":")[0]


def _video_stream(path: Path, container: Any) -> Any:
    if container.streams.video:
        return container.streams.video[0]
    audio = len(container.streams.audio)
    if audio:
        raise UnreadableVideo(path, "audio_only", f"no video stream ({audio} audio stream{'s' * (audio > 1)} only)")
    raise UnreadableVideo(path, "no_video", "no video stream in the container")


def _declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None  # AV_TIME_BASE is microseconds


def probe(path: str | Path) -> VideoProbe:
    """Demux (without decoding) the first video stream of a file: every frame's timestamp and the stream's facts.

    Raises:
        UnreadableVideo: empty, corrupt, truncated, audio-only, no video stream, or no frames.
    """
    av, path = _av(), Path(path)
    with _open(av, path) as container:
        stream = _video_stream(path, container)
        pts, last = [], (-math.inf, 0)  # (pts, duration) of the last frame in display order
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size:  # the demuxer ends with an empty flush packet
                    pts.append(int(packet.pts))
                    last = max(last, (int(packet.pts), int(packet.duration or 0)))
        except av.FFmpegError as e:
            reason = _ffmpeg_reason(e)
            raise UnreadableVideo(path, "corrupt", f"unreadable after {len(pts)} frames ({reason})") from None
        if not pts:
            raise UnreadableVideo(path, "no_frames", "the video stream holds no frames")
        pts.sort()  # demux order is decode order; B-frames come back in display order
        gaps = np.diff(pts)
        step = last[1] or (int(np.median(gaps)) if len(gaps) else 1)
        info = VideoProbe(pts=tuple(pts), time_base=float(stream.time_base), end=pts[-1] + step,
                          declared_s=_declared_seconds(container, stream), codec=stream.codec_context.name,
                          width=int(stream.codec_context.width), height=int(stream.codec_context.height))
    _check_complete(path, info)
    return info


def _check_complete(path: Path, info: VideoProbe) -> None:
    declared = info.declared_s
    frame_s = info.duration / info.n_frames
    if declared and info.duration < declared * (1 - TRUNCATED_SHORTFALL) - frame_s:
        raise UnreadableVideo(path, "truncated", f"frames stop at {info.duration:.2f} s of the {declared:.2f} s the "
                                                 "container declares")


def sample_indices(info: VideoProbe, sampling: FrameSampling) -> list[int]:
    """The frames `sampling` picks from a probed video (ascending display-order indices)."""
    return frames_at(info.times, sample_times(info.duration, sampling))


def read_frames(path: str | Path, indices: list[int], info: VideoProbe, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode a video in order and yield its frames `indices`, one at a time, as RGB uint8 size×size arrays.

    Each frame is resized like an image (whole frame to size×size, bilinear, no crop). Decoding stops after the
    last wanted frame; nothing else is kept, so memory does not grow with the video's length.

    Args:
        path: the video file.
        indices: ascending display-order frame indices (from `sample_indices`).
        info: the file's `probe`.
        size: output side in pixels.

    Yields:
        (frame index, (size, size, 3) uint8).

    Raises:
        UnreadableVideo: the stream fails to decode, or ends before the wanted frames.
    """
    from vsectl.data.images import resize_square

    av, path = _av(), Path(path)
    wanted, index_set, known = {info.pts[i]: i for i in indices}, set(indices), set(info.pts)
    seen, position = 0, -1
    with _open(av, path) as container:
        stream = _video_stream(path, container)
        try:
            for frame in container.decode(stream):
                position += 1
                if frame.pts in known:
                    i = wanted.get(frame.pts)
                else:  # a decoder that does not carry the packet's timestamp: count frames in display order
                    i = position if position in index_set else None
                if i is None:
                    continue
                yield i, np.array(resize_square(frame.to_image(), size), dtype=np.uint8)  # writable, for torch
                seen += 1
                if seen == len(wanted):
                    return
        except av.FFmpegError as e:
            raise UnreadableVideo(path, "corrupt", f"decoding failed after {position + 1} frames "
                                                   f"({_ffmpeg_reason(e)})") from None
    raise UnreadableVideo(path, "truncated", f"decoding ended after {position + 1} of {info.n_frames} frames")


def list_videos(folder: str | Path) -> list[Path]:
    """Video files (by suffix) under `folder`, recursively, in sorted relative-path order."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / f for f in files if Path(f).suffix.lower() in VIDEO_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())
