"""Benchmark video extraction against image extraction on the same backbone: decode + sample + extract frames/s of
`vsectl.extract.extract_videos` vs images/s of `vsectl.extract.extract_images` over the very frames it samples,
saved as PNG files (same pixels, same resize, same backbone and batch size), in one run, interleaved.

Clips: the video demo's test clips (H.264 and VP9, 128 px) when `data/video_demo` is prepared, else synthetic
clips of moving shapes written here by PyAV. Each round runs both paths once; the figures are medians over rounds of
wall time and of this process's CPU time (one process, `--workers 0` by default, so CPU time is all the work).
Separately it times decoding alone: `probe` + `read_frames` of the sampled frames vs PIL decode of their PNGs.

    python benchmarks/bench_video.py [--clips 24] [--frames 8] [--size 224] [--rounds 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import fractions
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, LoadMeter, describe, machine, write_report

from vsectl.data.images import ImageFiles
from vsectl.data.video_files import probe, read_frames, sample_indices
from vsectl.extract import VideoFileSampling, extract_images, extract_videos
from vsectl.models.backbones import create_backbone

DEMO_CLIPS = Path("data/video_demo/videos")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def synthetic_clips(folder: Path, n: int, size: int = 128, fps: int = 8, frames: int = 24) -> list[Path]:
    """Clips of a disc moving over a gradient, alternately H.264 (.mp4) and VP9 (.webm)."""
    import av

    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for k in range(n):
        path = folder / f"clip{k}{'.mp4' if k % 2 == 0 else '.webm'}"
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264" if k % 2 == 0 else "libvpx-vp9", rate=fps)
            s.width = s.height = size
            s.pix_fmt = "yuv420p"
            s.codec_context.time_base = fractions.Fraction(1, fps)
            for i in range(frames):
                img = np.stack([(xx + 7 * k) % 256, (yy + 3 * i) % 256, np.full_like(xx, 40 * k % 256)], -1)
                cx = (i * size // frames + 13 * k) % size
                img[(xx - cx) ** 2 + (yy - size // 2) ** 2 < (size // 6) ** 2] = (255, 255, 255)
                f = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
                f.pts = i
                c.mux(s.encode(f))
            c.mux(s.encode())
        out.append(path)
    return out


def sampled_pngs(clips: list[Path], video: VideoFileSampling, folder: Path) -> list[Path]:
    """The frames `video` samples from each clip, at the clip's own resolution, as PNG files."""
    from PIL import Image

    out = []
    for k, clip in enumerate(clips):
        info = probe(clip)
        for i, frame in read_frames(clip, sample_indices(info, video.sampling()), info, info.width):
            path = folder / f"{k:03d}_{i:03d}.png"
            Image.fromarray(frame).save(path)
            out.append(path)
    return out


def timed(fn: Any) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), cpu_s()
    fn()
    return time.perf_counter() - t0, cpu_s() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS / "video.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    video = VideoFileSampling(frames=args.frames)
    backbone = create_backbone("efficientnet-lite0", size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if DEMO_CLIPS.is_dir():
            clips, source = sorted(DEMO_CLIPS.glob("test*"))[: args.clips], f"{DEMO_CLIPS} (test clips)"
        else:
            clips, source = synthetic_clips(tmp, args.clips), "synthetic clips (H.264 and VP9, 128 px)"
        pngs = sampled_pngs(clips, video, tmp)
        n_frames = len(pngs)
        common = {"batch_size": args.batch_size, "workers": args.workers, "device": "cpu"}

        def run_video() -> None:
            for _ in extract_videos(backbone, clips, video, **common):
                pass

        def run_images() -> None:
            for _ in extract_images(backbone, pngs, **common):
                pass

        def decode_video() -> None:
            for clip in clips:
                info = probe(clip)
                for _ in read_frames(clip, sample_indices(info, video.sampling()), info, args.size):
                    pass

        def decode_images() -> None:
            files = ImageFiles(pngs, args.size)
            for i in range(len(files)):
                files[i]

        paths = {"video: decode + sample + extract": run_video, "images: decode + extract": run_images,
                 "video: decode + sample only": decode_video, "images: decode only": decode_images}
        for fn in paths.values():  # warm-up: thread pools, oneDNN kernels, codec libraries
            fn()
        meter = LoadMeter()
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                runs[name].append(timed(fn))
        load = meter.read()
    rows = {name: {"wall_per_s": float(np.median([n_frames / w for w, _ in r])),
                   "cpu_per_s": float(np.median([n_frames / c for _, c in r])), "runs": r} for name, r in runs.items()}
    rows["ratio_video_to_images"] = {
        k: rows["video: decode + sample + extract"][k] / rows["images: decode + extract"][k]
        for k in ("wall_per_s", "cpu_per_s")}
    report = {"machine": machine(), "load": load, "source": source, "clips": len(clips), "frames": n_frames,
              "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    write_report(args.json, report)
    print(describe(report["machine"]))
    print(f"{len(clips)} clips from {source}, {args.frames} frames each ({n_frames} frames), EfficientNet-Lite0 at "
          f"{args.size} px, batch {args.batch_size}, workers {args.workers}, {args.rounds} rounds; other processes "
          f"used {load['others_cores']:.2f} cores meanwhile")
    print(f"{'path':36s} {'frames/s (wall)':>16s} {'frames/s (CPU)':>15s}")
    for name in paths:
        print(f"{name:36s} {rows[name]['wall_per_s']:16.1f} {rows[name]['cpu_per_s']:15.1f}")
    r = rows["ratio_video_to_images"]
    print(f"{'video / images':36s} {r['wall_per_s']:16.3f} {r['cpu_per_s']:15.3f}")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
