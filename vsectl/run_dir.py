"""The run directory of a training run: create it (config.yaml first) or check a resumed one; metrics.jsonl; the
checkpoint a resume starts from."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vsectl.checkpoint import (
    RNG_FILE,
    STATE_FILE,
    check_trainer_state,
    load_checkpoint,
    load_model_state,
    recover,
    remove_partial,
    restore_rng,
)
from vsectl.config import RunConfig, changed_keys, config_from_yaml, save_config
from vsectl.errors import CheckpointError, ConfigError
from vsectl.io import atomic_write_text
from vsectl.optim import load_optimizer_state

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = {"train.epochs", "train.steps", "train.log"}  # what a resume may change: length, logs


def open_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, write: bool = True) -> RunConfig:
    """Create a new run directory, or check a resumed one against `cfg`; return the config to run with.

    Every rank of a distributed run checks; only the main one (`write`) writes.
    """
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"cannot resume: {run_dir} has no config.yaml (start it without --resume)")
        saved = config_from_yaml((run_dir / "config.yaml").read_text())
        changed = [k for k in changed_keys(saved, cfg) if k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(f"cannot resume {run_dir} with a different config: {', '.join(changed)} changed")
        return cfg  # a longer train.epochs is written once the checkpoint has loaded (train)
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                          "or choose another name with --set name=...")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")  # first file of the run, before any compute
    return cfg


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records newer than the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled  # only the main rank writes
        self.sinks: list[Any] = []  # more logs fed every record (train.log: a TensorBoard writer)

    def truncate_after(self, global_step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("global_step", 0) <= global_step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)


def completed_epochs(run_dir: Path) -> int | None:
    """Epochs saved in the run's last complete checkpoint (what a resume continues from); None when there is none."""
    folder = Path(run_dir) / "checkpoints" / "last"
    for candidate in (folder, *sorted(folder.parent.glob(".old-last-*"))):  # an interrupted swap keeps the old one
        try:
            return int(json.loads((candidate / STATE_FILE).read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def last_checkpoint(run_dir: Path) -> Path | None:
    remove_partial(run_dir / "checkpoints")
    try:
        return recover(run_dir / "checkpoints" / "last")
    except CheckpointError:
        return None


def restore_checkpoint(last: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dev: torch.device,
             metrics: MetricsLog) -> dict[str, Any]:
    """Load model, optimizer and RNG state from `last`; drop metrics newer than it; return its trainer state."""
    ckpt = load_checkpoint(last, map_location=dev)
    try:
        load_model_state(model, ckpt["model"])
    except CheckpointError as e:  # name the file: a checkpoint copied in from another run is the usual cause
        raise CheckpointError(f"{last}: {e}") from None
    if ckpt["optimizer"] is None:
        raise CheckpointError(f"{last} holds no optimizer state; cannot resume exactly")
    load_optimizer_state(optimizer, ckpt["optimizer"])
    if ckpt["rng"] is not None:
        restore_rng(*ckpt["rng"])
    elif "rng" in ckpt["trainer_state"]:  # recorded but the file is gone: resuming works, repeating exactly does not
        log.warning("%s has no %s: the run resumes with fresh random state, so it will not repeat an uninterrupted "
                    "run exactly (data order, augmentation, dropout)", last, RNG_FILE)
    state = ckpt["trainer_state"]
    check_trainer_state(last, state)
    metrics.truncate_after(state["global_step"])
    return state
