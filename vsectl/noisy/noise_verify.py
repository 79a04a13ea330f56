"""Check a noise index, or the noisy pairs a run recorded, against a dataset's training split (`vsectl data verify
DATA --noise RUN_OR_FILE`): counts, layout, fingerprint, and whether the run's record still matches the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.config import config_from_yaml
from vsectl.data.raw import is_raw_dataset
from vsectl.data.sources import Split, load_split
from vsectl.errors import ConfigError, VsectlError
from vsectl.noisy.noise import INDEX_FILE, RECORD_FILE, NoisyPairs, noisy_pairs, summary
from vsectl.noisy.noise_config import NoiseConfig


def _train_split(data_root: Path, name: str) -> Split:
    if is_raw_dataset(data_root):
        from vsectl.data.raw_images import load_raw_split

        return load_raw_split(data_root, name)
    return load_split(data_root, name)


def _from_run(run_dir: Path, data_root: Path, report: dict[str, Any]) -> NoisyPairs | None:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is neither a run directory (config.yaml) nor a .npy noise index")
    cfg = config_from_yaml((run_dir / "config.yaml").read_text())
    if not cfg.data.noise.enabled:
        report["problems"].append(f"{run_dir} trained without data.noise: its pairs are clean")
        return None
    split = _train_split(data_root, cfg.data.train_split)
    pairs = noisy_pairs(cfg.data.noise, split)
    record_path = run_dir / RECORD_FILE
    if not record_path.is_file():
        report["problems"].append(f"{record_path} is missing: the run did not record its noisy pairs")
    else:
        recorded = json.loads(record_path.read_text()).get("fingerprint")
        report["recorded_fingerprint"] = recorded
        if recorded != pairs.fingerprint:
            report["problems"].append(f"{record_path} records fingerprint {str(recorded)[:12]}, but the data and "
                                      f"the run's data.noise give {pairs.fingerprint[:12]}: the data or the index "
                                      "changed since the run trained")
    index_path = run_dir / INDEX_FILE
    if index_path.is_file() and not np.array_equal(np.load(index_path), pairs.cap2img):
        report["problems"].append(f"{index_path} differs from the pairs the run's data.noise gives on this data")
    report["split_obj"] = split
    return pairs


def verify_noise(data_root: str | Path, target: str | Path) -> dict[str, Any]:
    """Check `target` (a run directory or a .npy noise index) against the training split under `data_root`.

    Returns:
        {"target", "kind" (run | index file), "source", "layout", "split", "n_captions", "n_images", "n_noisy",
        "ratio", "noisy_images", "fingerprint", "recorded_fingerprint" (runs), "problems", "ok"}.
    """
    data_root, target = Path(data_root), Path(target)
    report: dict[str, Any] = {"target": str(target), "problems": []}
    try:
        if target.is_dir():
            report["kind"] = "run"
            pairs = _from_run(target, data_root, report)
            split = report.pop("split_obj", None)
        else:
            report["kind"] = "index file"
            split = _train_split(data_root, "train")
            pairs = noisy_pairs(NoiseConfig(index_file=str(target)), split)
    except VsectlError as e:
        report["problems"].append(str(e))
        pairs = split = None
    if pairs is not None and split is not None:
        facts = summary(pairs, split)
        report.update({k: facts[k] for k in ("source", "layout", "split", "n_captions", "n_images", "n_noisy",
                                             "ratio", "noisy_images", "fingerprint")})
        if facts["n_noisy"] == 0:
            report["problems"].append("no caption is paired with a wrong image: the index is clean")
    report["ok"] = not report["problems"]
    return report
