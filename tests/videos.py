"""Real encoded test videos whose frames say their own number, and the broken files a video folder can hold."""

from __future__ import annotations

import fractions
from pathlib import Path

import numpy as np

BITS = 8  # a frame shows its index as 8 vertical black/white stripes (most significant first)
CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mkv": "libx264"}


def numbered_frame(i: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8: stripe b is white when bit b of i % 256 is set; a lossy codec keeps that readable."""
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    width = size // BITS
    for b in range(BITS):
        if (i >> (BITS - 1 - b)) & 1:
            frame[:, b * width : (b + 1) * width] = 255
    return frame


def frame_number(frame: np.ndarray) -> int:
    """The index a decoded (and possibly resized) `numbered_frame` shows."""
    width = frame.shape[1] / BITS
    bits = [frame[:, round((b + 0.3) * width) : round((b + 0.7) * width)].mean() > 127 for b in range(BITS)]
    return int("".join("1" if bit else "0" for bit in bits), 2)


def write_video(path: Path, n: int, *, size: int = 48, fps: int = 10, pts: list[int] | None = None,
                ticks_per_s: int | None = None, codec: str | None = None, faststart: bool = False) -> Path:
    """Encode `n` numbered frames with PyAV (codec from the suffix); `pts` in 1/`ticks_per_s` s gives a
    variable frame rate."""
    import av

    options = {"movflags": "+faststart"} if faststart else {}
    time_base = fractions.Fraction(1, ticks_per_s or fps)
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec or CODECS[path.suffix], rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, size), format="rgb24")
            frame.pts, frame.time_base = (pts[i] if pts is not None else i), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_audio_only(path: Path) -> Path:
    """An AAC track in an MP4 container, no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_broken(folder: Path) -> dict[str, str]:
    """One file per broken case in `folder`: {file name: the UnreadableVideo kind it must get}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "junk.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    whole = write_video(folder / "whole.mp4", 30).read_bytes()  # index (moov) at the end
    (folder / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.mp4").unlink()
    whole = write_video(folder / "whole.webm", 30).read_bytes()
    (folder / "cut.webm").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.webm").unlink()
    whole = bytearray(write_video(folder / "whole.mp4", 30, faststart=True).read_bytes())  # index first
    whole[len(whole) // 2 :] = bytes(len(whole) - len(whole) // 2)  # zeros over the second half of the frames
    (folder / "damaged.mp4").write_bytes(bytes(whole))
    (folder / "whole.mp4").unlink()
    write_audio_only(folder / "sound.mp4")
    return {"zero.mp4": "empty", "junk.webm": "corrupt", "cut.mp4": "truncated", "cut.webm": "truncated",
            "damaged.mp4": "corrupt", "sound.mp4": "audio_only"}


VFR_PTS = [0, 10, 20, 50, 60, 100, 110, 120, 150, 200]  # in 1/100 s: gaps of 0.1, 0.3 and 0.5 s
