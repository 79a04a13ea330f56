"""Encode a split once per unique image and caption, then score it under the published protocols (spec §10)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vsectl.builders import TextSide, load_run
from vsectl.data.datasets import CaptionDataset, ImageSetDataset, collate_images, collate_tokens
from vsectl.data.sources import Split, load_split
from vsectl.data.text_input import TextInput
from vsectl.data.vocab import warn_unknown_only
from vsectl.errors import ConfigError
from vsectl.io import atomic_write_json
from vsectl.metrics import PROTOCOLS, evaluate_protocol, rank_retrieval, recall_metrics
from vsectl.models.vse import VSEModel
from vsectl.runtime import Distributed, NullProgress, Precision, Progress, gather_rows

log = logging.getLogger(__name__)

COCO_PROTOCOLS = ("coco1k", "coco5k")
DEFAULT_SPLIT = {"f30k": "test", "coco1k": "testall", "coco5k": "testall", "dev1k": "dev"}


@torch.no_grad()
def encode_split(
    model: VSEModel,
    split: Split,
    text: TextSide,
    device: torch.device,
    precision: Precision | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: Progress | None = None,
    text_states: Any = None,
    dist: Distributed | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every unique image once and every caption once (no augmentation).

    `text_states` (a `CachedTextStates` of this split) replaces running a frozen text body on token ids. Under
    torchrun (`dist`), each rank encodes a contiguous share and the embeddings are gathered in order on every rank.

    Returns:
        img (N, E) and cap (C, E) fp32 unit vectors on `device`, in split order.
    """
    progress = progress or NullProgress()
    precision = precision or Precision("fp32", device)
    was_training = model.training
    model.eval()
    dist = dist or Distributed()
    image_set: Dataset = ImageSetDataset(split)
    caption_set: Dataset = CaptionDataset(split, text.processor(augment=False)) if text_states is None \
        else _States(text_states)
    text_input = TextInput.IDS if text_states is None else TextInput.STATES
    image_set, caption_set = _share(image_set, dist), _share(caption_set, dist)
    images = DataLoader(image_set, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    captions = DataLoader(caption_set, batch_size=batch_size, num_workers=num_workers,
                          collate_fn=functools.partial(collate_tokens, pad_id=text.pad_id, text_input=text_input))
    img_out, cap_out = [], []
    with precision.autocast():
        for batch in progress.track(images, total=len(images), description="encode images"):
            emb, _ = model.encode_image(batch["images"].to(device), batch["image_lengths"].to(device))
            img_out.append(emb.float())
        for batch in progress.track(captions, total=len(captions), description="encode captions"):
            emb, _ = model.encode_text(batch["tokens"].to(device), batch["token_lengths"].to(device), text_input)
            cap_out.append(emb.float())
    model.train(was_training)
    empty = torch.zeros(0, 0, device=device)
    img = torch.cat(img_out) if img_out else empty
    cap = torch.cat(cap_out) if cap_out else empty
    return gather_rows(img, dist), gather_rows(cap, dist)


def _share(dataset: Dataset, dist: Distributed) -> Dataset:
    """This rank's contiguous share of a dataset (all of it without torchrun)."""
    if not dist.enabled:
        return dataset
    n = len(dataset)
    per = -(-n // dist.world_size)
    return Subset(dataset, range(dist.rank * per, min(n, (dist.rank + 1) * per)))


class _States(torch.utils.data.Dataset):
    """Cached token states of a split's captions, in caption order."""

    def __init__(self, states: Any) -> None:
        self.states = states

    def __len__(self) -> int:
        return len(self.states.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.states.get(i, None)), i


def validate(model: VSEModel, split: Split, text: TextSide, device: torch.device, precision: Precision,
             batch_size: int, text_states: Any = None, dist: Distributed | None = None) -> dict[str, float]:
    """R@K and rsum on a (dev) split, used for model selection."""
    img, cap = encode_split(model, split, text, device, precision, batch_size, text_states=text_states, dist=dist)
    cap2img = torch.as_tensor(split.cap2img, device=device)
    return recall_metrics(*rank_retrieval([(img, cap)], cap2img))


def protocols_for(name: str) -> list[str]:
    if name == "all":
        return ["coco1k", "coco5k"]
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{name}'; use one of {', '.join(PROTOCOLS)} or all")
    return [name]


def evaluate_runs(
    runs: list[Path],
    protocol: str = "f30k",
    split: str | None = None,
    data_root: str | None = None,
    device: torch.device | str = "cpu",
    which: str = "best",
    batch_size: int = 128,
    precision: str = "fp32",
    progress: Progress | None = None,
    write: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate one run, or an ensemble of runs (similarity matrices averaged), under one or all protocols.

    Args:
        runs: run directories or checkpoint folders; more than one means an ensemble.
        protocol: f30k | coco1k | coco5k | dev1k | all (= coco1k and coco5k).
        split: the split to encode; defaults to the protocol's (test for f30k, testall for COCO).
        data_root: overrides the runs' `data.root`.
        precision: autocast for encoding (similarities and ranking stay fp32).
        write: write `eval/<protocol>.json` (ensembles: `eval/ensemble_<protocol>.json`) in the first run.

    Returns:
        protocol name → result dict (metrics, per-fold values for coco1k, counts, runs, split).
    """
    device = torch.device(device)
    names = protocols_for(protocol)
    split_name = split or DEFAULT_SPLIT[names[0]]
    if split_name == "test" and any(n in COCO_PROTOCOLS for n in names):
        log.warning("COCO protocols are defined on 'testall' (5,000 images); 'test' gives non-comparable numbers")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    data: Split | None = None
    run_dirs, modality = [], "image"
    for run in runs:
        cfg, model, text = load_run(Path(run), which=which, device=device)
        root = data_root or cfg.data.root
        data = load_split(root, split_name)
        if text.vocab is not None:
            warn_unknown_only(text.vocab, data.captions, f"{root}/{split_name}")
        if data.features.feat_dim != cfg.model.image.feat_dim:
            raise ConfigError(f"{root}/{split_name}: features are {data.features.feat_dim}-d but the model expects "
                              f"{cfg.model.image.feat_dim}-d (model.image.feat_dim)")
        pairs.append(encode_split(model, data, text, device, Precision(precision, device), batch_size,
                                  progress=progress))
        run_dirs.append(str(run))
        modality = cfg.data.modality
    assert data is not None
    cap2img = torch.as_tensor(data.cap2img, device=device)
    results = {}
    for name in names:
        result = evaluate_protocol([p[0] for p in pairs], [p[1] for p in pairs], cap2img, name)
        result.update({"split": split_name, "runs": run_dirs, "checkpoint": which, "modality": modality})
        results[name] = result
        if write:
            prefix = "ensemble_" if len(runs) > 1 else ""
            out = _run_dir(Path(runs[0])) / "eval" / f"{prefix}{name}.json"
            atomic_write_json(out, result)
            result["path"] = str(out)
    return results


def _run_dir(path: Path) -> Path:
    from vsectl.builders import resolve_checkpoint

    return resolve_checkpoint(path)[0]
