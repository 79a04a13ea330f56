"""Feature extraction: raw images → frozen backbone → feature sets in the HDF5 store (sharded, resumable, torchrun).

One role per file: `images.py` the backbone loop over image files, `engines.py` how the backbone runs (torch,
onnxruntime, torch.compile; the measured choice), `video.py` frame sampling and pooling, `video_files.py` decoded video
files through the backbone,
`shards.py` the atomic shards and their merge, `provenance.py` the attrs and reuse fingerprint, `pipeline.py` the
split and command level. Everything public is importable from `vsectl.extract`.
"""

from vsectl.extract.engines import ENGINE_CHOICES, ENGINES, TOLERANCE, Choice, choose_engine
from vsectl.extract.images import DEFAULT_CHANNELS_LAST, extract_images, make_batches
from vsectl.extract.pipeline import (
    DEFAULT_DTYPE,
    DEFAULT_SHARD_SIZE,
    SPLITS,
    DistInfo,
    dist_info,
    extract,
    extract_split,
    output_paths,
)
from vsectl.extract.provenance import FINGERPRINT_KEYS, RESIZE, split_provenance
from vsectl.extract.shards import (
    MAX_SKIPPED_RECORDS,
    MERGE_BLOCK_IMAGES,
    POLL_SECONDS,
    merge_shards,
    shard_dir_for,
    shard_path,
    write_shards,
)
from vsectl.extract.video import FRAME_POOLS, FRAME_SUFFIXES, VideoSampling, list_frames
from vsectl.extract.video_files import VideoFileSampling, extract_videos

__all__ = [
    "DEFAULT_CHANNELS_LAST", "DEFAULT_DTYPE", "DEFAULT_SHARD_SIZE", "ENGINES", "ENGINE_CHOICES", "FINGERPRINT_KEYS",
    "FRAME_POOLS", "FRAME_SUFFIXES", "MAX_SKIPPED_RECORDS", "MERGE_BLOCK_IMAGES", "POLL_SECONDS", "RESIZE", "SPLITS",
    "TOLERANCE", "Choice", "DistInfo", "VideoFileSampling", "VideoSampling", "choose_engine", "dist_info", "extract",
    "extract_images", "extract_split", "extract_videos", "list_frames", "make_batches",
    "merge_shards", "output_paths", "shard_dir_for", "shard_path", "split_provenance", "write_shards",
]
