"""The run directory of a training run: create it (config.yaml first) or check a resumed one; metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vsectl.checkpoint import STATE_FILE
from vsectl.config import RunConfig, changed_keys, config_from_yaml, save_config
from vsectl.errors import CheckpointError, ConfigError
from vsectl.io import atomic_write_text

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
