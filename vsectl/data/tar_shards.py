"""Webdataset tar shards (img2dataset's output: `key.jpg` + `key.txt` + `key.json` per sample), read two ways.

- Streamed (`ShardStream`, for `extract` and `embed`): an iterable dataset that gives each (torchrun rank, DataLoader
  worker) slot whole shards, shard s to slot s mod (ranks × workers), so no sample is read twice and a slot without a
  shard simply ends (no error, no hang). Batches never cross a shard and the last batch of a shard says so, so the
  caller writes one result per shard and a killed run resumes at the first shard without one.
- Random access (`TarImages`, for training): each shard's member offsets are read once from its headers (cached in
  memory), so the trainer's seeded sampler, per-image augmentation and DDP's equal batch counts apply unchanged.

A sample is the members sharing a key (the member name up to the first dot of its base name, as webdataset groups
them); its image is the first member with an image suffix, its caption the `.txt` member (or the json's "caption").
Patterns: a folder (every *.tar in it, sorted), a glob, or brace ranges as in `shards/{00000..00999}.tar`.

Why not the `webdataset` package (1.0.2): it refuses a DataLoader worker without a shard ("No samples found in
dataset; perhaps you have fewer shards than workers"), reads ranks from an initialised process group that `embed`
and `extract` do not start, and has no notion of a finished shard to resume from; reading is the standard library's
tarfile either way (benchmarks/bench_shards.py compares the read rates).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from vsectl.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
TEXT_EXTS = ("txt", "caption", "text")
BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` → a00bx a00by a01bx ...; a numeric range keeps the zero padding of its first bound."""
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if (r := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"the range {{{body}}} in {pattern!r} runs backwards")
        width = len(r.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [x for option in options for x in expand_braces(head + option + tail)]


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Tar shard files from a folder, a glob, a brace pattern or a list of these; every one must exist.

    Raises:
        DataError: nothing matches, or named shards are missing.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: list[Path] = []
    missing: list[str] = []
    for s in specs:
        s = str(s)
        if Path(s).is_dir():
            found.extend(sorted(Path(s).glob("*.tar")))
            continue
        for name in expand_braces(s):
            if glob.has_magic(name):
                hits = sorted(glob.glob(name))  # a glob that matches nothing adds nothing
            elif Path(name).is_file():
                hits = [name]
            else:
                hits, missing = [], [*missing, name]
            found.extend(Path(h) for h in hits)
    if missing:
        raise DataError(f"{len(missing)} tar shard(s) of {specs[0]} do not exist, first: {missing[0]}")
    if not found:
        raise DataError(f"no tar shards found at {specs[0]}; give a folder of .tar files or a pattern such as "
                        "shards/{00000..00099}.tar")
    return [p.resolve() for p in found]


def split_key(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' → ('dir/000123', 'jpg'); the extension is everything after the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class Sample:
    """One sample of a shard: its key, position, image bytes (and where they lie in the tar) and caption."""

    key: str
    position: int
    image: bytes | None
    image_name: str | None
    offset: int = -1  # byte offset of the image's data in the tar (for reading it again later)
    size: int = 0
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _caption(fields: dict[str, bytes]) -> str | None:
    for ext in TEXT_EXTS:
        if ext in fields:
            text = fields[ext].decode("utf-8", errors="replace").strip()
            return text or None
    if "json" in fields:
        try:
            value = json.loads(fields["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return value.strip() or None if isinstance(value, str) else None
    return None


def _sample(key: str, position: int, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Sample:
    fields = {split_key(info.name)[1]: data for info, data in members if data is not None}
    image = next(((info, data) for info, data in members if split_key(info.name)[1] in IMAGE_EXTS), None)
    return Sample(key=key, position=position, image=image[1] if image else None,
                  image_name=image[0].name if image else None, offset=image[0].offset_data if image else -1,
                  size=image[0].size if image else 0, caption=_caption(fields))


def _check_end(tar: tarfile.TarFile) -> None:
    """After the last member only zero blocks may follow; tarfile stops quietly at a header cut short."""
    f = tar.fileobj
    f.seek(tar.offset)
    if f.read(1 << 16).strip(b"\0"):
        raise tarfile.ReadError("the file ends inside a member's header")


def read_shard(path: Path, images: bool = True) -> Iterator[Sample]:
    """The samples of one shard in file order (consecutive members with the same key form a sample).

    With `images=False` image members are not read (their offset and size are still given): an index of the shard.

    Raises:
        DataError: the file is not a readable tar (a truncated shard fails at the point it ends).
    """
    key, members, position = None, [], 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key and members:
                    yield _sample(key, position, members)
                    position += 1
                    members = []
                key = k
                if not images and ext in IMAGE_EXTS:
                    members.append((info, None))
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"{info.name} is cut short")
                members.append((info, data))
            _check_end(tar)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"tar shard {path} cannot be read ({e}); re-create or re-copy it") from None
    if members:
        yield _sample(key, position, members)


def estimate_samples(shards: Sequence[Path], todo: Sequence[int]) -> int:
    """About how many samples the shards `todo` hold: the first one's count (read from its headers only) times
    their number. Enough to decide whether a one-off cost, such as timing extraction engines, pays."""
    if not todo:
        return 0
    return len(todo) * sum(1 for _ in read_shard(shards[todo[0]], images=False))


def slot_shards(n_shards: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
    """The shards of one (rank, worker) slot: shard s goes to slot s mod (world · workers); workers=0 means one."""
    slots = world * max(1, workers)
    slot = rank * max(1, workers) + worker
    return list(range(slot, n_shards, slots))


@dataclass
class ShardBatch:
    """A batch of one shard's samples, decoded: `last` marks the shard's final batch (an empty shard sends one)."""

    shard: int
    samples: list[Sample]
    items: list[Any]
    last: bool


class ShardStream(IterableDataset):
    """An iterable dataset over tar shards, for `torch.utils.data.DataLoader(stream, batch_size=None, ...)`.

    Args:
        shards: every shard of the collection (positions in this list name them).
        todo: the shard positions this process still has to read (its rank's share, less finished ones).
        decode: sample → item, run in the worker (e.g. the image decoded and resized); its result is batched.
        batch_size: samples per batch.
    """

    def __init__(self, shards: Sequence[Path], todo: Sequence[int], decode: Callable[[Sample], Any],
                 batch_size: int) -> None:
        super().__init__()
        self.shards, self.todo, self.decode, self.batch_size = list(shards), list(todo), decode, batch_size

    def worker_shards(self) -> list[int]:
        """This DataLoader worker's part of `todo` (all of it in the main process)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            return self.todo
        return [self.todo[j] for j in slot_shards(len(self.todo), 0, 1, info.id, info.num_workers)]

    def __iter__(self) -> Iterator[ShardBatch]:
        for s in self.worker_shards():
            batch: list[Sample] = []
            for sample in read_shard(self.shards[s]):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield ShardBatch(s, batch, [self.decode(x) for x in batch], False)
                    batch = []
            yield ShardBatch(s, batch, [self.decode(x) for x in batch], True)


def _as_is(batch: ShardBatch) -> ShardBatch:
    return batch


def stream_batches(stream: ShardStream, workers: int) -> Iterator[ShardBatch]:
    """The stream's batches through a DataLoader with `workers` processes (0: in this process)."""
    from torch.utils.data import DataLoader

    workers = min(workers, len(stream.todo))  # a worker without a shard would only cost its start-up
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is)
    yield from loader


# ------------------------------------------------------------------------------------------------ random access


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a tar: one member's data."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise DataError(f"{path} is shorter than its index says; re-create the shard")
    return data


def image_file(data: bytes) -> io.BytesIO:
    """A file object over a member's bytes, for PIL."""
    return io.BytesIO(data)


def write_tar_shards(samples: Iterator[tuple[str, dict[str, bytes]]] | Sequence[tuple[str, dict[str, bytes]]],
                     folder: str | Path, per_shard: int, prefix: str = "") -> list[Path]:
    """Write samples (key, {extension: bytes}) as webdataset shards `folder/<prefix>NNNNN.tar`, `per_shard` each.

    Each shard is written to a temporary name and renamed when complete.
    """
    import os

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tar, count, tmp = None, 0, None
    for key, fields in samples:
        if tar is None:
            path = folder / f"{prefix}{len(written):05d}.tar"
            tmp = path.with_name(f".{path.name}.tmp")
            tar, count = tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT), 0
            written.append(path)
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        count += 1
        if count == per_shard:
            tar.close()
            os.replace(tmp, written[-1])
            tar = None
    if tar is not None:
        tar.close()
        os.replace(tmp, written[-1])
    return written
