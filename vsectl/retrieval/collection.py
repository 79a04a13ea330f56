"""`embed`: a collection (image folder, raw dataset or feature store) → an embeddings folder; sharded and resumable.

Images are cut into shards of `shard_size` consecutive items and captions into shards of `shard_size` consecutive
captions. Each shard is written to `OUT.partial/shards/` as a .npy plus a .json written last (its presence marks the
shard done), so a killed run restarts at the first missing shard; batches never cross a shard boundary, so a resumed
run writes the same bytes as an uninterrupted one. When every shard exists they are merged, streaming, into the
layout of `vsectl.retrieval.embeddings`, and `OUT.partial` is renamed to `OUT`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.io import json_text
from vsectl.locks import folder_lock
from vsectl.retrieval.embeddings import (
    EMBEDDINGS_FORMAT,
    EMBEDDINGS_VERSION,
    META,
    JsonLinesWriter,
    NpyAppender,
    open_embeddings,
)
from vsectl.retrieval.partial import MANIFEST, SHARDS, part_name, prepare_partial, shard_done, wait_for, write_shard
from vsectl.retrieval.sources import Source, resolve_source
from vsectl.retrieval.stored import check_store, reusable_sets_of
from vsectl.runtime import NullProgress, Progress

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 4096  # items per shard: at most this much work is lost to a kill (a multiple of the batch sizes)
MAX_SKIPPED_RECORDS = 100  # skipped images listed in meta.json; all are counted
SOURCES = ("images", "videos", "data", "features")


# ------------------------------------------------------------------------------------------------ shards


class _Rate:
    """images/s over the work done in this process."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.start, self.done = progress, time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.done += n
        self.progress.update(images_per_s=self.done / max(time.perf_counter() - self.start, 1e-9))


def padded_block(rows: np.ndarray, lengths: np.ndarray, feat_dim: int) -> tuple[Any, Any]:
    """Consecutive sets' (R, D) rows (any float dtype) → (B, K_max, D) float32 zero-padded, and (B,) int64 sizes.

    Equal sizes (grid features) are one reshape of the converted rows, no padding copy; torch converts fp16 several
    times faster than numpy.
    """
    import torch

    rows = np.ascontiguousarray(rows) if rows.flags.writeable else np.array(rows)  # a memory map's rows are read-only
    x = torch.from_numpy(rows).float()                                               # (R, D)
    sizes = torch.from_numpy(lengths.astype(np.int64))                               # (B,)
    batch, widest = len(lengths), int(lengths.max())
    if int(lengths.min()) == widest:
        return x.view(batch, widest, feat_dim), sizes
    valid = torch.arange(widest)[None, :] < sizes[:, None]                           # (B, K_max)
    out = x.new_zeros(batch * widest, feat_dim)
    out.index_copy_(0, valid.reshape(-1).nonzero().squeeze(1), x)
    return out.view(batch, widest, feat_dim), sizes


def _feature_shards(model: Any, source: Source, shards: Sequence[int], size: int, folder: Path, batch_size: int,
                    progress: Progress) -> None:
    from vsectl.retrieval.stored import StoreSets

    features = source.extra["open"]() if "open" in source.extra else StoreSets(source.stores)
    n = len(source.items)
    total = sum(min((s + 1) * size, n) - s * size for s in shards)
    rate = _Rate(progress)
    positions = iter(progress.track(range(total), total=total, description="embed images"))
    for s in shards:
        a, b = s * size, min((s + 1) * size, n)
        out = []
        for c in range(a, b, batch_size):
            stop = min(c + batch_size, b)
            rows, lengths = features.block(c, stop)                                 # one read per batch
            out.append(model.encode_padded(*padded_block(rows, lengths, features.feat_dim)))
            for _ in range(stop - c):
                next(positions)
            rate.add(stop - c)
        write_shard(folder, part_name("images", s), np.concatenate(out), {"ok": list(range(a, b)), "skipped": []})
    getattr(features, "close", lambda: None)()


def _image_shards(model: Any, source: Source, shards: Sequence[int], size: int, folder: Path, batch_size: int,
                  workers: int, progress: Progress, stored: Any = None) -> None:
    """Image files through the run's backbone, except those whose sets `stored` (a `StoreSets`) already holds."""
    from vsectl.extract import make_batches
    from vsectl.retrieval.model import BACKBONE_BATCH

    n = len(source.items)
    stored = stored if stored is not None else ()
    paths: list[Path] = []
    batches: list[list[int]] = []
    for s in shards:
        start = len(paths)
        paths.extend(Path(source.items[i]["path"]) for i in range(s * size, min((s + 1) * size, n))
                     if i not in stored)
        batches.extend(make_batches(start, len(paths), BACKBONE_BATCH))
    stream = iter(model.image_features(paths, workers=workers, batches=batches, progress=progress)) if paths \
        else iter(())
    total = sum(min((s + 1) * size, n) - s * size for s in shards)
    positions = iter(progress.track(range(total), total=total, description="embed images"))  # stored ones too
    try:
        for s in shards:
            a, b = s * size, min((s + 1) * size, n)
            ok, skipped, out, pending = [], [], [], []
            for pos in range(a, b):
                _, feats, reason = (pos, stored.get(pos), "") if pos in stored else next(stream)
                next(positions)
                if feats is None:
                    log.debug("skipped %s: %s", source.items[pos]["id"], reason)
                    skipped.append({"position": pos, "id": source.items[pos]["id"], "reason": reason})
                else:
                    ok.append(pos)
                    pending.append(feats)
                if len(pending) == batch_size or (pos == b - 1 and pending):
                    out.append(model.encode_items(pending, batch_size=batch_size))
                    pending = []
            rows = np.concatenate(out) if out else np.zeros((0, model.embed_dim), dtype=np.float32)
            write_shard(folder, part_name("images", s), rows, {"ok": ok, "skipped": skipped})
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the DataLoader workers now, also when interrupted


def _caption_shards(model: Any, source: Source, shards: Sequence[int], size: int, folder: Path, batch_size: int,
                    progress: Progress) -> None:
    c = len(source.captions)
    total = sum(min((s + 1) * size, c) - s * size for s in shards)
    done = iter(progress.track(range(total), total=total, description="embed captions"))
    for s in shards:
        a, b = s * size, min((s + 1) * size, c)
        out = []
        for x in range(a, b, batch_size):
            texts = [t for t, _ in source.captions[x : min(x + batch_size, b)]]
            out.append(model.encode_text(texts, batch_size=batch_size))
            for _ in texts:
                next(done)
        write_shard(folder, part_name("captions", s), np.concatenate(out), {"captions": b - a})


# ------------------------------------------------------------------------------------------------ merge


def _merge(partial: Path, source: Source, n_img_shards: int, n_cap_shards: int, dim: int,
           meta: dict[str, Any]) -> dict[str, Any]:
    shards = partial / SHARDS
    infos = [json.loads((shards / f"{part_name('images', s)}.json").read_text()) for s in range(n_img_shards)]
    ok = [p for info in infos for p in info["ok"]]
    skipped = [r for info in infos for r in info["skipped"]]
    if not ok:
        raise DataError(f"none of the {len(source.items)} images in {source.path} could be read "
                        f"(first: {skipped[0]['reason'] if skipped else '?'})")
    final = np.full(len(source.items), -1, dtype=np.int64)
    final[ok] = np.arange(len(ok))
    first_caption: dict[int, str] = {}
    for text, pos in source.captions:
        first_caption.setdefault(pos, text)

    images = NpyAppender(partial / "images.npy", (len(ok), dim))
    records = JsonLinesWriter(partial / "images.jsonl")
    for s in range(n_img_shards):
        images.append(np.load(shards / f"{part_name('images', s)}.npy", mmap_mode="r"))
        for pos in infos[s]["ok"]:
            item = source.items[pos]
            records.write({"id": item["id"], "path": item["path"], "caption": first_caption.get(pos)})
    images_sha = images.close()
    records.close()

    keep = np.asarray([final[pos] >= 0 for _, pos in source.captions], dtype=bool)
    n_caps = int(keep.sum())
    captions = NpyAppender(partial / "captions.npy", (n_caps, dim))
    cap2img = NpyAppender(partial / "cap2img.npy", (n_caps,), dtype=np.int64)
    texts = JsonLinesWriter(partial / "captions.jsonl")
    size = meta["settings"]["shard_size"]
    for s in range(n_cap_shards):
        a = s * size
        rows = np.load(shards / f"{part_name('captions', s)}.npy", mmap_mode="r")
        mask = keep[a : a + rows.shape[0]]
        captions.append(rows[mask])
        idx = []
        for k in np.flatnonzero(mask).tolist():
            text, pos = source.captions[a + k]
            texts.write({"text": text, "image": int(final[pos])})
            idx.append(int(final[pos]))
        cap2img.append(np.asarray(idx, dtype=np.int64))
    captions_sha = captions.close()
    cap2img.close()
    texts.close()
    return {**meta, "n_images": len(ok), "n_captions": n_caps, "n_skipped": len(skipped),
            "skipped": skipped[:MAX_SKIPPED_RECORDS], "images_sha256": images_sha, "captions_sha256": captions_sha}


# ------------------------------------------------------------------------------------------------ the command


def embed(run: str | Path | Any, out: str | Path, **options: Any) -> Path | None:
    """Embed a collection into `out` (see `embed_unlocked` for the options), holding the folder's write lock: a second
    embed into the same folder (or its `.partial`) is refused with one line naming this one. Under torchrun, rank 0
    holds the lock for the whole job; the other ranks write only their own shards into its `.partial`."""
    if _dist().rank != 0:
        return embed_unlocked(run, out, **options)
    with folder_lock(Path(out)):
        return embed_unlocked(run, out, **options)


def _dist() -> Any:
    from vsectl.runtime import distributed_from_env

    try:
        return distributed_from_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _shard_counts(source: Source, size: int) -> tuple[int, int]:
    """Image and caption shards: one per tar shard (whose captions are embedded with it), else cut by `size`."""
    if source.kind == "shards":
        return len(source.extra["shards"]), 0
    return math.ceil(len(source.items) / size), math.ceil(len(source.captions) / size)


def _image_shard(source: Source, s: int) -> str:
    if source.kind == "shards":
        from vsectl.retrieval.tar_collection import shard_name

        return shard_name(s)
    return part_name("images", s)


def embed_unlocked(
    run: str | Path | Any,
    out: str | Path,
    *,
    images: str | Path | None = None,
    data: str | Path | None = None,
    features: str | Path | None = None,
    shards: str | Path | None = None,
    split: str = "all",
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 2,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
    videos: str | Path | None = None,
) -> Path | None:
    """Embed every image (and caption) of a collection with a trained run into an embeddings folder.

    Exactly one of `images`, `videos`, `data`, `features`, `shards`. From files (`images`, `videos`, `data`,
    `shards`) the run's feature recipe is replayed (see `vsectl.retrieval.recipe`); unreadable files are skipped and
    counted in meta.json. A raw dataset's images whose sets the run's own stores hold (extracted from this dataset
    with the run's recipe) are read from there instead (`vsectl.retrieval.stored`). Under torchrun, rank r embeds the
    shards s with s % WORLD_SIZE == r and rank 0 merges (other ranks return None).

    Args:
        run: a run directory or checkpoint folder, or a loaded `RetrievalModel`.
        out: the embeddings folder to write (work in progress lives in `OUT.partial`).
        images: a plain folder of images (searched recursively; no captions).
        data: a raw dataset folder (made by `vsectl data prepare`): images and their captions.
        features: a feature store file (made by `vsectl extract`), e.g. data/demo_feats/test.h5, a folder of them
            (each split in turn: train, dev, test), or a precomp `<split>_ims.npy` (with its `<split>_caps.txt`).
        shards: webdataset tar shards: a folder of .tar files, a glob or a brace pattern (`shards/{00000..00099}.tar`).
        split: for `data`: "all" or one split.
        checkpoint: "best" or "last".
        device: where the towers (and the backbone) run.
        batch_size: sets / captions per forward pass of the towers.
        workers: image-decoding processes (files only).
        shard_size: items per resumable shard.
        progress: progress reporting (images/s).
        videos: a plain folder of video files (searched recursively; no captions), for a run trained on features
            from video files (`extract --videos`): each video is sampled and pooled as those were.

    Returns:
        `out`, complete (None on torchrun ranks other than 0).
    """
    from vsectl.retrieval.model import RetrievalModel, load

    progress = progress or NullProgress()
    for name, value, low in (("batch size", batch_size, 1), ("workers", workers, 0), ("shard size", shard_size, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    out = Path(out)
    source = resolve_source(images, data, features, split, videos=videos, shards=shards)
    model = run if isinstance(run, RetrievalModel) else load(run, checkpoint=checkpoint, device=device)
    if source.kind == "features":
        check_store(model, source)
    else:
        model.check_images(videos=source.extra.get("videos", False))  # one line when the recipe cannot be replayed
    backbone = source.backbone if source.kind == "features" else model.provenance()
    settings = {"fingerprint": model.fingerprint, "source": {"kind": source.kind, "path": str(source.path),
                **source.identity}, "shard_size": shard_size, "batch_size": batch_size, "backbone": backbone}
    dist = _dist()
    if (out / META).is_file():
        done = open_embeddings(out)
        if done.meta.get("settings") == settings:
            log.info("%s is already embedded with these settings", out)
            return out if dist.rank == 0 else None
        raise ConfigError(f"{out} already holds other embeddings (run {done.meta.get('run')}, source "
                          f"{done.meta['source'].get('path')}); choose another --out or delete it")
    if out.exists():
        raise ConfigError(f"{out} exists and is not an embeddings folder; choose another --out")
    partial = out.with_name(out.name + ".partial")
    folder = prepare_partial(partial, settings, dist.rank)
    n_img, n_cap = _shard_counts(source, shard_size)
    todo = [s for s in range(dist.rank, n_img, dist.world_size) if not shard_done(folder, _image_shard(source, s))]
    cap_todo = [s for s in range(dist.rank, n_cap, dist.world_size) if not shard_done(folder, part_name("captions", s))]
    log.info("embedding %s: %d of %d image shard(s) and %d of %d caption shard(s) to do%s", source.path, len(todo),
             n_img, len(cap_todo), n_cap, f" on rank {dist.rank} of {dist.world_size}" if dist.world_size > 1 else "")
    start = time.perf_counter()
    if todo and source.kind == "shards":
        from vsectl.retrieval.tar_collection import embed_tar_shards

        embed_tar_shards(model, source, todo, folder, batch_size, workers, progress)
    elif todo and source.kind == "features":
        _feature_shards(model, source, todo, shard_size, folder, batch_size, progress)
    elif todo:
        stored = reusable_sets_of(model, source)
        try:
            _image_shards(model, source, todo, shard_size, folder, batch_size, workers, progress, stored)
        finally:
            if stored is not None:
                stored.close()
    if cap_todo:
        _caption_shards(model, source, cap_todo, shard_size, folder, batch_size, progress)
    if dist.rank != 0:
        return None
    wait_for([folder / f"{_image_shard(source, s)}.json" for s in range(n_img)]
              + [folder / f"{part_name('captions', s)}.json" for s in range(n_cap)])
    seconds = time.perf_counter() - start
    if todo:
        log.info("embedded %d image shard(s) in %.1f s", len(todo), seconds)
    meta = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "run": str(model.run_dir),
            "checkpoint": model.checkpoint, "fingerprint": model.fingerprint, "embed_dim": model.embed_dim,
            "source": {"kind": source.kind, "path": str(source.path), "split": source.split}, "backbone": backbone,
            "settings": settings, "image_root": str(source.root) if source.root is not None else None}
    try:
        if source.kind == "shards":
            from vsectl.retrieval.tar_collection import merge_tar

            meta = merge_tar(partial, n_img, model.embed_dim, meta)
        else:
            meta = _merge(partial, source, n_img, n_cap, model.embed_dim, meta)
    except DataError:
        shutil.rmtree(partial)  # no readable image at all: nothing worth resuming
        raise
    except OSError as e:  # a full disk: the shards stay for the rerun; say where it was writing
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(partial)) from None
        raise
    shutil.rmtree(folder)
    (partial / MANIFEST).unlink()
    (partial / META).write_text(json_text(meta, indent=1) + "\n", encoding="utf-8")  # plain write: umask applies
    os.replace(partial, out)  # the folder appears complete or not at all
    if meta["n_skipped"]:
        log.warning("skipped %d unreadable images (meta.json: n_skipped, skipped), first: %s", meta["n_skipped"],
                    meta["skipped"][0]["reason"])
    log.info("wrote %s: %d images, %d captions, %d-d", out, meta["n_images"], meta["n_captions"], model.embed_dim)
    return out
