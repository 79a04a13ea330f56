"""vsectl extract: backbone feature sets of a raw image-caption dataset into the HDF5 store (torchrun-aware)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vsectl.cli.common import STATE, DeviceOpt, RichProgress, app, fail, interrupted, run_guarded


# Defaults repeat vsectl.extract's constants as literals: importing it here would load torch for `vsectl --help`.
@app.command("extract")
def extract_cli(
    backbone: Annotated[str, typer.Option(help="efficientnet-lite0|1|2, resnet, clip, vit, siglip, detector, wsl")],
    out: Annotated[Path, typer.Option(help="Output folder (gets <split>.h5) or one .h5 file for one split")],
    data: Annotated[Path | None, typer.Option(help="Raw dataset folder (dataset.json + manifest.json)")] = None,
    shards: Annotated[str | None, typer.Option(help="Webdataset tar shards instead: a folder, a glob or "
                                                    "'shards/{00000..00099}.tar' (one store, labelled --split)")]
    = None,
    split: Annotated[str, typer.Option(help="train | dev (alias val) | test | all")] = "train",
    weights: Annotated[str | None, typer.Option(help="Weights file, model folder or cached hub id")] = None,
    size: Annotated[int | None, typer.Option(help="Square input side in pixels [default: the backbone's]")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass")] = 32,
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes")] = 2,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (| fp16 on CUDA)")] = "fp32",
    channels_last: Annotated[bool, typer.Option(help="NHWC memory layout for the convolutions")] = True,
    engine: Annotated[str, typer.Option(help="auto (the fastest measured here whose features agree with eager) | "
                                             "eager | onnx | compile")] = "auto",
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="Stored feature dtype: float16 | float32")] = "float16",
    shard_size: Annotated[int, typer.Option(help="Images per resumable shard")] = 512,
    limit: Annotated[int | None, typer.Option(help="Only the first N images of each split")] = None,
    video: Annotated[bool, typer.Option("--video", help="Each entry is a folder of frame images (one video)")] = False,
    frame_stride: Annotated[int, typer.Option(help="--video: keep every Nth frame image")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="--video: at most N frames, spread uniformly")] = None,
    frame_pool: Annotated[str, typer.Option(help="--video/--videos: mean | max pools each frame to one vector; none "
                                                 "keeps every token")] = "mean",
    videos: Annotated[bool, typer.Option("--videos", help="Each entry is a video file (.mp4, .webm, ...)")] = False,
    frames: Annotated[int | None, typer.Option(help="--videos: N frames per video, spread uniformly")] = None,
    fps: Annotated[float | None, typer.Option(help="--videos: R frames per second of video")] = None,
) -> None:
    """Extract image feature sets with a frozen backbone; prints each finished .h5 path. Resumes a killed run."""
    from vsectl.extract import extract

    sampling = video_sampling(video, videos, frame_stride, max_frames, frame_pool, frames, fps)
    try:
        paths = run_guarded(
            extract, backbone, data, out, split, shards=shards, weights=weights, size=size, batch_size=batch_size,
            workers=workers, precision=precision, channels_last=channels_last, device=device, dtype=dtype,
            shard_size=shard_size, limit=limit, progress=RichProgress(enabled=not STATE.get("quiet")), video=sampling,
            engine=engine,
        )
    except KeyboardInterrupt:
        interrupted(interrupted_extract_line(out))
    for path in paths:
        typer.echo(str(path))


def video_sampling(video: bool, videos: bool, frame_stride: int, max_frames: int | None, frame_pool: str,
                   frames: int | None, fps: float | None) -> object:
    """The sampling the video options ask for (None for images); a contradiction is one line."""
    from vsectl.extract import VideoFileSampling, VideoSampling

    if video and videos:
        fail("give --video (folders of frame images) or --videos (video files), not both")
    if (frames is not None or fps is not None) and not videos:
        fail("--frames and --fps sample video files: add --videos")
    if videos:
        return run_guarded(VideoFileSampling, frames, fps, max_frames, frame_pool)
    return run_guarded(VideoSampling, frame_stride, max_frames, frame_pool) if video else None


def interrupted_extract_line(out: Path) -> str:
    """What a Ctrl-C kept of an extraction (finished stores and shards) and how to resume it."""
    folder = out.parent if out.suffix == ".h5" else out
    stores = sorted(p.name for p in folder.glob("*.h5")) if folder.is_dir() else []
    shards = sorted(folder.glob("*.shards/shard-*.h5")) if folder.is_dir() else []
    per_split: dict[str, int] = {}
    for shard in shards:  # each split's own folder, by name: "3 in data/feats/train.shards"
        per_split[str(shard.parent)] = per_split.get(str(shard.parent), 0) + 1
    kept = [f"{len(shards)} finished shard(s) (" + ", ".join(f"{n} in {where}" for where, n in per_split.items())
            + ")"] if shards else []
    kept += [f"finished stores {', '.join(stores)}"] if stores else []
    return (f"kept {' and '.join(kept) if kept else 'nothing finished yet'}; run the same command again to resume "
            "(finished shards are not redone)")
