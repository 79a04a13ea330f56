"""Token states of a frozen transformers text body, computed once per caption and cached in the HDF5 store format.

With `model.text.freeze_body` and `model.text.cache_states`, training reads each caption's (T, H) last hidden states
from `<run>/text_cache/<split>.h5` instead of running the body every step. Only the projection and the pooler train.
Size augmentation cannot edit tokens of a cached caption, so it drops token states instead: each state i.i.d. with
p = 0.2, keeping at least one (our choice, documented; the official word-level rule needs the body at every step).
Evaluation runs the frozen body on token ids, which gives the same states.

A sweep shares one cache per (text body, captions) across its cells and seeds: `shared_cache_path` names the file by
a digest of the body's weights, its tokenizer and the split's captions, so every cell that would compute the same
states finds them computed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vsectl.data.datasets import CaptionDataset, collate_tokens, drop_regions
from vsectl.data.features import H5Features
from vsectl.data.sources import Split
from vsectl.data.store import StoreWriter, read_store_attrs
from vsectl.runtime import Distributed, NullProgress, Progress

log = logging.getLogger(__name__)

STATE_DROP = 0.2  # token-state drop rate when size augmentation is on (mirrors the 20% of the text rule)


class CachedTextStates:
    """Per-caption token states read lazily from a cache file; `get(i, rng)` optionally drops states.

    Args:
        path: the cache file written by `build_state_cache`.
        augment: drop each state with p = 0.2 (training only).
    """

    pad_id = 0

    def __init__(self, path: Path, augment: bool) -> None:
        self.features = H5Features(path)
        self.augment = augment

    def get(self, i: int, rng: np.random.Generator | None) -> np.ndarray:
        """(T, H) float32 states of caption i."""
        states = self.features.get(i)
        if self.augment and rng is not None:
            states = drop_regions(states, STATE_DROP, rng)
        return states


def body_digest(body: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, values): equal digests mean equal token states."""
    return tensors_digest(body.state_dict())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, dtypes, shapes, values), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def shared_cache_path(folder: Path, identity: str, split: Split) -> Path:
    """`folder/<split>-<digest>.h5`, the digest over the body identity and the split's captions in order."""
    digest = hashlib.sha256(identity.encode())
    for caption in split.captions:
        digest.update(caption.encode("utf-8") + b"\0")
    return Path(folder) / f"{split.name}-{digest.hexdigest()[:16]}.h5"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed): parallel sweep cells build a shared cache once."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): cells may then build the same cache twice, with the same result
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@torch.no_grad()
def build_state_cache(
    text_encoder: torch.nn.Module,
    split: Split,
    processor: object,
    path: Path,
    device: torch.device,
    identity: str,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> Path:
    """Encode every caption of `split` with the frozen body and store its states; reuse a matching cache.

    Args:
        text_encoder: a `TransformerTextEncoder` (its `body` and `states` are used).
        split: captions to encode, in order.
        processor: an un-augmented text processor giving token ids.
        path: cache file.
        identity: a string naming the body weights and tokenizer; a cache with another identity is rebuilt.
    """
    path = Path(path)
    with _exclusive(path.with_name(path.name + ".lock")):
        return _build_state_cache(text_encoder, split, processor, path, device, identity, batch_size, progress)


def _build_state_cache(text_encoder: torch.nn.Module, split: Split, processor: object, path: Path,
                       device: torch.device, identity: str, batch_size: int, progress: Progress | None) -> Path:
    if path.is_file():
        attrs = read_store_attrs(path)
        if attrs.get("identity") == identity and int(attrs.get("n_captions", -1)) == split.n_captions:
            return path
        log.info("text cache %s is stale: rebuilding", path)
    progress = progress or NullProgress()
    loader = DataLoader(CaptionDataset(split, processor), batch_size=batch_size,
                        collate_fn=functools.partial(collate_tokens, pad_id=text_encoder.pad_id))
    was_training = text_encoder.training
    text_encoder.eval()
    attrs = {"identity": identity, "n_captions": split.n_captions, "split": split.name,
             "content": "last hidden states of a frozen text body, one set per caption"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with StoreWriter(path, text_encoder.body.config.hidden_size, dtype="float32", attrs=attrs) as writer:
        for batch in progress.track(loader, total=len(loader), description=f"cache text states ({split.name})"):
            tokens, lengths = batch["tokens"].to(device), batch["token_lengths"].to(device)
            hidden = text_encoder.states(tokens, lengths).float().cpu()       # (B, T, H)
            for b, i in enumerate(batch["index"].tolist()):
                writer.add_image(str(i), hidden[b, : int(lengths[b])].numpy())
    text_encoder.train(was_training)
    return path


def state_caches(tower: torch.nn.Module, text: Any, pretrained: str, batch_size: int, splits: dict[str, Split],
                 run_dir: Path, dev: torch.device, dist: Distributed, progress: Progress, shared: Path | None = None
                 ) -> dict[str, Path]:
    """Build (main rank) or wait for and reuse (other ranks) the frozen-body token-state caches.

    Args:
        tower: the text tower with the frozen `body`; text: its text side (tokenizer, processor); pretrained: the
            recipe's `model.text.pretrained`.

    With `shared`, the caches live there under names that digest the body and the captions, so the runs of a sweep
    compute them once; otherwise in `run_dir/text_cache/`.
    """
    identity = f"{pretrained}|{type(tower.body).__name__}|{len(text.tokenizer)}|{body_digest(tower.body)}"
    paths = {name: shared_cache_path(shared, identity, split) if shared is not None
             else run_dir / "text_cache" / f"{name}.h5" for name, split in splits.items()}
    out = {}
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            # building a cache draws from the global RNG (its DataLoader seeds itself); a run that finds the cache
            # ready (a sweep, a resume) draws nothing, so both must leave the RNG as they found it
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                for name, split in splits.items():
                    out[name] = build_state_cache(tower, split, text.processor(augment=False), paths[name], dev,
                                                  identity, batch_size=batch_size, progress=progress)
        dist.barrier()
    return out
