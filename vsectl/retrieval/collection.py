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
from vsectl.io import atomic_path, atomic_write_json
from vsectl.retrieval.embeddings import (
    EMBEDDINGS_FORMAT,
    EMBEDDINGS_VERSION,
    META,
    JsonLinesWriter,
    NpyAppender,
    open_embeddings,
)
from vsectl.retrieval.sources import Source, resolve_source
from vsectl.runtime import NullProgress, Progress

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 4096  # items per shard: at most this much work is lost to a kill (a multiple of the batch sizes)
MAX_SKIPPED_RECORDS = 100  # skipped images listed in meta.json; all are counted
SOURCES = ("images", "data", "features")
SHARDS = "shards"
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------------ shards


def _shard_name(side: str, s: int) -> str:
    return f"{side}-{s:05d}"


def _write_shard(folder: Path, name: str, rows: np.ndarray, info: dict[str, Any]) -> None:
    if not np.isfinite(rows).all():
        raise DataError(f"the model produced NaN or inf embeddings in shard {name}; check the run's checkpoint")
    with atomic_path(folder / f"{name}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows, dtype=np.float32))
    atomic_write_json(folder / f"{name}.json", info)  # written last: marks the shard done


def _done(folder: Path, name: str) -> bool:
    return (folder / f"{name}.json").is_file() and (folder / f"{name}.npy").is_file()


class _Rate:
    """images/s over the work done in this process."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.start, self.done = progress, time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.done += n
        self.progress.update(images_per_s=self.done / max(time.perf_counter() - self.start, 1e-9))


def _feature_shards(model: Any, source: Source, shards: Sequence[int], size: int, folder: Path, batch_size: int,
                    progress: Progress) -> None:
    from vsectl.data.features import H5Features

    features = H5Features(source.store)
    n = len(source.items)
    total = sum(min((s + 1) * size, n) - s * size for s in shards)
    rate = _Rate(progress)
    positions = iter(progress.track(range(total), total=total, description="embed images"))
    for s in shards:
        a, b = s * size, min((s + 1) * size, n)
        out = []
        for c in range(a, b, batch_size):
            sets = [features.get(i) for i in range(c, min(c + batch_size, b))]
            out.append(model.encode_feature_sets(sets, batch_size=batch_size))
            for _ in sets:
                next(positions)
            rate.add(len(sets))
        _write_shard(folder, _shard_name("images", s), np.concatenate(out), {"ok": list(range(a, b)), "skipped": []})
    features.close()


def _image_shards(model: Any, source: Source, shards: Sequence[int], size: int, folder: Path, batch_size: int,
                  workers: int, progress: Progress) -> None:
    from vsectl.extract import make_batches
    from vsectl.retrieval.model import BACKBONE_BATCH

    n = len(source.items)
    paths: list[Path] = []
    batches: list[list[int]] = []
    for s in shards:
        start = len(paths)
        paths.extend(Path(source.items[i]["path"]) for i in range(s * size, min((s + 1) * size, n)))
        batches.extend(make_batches(start, len(paths), BACKBONE_BATCH))
    stream = iter(progress.track(model.image_features(paths, workers=workers, batches=batches, progress=progress),
                                 total=len(paths), description="embed images"))
    try:
        for s in shards:
            a, b = s * size, min((s + 1) * size, n)
            ok, skipped, out, pending = [], [], [], []
            for pos in range(a, b):
                _, feats, reason = next(stream)
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
            _write_shard(folder, _shard_name("images", s), rows, {"ok": ok, "skipped": skipped})
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
        _write_shard(folder, _shard_name("captions", s), np.concatenate(out), {"captions": b - a})


# ------------------------------------------------------------------------------------------------ merge


def _merge(partial: Path, source: Source, n_img_shards: int, n_cap_shards: int, dim: int,
           meta: dict[str, Any]) -> dict[str, Any]:
    shards = partial / SHARDS
    infos = [json.loads((shards / f"{_shard_name('images', s)}.json").read_text()) for s in range(n_img_shards)]
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
        images.append(np.load(shards / f"{_shard_name('images', s)}.npy", mmap_mode="r"))
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
        rows = np.load(shards / f"{_shard_name('captions', s)}.npy", mmap_mode="r")
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


def _check_store(model: Any, source: Source) -> None:
    feat_dim, recipe = source.extra["feat_dim"], source.extra["recipe"]
    if model.end_to_end:
        raise ConfigError(f"run {model.run_dir} trains its own image backbone, so stored features do not fit it; "
                          "embed the images with --images DIR or --data RAW")
    if feat_dim != model.feat_dim:
        raise ConfigError(f"{source.path} holds {feat_dim}-d features but run {model.run_dir} takes "
                          f"{model.feat_dim}-d; embed features made with the run's backbone")
    if recipe is not None and model.recipe is not None and (diff := recipe.differences(model.recipe)):
        raise ConfigError(f"{source.path} was extracted with another feature recipe than run {model.run_dir} was "
                          f"trained on (differs in {', '.join(diff)}); extract it with the run's recipe "
                          f"({model.recipe.backbone}, {model.recipe.input_size} px)")


def _prepare_partial(partial: Path, settings: dict[str, Any]) -> Path:
    manifest = partial / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text(encoding="utf-8")).get("settings")
        if old != settings:
            log.warning("removing unfinished shards in %s made with other settings", partial)
            shutil.rmtree(partial)
    (partial / SHARDS).mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        atomic_write_json(manifest, {"settings": settings})
    return partial / SHARDS


def embed(
    run: str | Path | Any,
    out: str | Path,
    *,
    images: str | Path | None = None,
    data: str | Path | None = None,
    features: str | Path | None = None,
    split: str = "all",
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 2,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
) -> Path:
    """Embed every image (and caption) of a collection with a trained run into an embeddings folder.

    Exactly one of `images`, `data`, `features`. From files (`images`, `data`) the run's feature recipe is replayed
    (see `vsectl.retrieval.recipe`); unreadable images are skipped and counted in meta.json.

    Args:
        run: a run directory or checkpoint folder, or a loaded `RetrievalModel`.
        out: the embeddings folder to write (work in progress lives in `OUT.partial`).
        images: a plain folder of images (searched recursively; no captions).
        data: a raw dataset folder (made by `vsectl data prepare`): images and their captions.
        features: a feature store file (made by `vsectl extract`), e.g. data/demo_feats/test.h5.
        split: for `data`: "all" or one split.
        checkpoint: "best" or "last".
        device: where the towers (and the backbone) run.
        batch_size: sets / captions per forward pass of the towers.
        workers: image-decoding processes (files only).
        shard_size: items per resumable shard.
        progress: progress reporting (images/s).

    Returns:
        `out`, complete.
    """
    from vsectl.retrieval.model import RetrievalModel, load

    progress = progress or NullProgress()
    for name, value, low in (("batch size", batch_size, 1), ("workers", workers, 0), ("shard size", shard_size, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    out = Path(out)
    source = resolve_source(images, data, features, split)
    model = run if isinstance(run, RetrievalModel) else load(run, checkpoint=checkpoint, device=device)
    if source.kind == "features":
        _check_store(model, source)
    else:
        model.check_images()  # fails now, in one line, when the recipe cannot be replayed
    backbone = source.backbone if source.kind == "features" else model.provenance()
    settings = {"fingerprint": model.fingerprint, "source": {"kind": source.kind, "path": str(source.path),
                **source.identity}, "shard_size": shard_size, "batch_size": batch_size, "backbone": backbone}
    if (out / META).is_file():
        done = open_embeddings(out)
        if done.meta.get("settings") == settings:
            log.info("%s is already embedded with these settings", out)
            return out
        raise ConfigError(f"{out} already holds other embeddings (run {done.meta.get('run')}, source "
                          f"{done.meta['source'].get('path')}); choose another --out or delete it")
    if out.exists():
        raise ConfigError(f"{out} exists and is not an embeddings folder; choose another --out")
    partial = out.with_name(out.name + ".partial")
    shards = _prepare_partial(partial, settings)
    n, c = len(source.items), len(source.captions)
    n_img, n_cap = math.ceil(n / shard_size), math.ceil(c / shard_size)
    todo = [s for s in range(n_img) if not _done(shards, _shard_name("images", s))]
    cap_todo = [s for s in range(n_cap) if not _done(shards, _shard_name("captions", s))]
    log.info("embedding %d images and %d captions from %s: %d + %d of %d + %d shards to do", n, c, source.path,
             len(todo), len(cap_todo), n_img, n_cap)
    start = time.perf_counter()
    if todo and source.kind == "features":
        _feature_shards(model, source, todo, shard_size, shards, batch_size, progress)
    elif todo:
        _image_shards(model, source, todo, shard_size, shards, batch_size, workers, progress)
    if cap_todo:
        _caption_shards(model, source, cap_todo, shard_size, shards, batch_size, progress)
    seconds = time.perf_counter() - start
    if todo:
        log.info("embedded %d images in %.1f s", n, seconds)
    meta = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "run": str(model.run_dir),
            "checkpoint": model.checkpoint, "fingerprint": model.fingerprint, "embed_dim": model.embed_dim,
            "source": {"kind": source.kind, "path": str(source.path), "split": source.split}, "backbone": backbone,
            "settings": settings}
    try:
        meta = _merge(partial, source, n_img, n_cap, model.embed_dim, meta)
    except DataError:
        shutil.rmtree(partial)  # no readable image at all: nothing worth resuming
        raise
    shutil.rmtree(shards)
    (partial / MANIFEST).unlink()
    (partial / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")  # plain write: umask applies
    os.replace(partial, out)  # the folder appears complete or not at all
    if meta["n_skipped"]:
        log.warning("skipped %d unreadable images (meta.json: n_skipped, skipped), first: %s", meta["n_skipped"],
                    meta["skipped"][0]["reason"])
    log.info("wrote %s: %d images, %d captions, %d-d", out, meta["n_images"], meta["n_captions"], model.embed_dim)
    return out
