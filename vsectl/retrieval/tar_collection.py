"""`embed --shards`: webdataset tar shards → an embeddings folder, one result per tar shard, merged by streaming.

Each tar shard s becomes `tar-NNNNN.npy` (its readable images' embeddings), `tar-NNNNN-captions.npy` (their
captions') and `tar-NNNNN.json` (keys, captions, where each image lies in its tar, skipped samples), the .json
written last to mark the shard done. Nothing of the collection is listed up front: a shard's samples are known when
it is read. Under torchrun, rank r reads the shards s with s % WORLD_SIZE == r; within a process the DataLoader
workers share them (`vsectl.data.tar_shards.ShardStream`).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.data.tar_images import decode_sample
from vsectl.data.tar_shards import ShardStream, estimate_samples, stream_batches
from vsectl.errors import DataError
from vsectl.retrieval.embeddings import JsonLinesWriter, NpyAppender
from vsectl.retrieval.partial import write_shard
from vsectl.retrieval.sources import Source

log = logging.getLogger(__name__)

MAX_SKIPPED_RECORDS = 100


def shard_name(s: int) -> str:
    return f"tar-{s:05d}"


class _Pending:
    """One shard's results while its batches arrive."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.records: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []


def _finish(model: Any, path: Path, folder: Path, s: int, pending: _Pending, batch_size: int) -> None:
    dim = model.embed_dim
    images = np.concatenate(pending.rows) if pending.rows else np.zeros((0, dim), np.float32)
    texts = [r["caption"] for r in pending.records if r["caption"]]
    captions = model.encode_text(texts, batch_size=batch_size) if texts else np.zeros((0, dim), np.float32)
    name = shard_name(s)
    write_shard(folder, f"{name}-captions", captions, {"captions": len(texts)})
    write_shard(folder, name, images, {"tar": str(path), "records": pending.records, "skipped": pending.skipped})


def embed_tar_shards(model: Any, source: Source, todo: list[int], folder: Path, batch_size: int, workers: int,
                     progress: Any) -> None:
    """Embed the given tar shards (positions in `source.extra["shards"]`), writing one result per shard."""
    shards: list[Path] = source.extra["shards"]
    decode = functools.partial(decode_sample, size=model.image_size)
    stream = ShardStream(shards, todo, decode, batch_size)
    expected = estimate_samples(shards, todo)
    pending: dict[int, _Pending] = {}
    done = 0
    batches = stream_batches(stream, workers)
    for batch in progress.track(batches, total=None, description="embed shards"):
        p = pending.setdefault(batch.shard, _Pending())
        good = [(x, item) for x, (item, _) in zip(batch.samples, batch.items, strict=True) if item is not None]
        for x, (item, reason) in zip(batch.samples, batch.items, strict=True):
            if item is None:
                p.skipped.append({"key": x.key, "reason": reason})
        if good:
            import torch

            items = model.pixel_items(torch.stack([item for _, item in good]), n_images=expected)  # the backbone
            p.rows.append(model.encode_items(items, batch_size=batch_size))
            p.records += [{"id": x.key, "caption": x.caption, "member": [x.image_name, x.offset, x.size]}
                          for x, _ in good]
        done += len(batch.samples)
        progress.update(images=done)
        if batch.last:
            _finish(model, shards[batch.shard], folder, batch.shard, pending.pop(batch.shard), batch_size)


def merge_tar(partial: Path, n_shards: int, dim: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Stream every shard's results into the embeddings layout; returns meta.json's content."""
    shards = partial / "shards"
    infos = [json.loads((shards / f"{shard_name(s)}.json").read_text(encoding="utf-8")) for s in range(n_shards)]
    n = sum(len(info["records"]) for info in infos)
    skipped = [r for info in infos for r in info["skipped"]]
    if n == 0:
        raise DataError(f"none of the samples in the {n_shards} tar shards has a readable image "
                        f"(first: {skipped[0]['reason'] if skipped else 'the shards are empty'})")
    n_caps = sum(1 for info in infos for r in info["records"] if r["caption"])
    images, records = NpyAppender(partial / "images.npy", (n, dim)), JsonLinesWriter(partial / "images.jsonl")
    captions = NpyAppender(partial / "captions.npy", (n_caps, dim))
    cap2img = NpyAppender(partial / "cap2img.npy", (n_caps,), dtype=np.int64)
    texts = JsonLinesWriter(partial / "captions.jsonl")
    row = 0
    for s, info in enumerate(infos):
        images.append(np.load(shards / f"{shard_name(s)}.npy", mmap_mode="r"))
        captions.append(np.load(shards / f"{shard_name(s)}-captions.npy", mmap_mode="r"))
        owners = []
        for r in info["records"]:
            name, offset, size = r["member"]
            records.write({"id": r["id"], "path": None, "caption": r["caption"],
                           "tar": {"file": info["tar"], "member": name, "offset": offset, "size": size}})
            if r["caption"]:
                texts.write({"text": r["caption"], "image": row})
                owners.append(row)
            row += 1
        cap2img.append(np.asarray(owners, dtype=np.int64))
    images_sha, captions_sha = images.close(), captions.close()
    cap2img.close()
    records.close()
    texts.close()
    return {**meta, "n_images": n, "n_captions": n_caps, "n_skipped": len(skipped),
            "skipped": skipped[:MAX_SKIPPED_RECORDS], "images_sha256": images_sha, "captions_sha256": captions_sha}
