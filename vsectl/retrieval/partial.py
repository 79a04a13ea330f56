"""The `.partial` folder of an unfinished `embed`: its manifest (the settings its shards were made with), what may lie
in it, its shard files (a .npy, then the .json that marks it done), and the wait of a torchrun job's ranks for each
other's files."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import ConfigError, DataError
from vsectl.io import atomic_path, atomic_write_json
from vsectl.retrieval.embeddings import META

log = logging.getLogger(__name__)

SHARDS = "shards"
MANIFEST = "manifest.json"
POLL_SECONDS = 1.0  # how often rank 0 looks for the other ranks' shards
PARTIAL_FORMAT = "vsectl-embed-partial"
SHARD_FILE = re.compile(r"\.?((images|captions)-\d{5}|tar-\d{5}(-captions)?)\.(npy|json)(\.\w+\.tmp)?")
MERGED = {"images.npy", "captions.npy", "cap2img.npy", "images.jsonl", "captions.jsonl", "images.offsets.npy",
          "captions.offsets.npy", META}  # files a merge killed half-way leaves beside the shards


def partial_settings(partial: Path) -> dict[str, Any] | None:
    """The settings of an unfinished embed in `partial`, or None for a new one; refuses a folder that is not one."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{partial} is not an unfinished embed of vsectl's ({why}); nothing in it was touched: "
                           f"move it away or choose another --out")

    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise refuse("not a folder")
    if not partial.exists() or not any(partial.iterdir()):
        return None
    try:
        manifest = json.loads((partial / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise refuse(f"no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise refuse(f"{MANIFEST} is not readable JSON: {str(e)[:80]}") from None
    legacy = isinstance(manifest, dict) and set(manifest) == {"settings"}  # written before the format key
    if not isinstance(manifest, dict) or not (legacy or manifest.get("format") == PARTIAL_FORMAT) \
            or not isinstance(manifest.get("settings"), dict):
        raise refuse(f"its {MANIFEST} is another program's")
    foreign = sorted(p.name for p in partial.iterdir() if p.name not in MERGED | {MANIFEST, SHARDS})
    shards = partial / SHARDS
    if shards.is_symlink() or (shards.exists() and not shards.is_dir()):
        foreign.append(SHARDS)
    elif shards.is_dir():
        foreign += [f"{SHARDS}/{p.name}" for p in sorted(shards.iterdir()) if not SHARD_FILE.fullmatch(p.name)]
    if foreign:
        raise refuse(f"it also holds {', '.join(foreign[:5])}")
    return manifest["settings"]


def prepare_partial(partial: Path, settings: dict[str, Any], rank: int = 0) -> Path:
    """The shard folder of `partial`: kept when its settings are these, emptied of vsectl's own files otherwise
    (rank 0 decides; the other ranks of a torchrun job wait for its manifest)."""
    if rank != 0:
        wait_for([partial / MANIFEST])
        if partial_settings(partial) != settings:
            raise ConfigError(f"{partial} holds shards made with other settings; delete it first")
        return partial / SHARDS
    old = partial_settings(partial)
    if old is not None and old != settings:
        log.warning("removing unfinished shards in %s made with other settings", partial)
        shards = partial / SHARDS
        for f in shards.iterdir() if shards.is_dir() else ():
            f.unlink()
        for name in MERGED | {MANIFEST}:
            (partial / name).unlink(missing_ok=True)
    (partial / SHARDS).mkdir(parents=True, exist_ok=True)
    if old != settings:
        atomic_write_json(partial / MANIFEST, {"format": PARTIAL_FORMAT, "version": 1, "settings": settings})
    return partial / SHARDS


def wait_for(files: list[Path]) -> None:
    """Rank 0 waits for the other ranks' shards (and they for its manifest)."""
    last = time.monotonic()
    while missing := [p for p in files if not p.is_file()]:
        if time.monotonic() - last > 60:
            log.info("waiting for %d shards from other ranks, e.g. %s", len(missing), missing[0].name)
            last = time.monotonic()
        time.sleep(POLL_SECONDS)


def part_name(side: str, s: int) -> str:
    return f"{side}-{s:05d}"


def write_shard(folder: Path, name: str, rows: np.ndarray, info: dict[str, Any]) -> None:
    if not np.isfinite(rows).all():
        raise DataError(f"the model produced NaN or inf embeddings in shard {name}; check the run's checkpoint")
    with atomic_path(folder / f"{name}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows, dtype=np.float32))
    atomic_write_json(folder / f"{name}.json", info)  # written last: marks the shard done


def shard_done(folder: Path, name: str) -> bool:
    return (folder / f"{name}.json").is_file() and (folder / f"{name}.npy").is_file()
