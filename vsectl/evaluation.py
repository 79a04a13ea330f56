"""Encode a split once per unique image and caption, then score it under the published protocols."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vsectl.builders import TextSide, load_run
from vsectl.data.datasets import CaptionDataset, collate_tokens
from vsectl.data.door import FeatureWidthError, image_dataset, open_split, source_of
from vsectl.data.sources import Split, search_collection_message, split_fingerprint
from vsectl.data.splits import canonical_split
from vsectl.data.vocab import warn_unknown_only
from vsectl.errors import ConfigError, DataError
from vsectl.io import atomic_write_json
from vsectl.kinds import IMAGE_KINDS, TextInput
from vsectl.locks import FolderBusy, folder_lock
from vsectl.models.vse import VSEModel
from vsectl.runtime import Distributed, NullProgress, Precision, Progress, gather_rows
from vsectl.scoring.metrics import metrics_by_rule
from vsectl.scoring.protocols import Protocol, evaluate_protocol, expand
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, LEGACY_TIE_RULE, TIE_RULES

log = logging.getLogger(__name__)

SELECT_TIE_RULE = DEFAULT_TIE_RULE  # model selection's default (train.select_tie_rule): the same rule as eval's
FINGERPRINT_CHARS = 12  # hex digits of the data fingerprint in a result's file name
RESULT_LOCK_WAIT = 10.0  # seconds an eval waits for another eval of the run to finish writing its result


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
    image_set, collate = image_dataset(split, getattr(model.image, "input_size", None))  # served by the split's source
    caption_set: Dataset = CaptionDataset(split, text.processor(augment=False)) if text_states is None \
        else _States(text_states)
    text_input = TextInput.IDS if text_states is None else TextInput.STATES
    image_set, caption_set = _share(image_set, dist), _share(caption_set, dist)
    images = DataLoader(image_set, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate)
    captions = DataLoader(caption_set, batch_size=batch_size, num_workers=num_workers,
                          collate_fn=functools.partial(collate_tokens, pad_id=text.pad_id, text_input=text_input))
    img_out, cap_out = [], []
    with precision.autocast():
        for batch in progress.track(images, total=len(images), description="encode images"):
            lengths = batch["image_lengths"].to(device) if "image_lengths" in batch else None
            emb, _ = model.encode_image(batch["images"].to(device), lengths)
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
             batch_size: int, text_states: Any = None, dist: Distributed | None = None,
             tie_rule: str = SELECT_TIE_RULE) -> dict[str, Any]:
    """R@K and rsum on a (dev) split under `tie_rule`, used for model selection.

    Returns:
        the metrics (``METRIC_KEYS``) under `tie_rule`, ``tie_rule``, ``ties`` (queries with an exact tie per
        direction) and ``rsum_by_rule`` (the rsum under every rule, so a curve can be read under any of them).
    """
    if tie_rule not in TIE_RULES:
        raise ConfigError(f"train.select_tie_rule: unknown tie rule '{tie_rule}'; use one of {', '.join(TIE_RULES)}")
    img, cap = encode_split(model, split, text, device, precision, batch_size, text_states=text_states, dist=dist)
    by_rule, ties = metrics_by_rule(img, cap, torch.as_tensor(split.cap2img, device=device))
    return {**by_rule[tie_rule], "tie_rule": tie_rule, "ties": ties,
            "rsum_by_rule": {rule: m["rsum"] for rule, m in by_rule.items()}}


def check_evaluable(data: Split, where: str, protocol: str, chosen: list[Protocol]) -> None:
    """Refuse, before anything is encoded, a split the protocol cannot score: no captions, or the wrong size.

    Args:
        data: the loaded split (counts only; no feature is read).
        where: `root/split`, for the message.
        protocol: what the user asked for (a group such as `all` names several protocols).
        chosen: the protocols it expands to.
    """
    if data.n_captions == 0:
        raise DataError(search_collection_message(where, data.n_images))
    counts = np.bincount(data.cap2img, minlength=data.n_images)
    if (counts == 0).any():
        first = data.image_ids[int(np.flatnonzero(counts == 0)[0])]
        raise DataError(f"{where}: {int((counts == 0).sum())} of {data.n_images} images have no caption (first: "
                        f"{first}); every evaluated image needs at least one")
    for p in chosen:
        if p.images is not None and data.n_images != p.images:
            asked = f"'{protocol}' ({p.name})" if protocol != p.name else f"'{protocol}'"
            raise ConfigError(f"protocol {asked} needs the {p.images:,}-image {p.default_split} split ({p.help}), "
                              f"but {where} has {data.n_images:,} images; use --protocol f30k, which ranks the whole "
                              "split in one block")


def _check_width(data: Split, feat_dim: int, where: str) -> None:
    """Refuse features the run's model cannot take, saying what an eval can change: the data, not the model."""
    try:
        source_of(data).check(data, feat_dim, where)
    except FeatureWidthError as e:
        raise DataError(f"{where}: features are {e.found}-d, but the run was trained on {e.expected}-d features; give "
                        f"--data-root a folder of {e.expected}-d features (made as the run's training features "
                        "were)") from None


def result_path(run_dir: Path, protocol: str, split: str, ensemble: bool = False,
                fingerprint: str | None = None, tie_rule: str = DEFAULT_TIE_RULE, checkpoint: str = "best") -> Path:
    """`eval/<protocol>-<split>.json` of the best checkpoint on the run's own data; the last checkpoint adds `-last`,
    other data `-<fingerprint>`, a tie rule other than the default `-<rule>`. Files of earlier versions hold
    `tie_rule` (absent: optimistic, then the default)."""
    name = f"{'ensemble_' if ensemble else ''}{protocol}-{split}"
    if checkpoint != "best":
        name += f"-{checkpoint}"
    if tie_rule != DEFAULT_TIE_RULE:
        name += f"-{tie_rule}"
    if fingerprint:
        name += f"-{fingerprint[:FINGERPRINT_CHARS]}"
    return run_dir / "eval" / f"{name}.json"


def same_root(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _write_result(run_dir: Path, result: dict[str, Any], own_data: bool, ensemble: bool) -> Path:
    """Write one result without replacing a result of other data (an older one is moved to its fingerprinted name).

    Under the lock of the run's eval folder: another eval of the run reading, moving and writing the same names at
    once is waited for (`RESULT_LOCK_WAIT` seconds), then named in a FolderBusy error.
    """
    out = result_path(run_dir, result["protocol"], result["split"], ensemble,
                      None if own_data else result["data_fingerprint"], result["tie_rule"],
                      result.get("checkpoint", "best"))
    try:
        with folder_lock(out.parent, wait=RESULT_LOCK_WAIT):
            _keep_older(run_dir, result, out, own_data, ensemble)
            atomic_write_json(out, result)
    except FolderBusy as busy:
        raise FolderBusy(f"{out} was not written: {busy}") from None
    return out


def _keep_older(run_dir: Path, result: dict[str, Any], out: Path, own_data: bool, ensemble: bool) -> None:
    """Move an existing `out` of another tie rule or of other data to its own name (call it under the eval lock)."""
    protocol, split, fingerprint, rule = result["protocol"], result["split"], result["data_fingerprint"], \
        result["tie_rule"]
    which = result.get("checkpoint", "best")
    if not out.is_file():
        return
    try:
        old = json.loads(out.read_text())
    except json.JSONDecodeError:
        old = {}
    old_rule = old.get("tie_rule", LEGACY_TIE_RULE) if old else rule
    if old_rule != rule:  # written when another rule was the default: kept under that rule's own name
        kept = result_path(run_dir, protocol, split, ensemble, None if own_data else fingerprint, old_rule, which)
        os.replace(out, kept)
        log.info("%s was made under the %s tie rule; it is kept as %s", out, old_rule, kept)
        old = {}
    old_print = old.get("data_fingerprint") if own_data else None
    if old_print and (old_print != fingerprint or not same_root(old.get("data_root", ""), result["data_root"])):
        kept = result_path(run_dir, protocol, split, ensemble, old_print, rule, which)
        os.replace(out, kept)
        log.warning("the data under %s changed since %s was written; the old result is kept as %s",
                    result["data_root"], out, kept)


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
    tie_rule: str = DEFAULT_TIE_RULE,
    annotations: dict[str, str | Path | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate one run, or an ensemble of runs (similarity matrices averaged), under one or all protocols.

    Args:
        runs: run directories or checkpoint folders; more than one means an ensemble.
        protocol: a registered protocol (`vsectl.scoring.protocols`: f30k | coco1k | coco5k | dev1k) or a group (all =
            coco1k and coco5k).
        split: the split to encode; defaults to the protocol's (test for f30k, testall for COCO); `val` means `dev`.
        data_root: overrides the runs' `data.root`.
        precision: autocast for encoding (similarities and ranking stay fp32).
        tie_rule: expected (the default: the expectation over a random order of the tied items), optimistic (a
            competitor scoring exactly the ground truth's score never counts) or pessimistic (it always counts).
        annotations: extra annotation files for protocols that read them (`Protocol.annotation_options`, e.g.
            caption_ids, image_ids, pm_dir of eccv and cxc); a protocol that reads none refuses them.
        write: write `eval/<protocol>-<split>.json` (ensembles: `eval/ensemble_<protocol>-<split>.json`) in the first
            run; a data root other than the run's own adds the data fingerprint to the name.

    Returns:
        protocol name → result dict (metrics, per-fold values for coco1k, counts, runs, split, data root and
        fingerprint).
    """
    device = torch.device(device)
    chosen = [p.with_annotations(**(annotations or {})) for p in expand(protocol)]
    if tie_rule not in TIE_RULES:
        raise ConfigError(f"unknown tie rule '{tie_rule}'; use one of {', '.join(TIE_RULES)}")
    split_name = canonical_split(split or chosen[0].default_split)
    members = []
    for run in runs:  # everything is loaded and checked before the first image is encoded
        cfg, model, text = load_run(Path(run), which=which, device=device)
        root = data_root or cfg.data.root
        data = open_split(root, split_name, IMAGE_KINDS.get(cfg.model.image.encoder).reads)
        check_evaluable(data, f"{root}/{split_name}", protocol, chosen)
        _check_width(data, cfg.model.image.feat_dim, f"{root}/{split_name}")
        members.append((run, cfg, model, text, root, data))
    for p in chosen:
        if p.images is not None and split_name != canonical_split(p.default_split):
            log.warning("protocol %s is defined on '%s' (%d images); '%s' gives non-comparable numbers", p.name,
                        p.default_split, p.images, split_name)
    gts = {p.name: p.ground_truth(members[0][5], Path(members[0][4])) for p in chosen}  # before any encoding
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _, _, model, text, root, data in members:
        if text.vocab is not None:
            warn_unknown_only(text.vocab, data.captions, f"{root}/{split_name}")
        pairs.append(encode_split(model, data, text, device, Precision(precision, device), batch_size,
                                  progress=progress))
    first_cfg, root, data = members[0][1], members[0][4], members[0][5]
    fingerprint = split_fingerprint(data)
    results = {}
    for p in chosen:
        name = p.name
        result = evaluate_protocol([e[0] for e in pairs], [e[1] for e in pairs], gts[name], p, tie_rule=tie_rule)
        result.update({"split": split_name, "runs": [str(m[0]) for m in members], "checkpoint": which,
                       "modality": first_cfg.data.modality, "data_root": str(Path(root).expanduser().resolve()),
                       "data_fingerprint": fingerprint})
        results[name] = result
        if write:
            out = _write_result(_run_dir(Path(runs[0])), result, same_root(root, first_cfg.data.root), len(runs) > 1)
            result["path"] = str(out)
    return results


def _run_dir(path: Path) -> Path:
    from vsectl.builders import resolve_checkpoint

    return resolve_checkpoint(path)[0]
